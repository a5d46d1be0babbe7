"""tools/train.py on data at scale: WebDataset shards in timm's layout (read map-style, exact resume) and Hugging
Face datasets (a Hub dataset from the offline cache, a save_to_disk folder)."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.common import InputError
from attnzoo.data import image_folder
from attnzoo.data.shards import wds_dataset

from .conftest import FAST, TINY_DAVIT, load_tool

train = load_tool("train")


def _samples(root: Path, split: str) -> list[tuple[str, Path, int]]:
    """(key, file, label) of an ImageNet-style split, labels from the sorted class folders."""
    classes = sorted(d.name for d in (root / "train").iterdir())
    return [(f"{p.parent.name}_{p.stem}", p, classes.index(p.parent.name))
            for p in sorted((root / split).glob("*/*.png"))]


def write_wds(root: Path, out: Path, per_shard: int = 7) -> Path:
    """``root`` (ImageNet-style) as timm's wds layout: shards of KEY.png + KEY.cls, ``_info.json``, split names
    train and validation as in ``timm/imagenet-1k-wds``."""
    out.mkdir()
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        samples, files, lengths = _samples(root, split), [], []
        for s in range(0, len(samples), per_shard):
            files.append(f"shapes-{name}-{s // per_shard:04d}.tar")
            lengths.append(len(samples[s: s + per_shard]))
            with tarfile.open(out / files[-1], "w") as tar:
                for key, path, label in samples[s: s + per_shard]:
                    for ext, data in (("png", path.read_bytes()), ("cls", str(label).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        splits[name] = {"name": name, "num_samples": sum(lengths), "filenames": files, "shard_lengths": lengths}
    (out / "_info.json").write_text(json.dumps({"name": "shapes", "splits": splits}))
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    ckpt = out / "checkpoints" / json.loads((out / "checkpoints" / "last.json").read_text())["checkpoint"]
    return load_file(ckpt / "model.safetensors")


def test_wds_reader_gives_the_folders_images_and_labels(shapes, tmp_path, cache):
    shards = write_wds(shapes, tmp_path / "wds")
    folder = image_folder(shapes, "train")
    wds = wds_dataset(shards, "train")
    assert len(wds) == len(folder) == 20 and len(wds.reader.shards) == 3
    assert list(cache.rglob("*.npz"))  # the index, built once
    by_key = {f"{Path(p).parent.name}_{Path(p).stem}": i for i, (p, _) in enumerate(folder.reader.samples)}
    for i in (0, 6, 7, 19):  # across shard boundaries
        img, label = wds[i]
        ref_img, ref_label = folder[by_key[wds.reader.keys[i]]]
        assert label == ref_label and np.array_equal(np.asarray(img), np.asarray(ref_img))
    # a second reader uses the cached index: the shards' bytes are not parsed again
    again = wds_dataset(shards, "train")
    assert np.array_equal(again.reader.offset, wds.reader.offset)
    assert len(wds_dataset(shards, "val")) == 10  # "val" is the layout's "validation"


def test_wds_reader_keeps_few_shards_open(shapes, tmp_path, cache, monkeypatch):
    import attnzoo.data.shards as shards_module

    monkeypatch.setattr(shards_module, "MAX_OPEN", 2)
    reader = wds_dataset(write_wds(shapes, tmp_path / "wds", per_shard=3), "train").reader
    expected = [reader[i][0].read() for i in range(len(reader))]  # 7 shards, in order
    assert len(reader._fds) == 2
    order = [19, 0, 10, 3, 19, 5, 12, 0]
    assert [reader[i][0].read() for i in order] == [expected[i] for i in order]
    assert len(reader._fds) == 2 and list(reader._fds) == [reader.shard[12], reader.shard[0]]


def test_wds_shard_lengths_are_checked(shapes, tmp_path, cache, capsys):
    shards = write_wds(shapes, tmp_path / "wds")
    info = json.loads((shards / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][1] = 6
    (shards / "_info.json").write_text(json.dumps(info))
    rc = train.main([str(shards), "--output", str(tmp_path / "run"), *TINY_DAVIT, *FAST, "--max-steps", "1"])
    assert rc == 2
    assert "shapes-train-0001.tar holds 7 samples" in capsys.readouterr().err


def test_wds_run_stopped_and_resumed_reaches_the_same_weights(shapes, tmp_path, cache):
    shards = write_wds(shapes, tmp_path / "wds")
    common = [str(shards), *TINY_DAVIT, *FAST, "--epochs", "2", "--drop-path", "0.1"]
    assert train.main([*common, "--output", str(tmp_path / "whole"), "--max-steps", "7"]) == 0
    # the interrupted run with a loader worker (its own file descriptors on the shards), the whole one without
    assert train.main([*common, "--output", str(tmp_path / "part"), "--max-steps", "3", "--workers", "1"]) == 0
    assert train.main([*common, "--output", str(tmp_path / "part"), "--max-steps", "7", "--resume"]) == 0
    a, b = _model(tmp_path / "whole"), _model(tmp_path / "part")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _hf_splits(root: Path):
    import datasets

    classes = sorted(d.name for d in (root / "train").iterdir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"image": [str(p) for _, p, _ in _samples(root, split)],
                                          "label": [y for *_, y in _samples(root, split)]}, features=features)
        for split, name in (("train", "train"), ("val", "validation"))})


def test_hf_save_to_disk_folder_trains(shapes, tmp_path):
    pytest.importorskip("datasets", reason="the data extra")
    saved = tmp_path / "saved"
    _hf_splits(shapes).save_to_disk(str(saved))
    out = tmp_path / "run"
    assert train.main([str(saved), "--output", str(out), *TINY_DAVIT, *FAST, "--max-steps", "2"]) == 0
    state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["step"] == 2
    assert state["classification"]["classes"] == sorted(p.name for p in (shapes / "train").iterdir())


def test_hfds_hub_dataset_from_the_offline_cache(shapes, tmp_path, monkeypatch):
    """``hfds/ORG/NAME`` with no network: the prepared Arrow cache a first (online) ``load_dataset`` leaves in
    ``HF_DATASETS_CACHE/ORG___NAME/default/0.0.0/HASH``, here made from parquet files as the Hub serves them."""
    pytest.importorskip("datasets", reason="the data extra")
    import shutil

    import datasets
    import huggingface_hub.constants as hf_constants
    from datasets.packaged_modules.parquet.parquet import Parquet

    parquet, build, ds_cache = tmp_path / "data", tmp_path / "build", tmp_path / "datasets"
    parquet.mkdir()
    for name, split in _hf_splits(shapes).items():
        split.to_parquet(str(parquet / f"{name}-00000-of-00001.parquet"))
    builder = Parquet(cache_dir=str(build), dataset_name="shapes", config_name="default",
                      data_files={n: str(parquet / f"{n}-00000-of-00001.parquet") for n in ("train", "validation")})
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, ds_cache / "attnzoo___shapes" / "default" / "0.0.0" / "0123abcd")
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(ds_cache))):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # both libraries read the settings at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", ds_cache)
    out = tmp_path / "run"
    assert train.main(["hfds/attnzoo/shapes", "--output", str(out), *TINY_DAVIT, *FAST, "--max-steps", "2"]) == 0
    assert json.loads((out / "checkpoints" / "last.json").read_text())["step"] == 2
    from attnzoo.data.hfds import hf_dataset

    (key, path, label), = _samples(shapes, "train")[:1]
    img, y = hf_dataset("hfds/attnzoo/shapes", "train")[0]
    assert y == label and np.array_equal(np.asarray(img), np.asarray(Image.open(path).convert("RGB")))
    # a parquet folder as downloaded reads the same
    assert len(hf_dataset(parquet, "val")) == 10
    with pytest.raises(InputError, match="no Hugging Face dataset 'attnzoo/absent' in the local cache"):
        hf_dataset("hfds/attnzoo/absent", "train")


def test_hf_data_without_the_extra_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError, as when absent
    rc = train.main(["hfds/ILSVRC/imagenet-1k", "--output", str(tmp_path / "run"), *TINY_DAVIT, *FAST])
    assert rc == 1
    assert "pip install 'attnzoo[data]'" in capsys.readouterr().err
