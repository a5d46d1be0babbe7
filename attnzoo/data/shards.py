"""WebDataset shards in timm's layout (``timm/imagenet-1k-wds``), read map-style so that the engine's sampler
keeps its exact, resumable order.

The layout: a folder with ``_info.json`` (``{"splits": {"train": {"name", "num_samples", "filenames",
"shard_lengths"}, "validation": {...}}}``, as timm's ``ReaderWds`` reads it) and the tar shards it names; each
sample is the members ``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``) and ``KEY.cls`` (the label as decimal text),
``KEY`` being the member name up to the first dot of its base name (webdataset's convention).

timm's own wds reader is iterable (shard shuffling, buffers) and cannot restart at batch N of epoch E. Here each
split gets an index instead, built once from the tar headers and the few bytes of each ``.cls``: for every sample
the shard, the offset and size of its image and its label (the shards indexed in parallel). The index is cached
in ``$XDG_CACHE_HOME/attnzoo/wds-index/`` (``~/.cache`` by default) under a hash of the shards' paths, sizes and
modification times, as a ``.npz`` of plain arrays (nothing pickled); an image is then one ``os.pread``.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from pathlib import Path

import numpy as np
from timm.data.readers.reader import Reader

from ..common import InputError, atomic_file
from .folder import StrictImageDataset

__all__ = ["INFO", "WdsReader", "is_wds", "wds_dataset"]

INFO = "_info.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# attnzoo's split names and the names a wds _info.json may give them (timm's ImageNet shards say "validation")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation")}
MAX_OPEN = 64  # shard files a process keeps open (the soft limit on descriptors is often 1024)


def is_wds(root: str | os.PathLike) -> bool:
    return (Path(root) / INFO).is_file()


def _split_info(root: Path, split: str) -> dict:
    info = json.loads((root / INFO).read_text())
    splits = info.get("splits", {})
    for name in SPLIT_NAMES.get(split, (split,)):
        if name in splits:
            return splits[name]
    raise InputError(f"{root / INFO} names no {' or '.join(SPLIT_NAMES.get(split, (split,)))} split "
                     f"(it has: {', '.join(splits) or 'none'})")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "attnzoo" / "wds-index"


def _index_shard(path: Path) -> tuple[list[str], list[int], list[int], list[int]]:
    """(keys, image offsets, image sizes, labels) of one shard, in member order; reads headers and ``.cls``."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    seen: dict[str, None] = {}  # every sample key, in member order
    with tarfile.open(path, "r:") as tar:  # uncompressed tar: a member's bytes lie in place at offset_data
        for member in tar:
            head, slash, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            ext = ext.lower()
            if not member.isfile() or ext not in (*IMAGE_EXTENSIONS, "cls"):
                continue
            key = head + slash + stem
            seen[key] = None
            if ext == "cls":
                labels[key] = int(tar.extractfile(member).read().decode().strip())
            else:
                images.setdefault(key, (member.offset_data, member.size))
    missing = [k for k in seen if k not in images or k not in labels]
    if missing:
        raise InputError(f"{path}: sample {missing[0]!r} has no {'image' if missing[0] not in images else '.cls'} "
                         f"member (each sample needs KEY.jpg and KEY.cls; {len(missing)} incomplete)")
    keys = list(seen)
    return keys, [images[k][0] for k in keys], [images[k][1] for k in keys], [labels[k] for k in keys]


class WdsReader(Reader):
    """timm ``Reader`` over one split of a wds folder: ``reader[i]`` is ``(file-like image, label)``."""

    def __init__(self, root: str | os.PathLike, split: str):
        super().__init__()
        self.root = Path(root)
        info = _split_info(self.root, split)
        self.shards = [self.root / name for name in info["filenames"]]
        absent = [str(p) for p in self.shards if not p.is_file()]
        if absent:
            raise InputError(f"{self.root / INFO} names shard(s) that do not exist: {', '.join(absent[:3])}")
        index = self._index()
        self.shard, self.offset, self.size = index["shard"], index["offset"], index["size"]
        self.labels, self.keys = index["label"], index["key"]
        lengths = np.bincount(self.shard, minlength=len(self.shards)).tolist()
        expected = list(info.get("shard_lengths") or lengths)
        if len(expected) != len(lengths):
            raise InputError(f"{self.root / INFO}: {len(lengths)} filenames but {len(expected)} shard_lengths")
        bad = next((i for i, (a, b) in enumerate(zip(lengths, expected, strict=True)) if a != b), None)
        if bad is not None:
            raise InputError(f"{self.shards[bad]} holds {lengths[bad]} samples; {self.root / INFO} says "
                             f"{expected[bad]} (shard_lengths)")
        # no class names in timm's layout: the labels are the classes ("0" .. "N-1", N = the largest label + 1)
        n = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.class_to_idx = {str(i): i for i in range(n)}
        self._fds: dict[int, int] = {}  # opened per process (a forked worker must not share the parent's)
        self._pid = -1

    def _index(self) -> dict[str, np.ndarray]:
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.shards]
        cache = _cache_dir() / (hashlib.sha1(json.dumps(stats).encode()).hexdigest() + ".npz")
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        # tarfile's header parsing costs tens of microseconds a member: the shards are indexed in parallel, on
        # this process's share of the node's cores (torchrun starts LOCAL_WORLD_SIZE processes that each do it)
        workers = min(len(self.shards), (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_index_shard, self.shards)
        else:
            parts = [_index_shard(p) for p in self.shards]
        index = {
            "shard": np.concatenate([np.full(len(k), i, dtype=np.int32) for i, (k, *_) in enumerate(parts)]),
            "offset": np.array([o for _, offsets, _, _ in parts for o in offsets], dtype=np.int64),
            "size": np.array([s for _, _, sizes, _ in parts for s in sizes], dtype=np.int64),
            "label": np.array([y for *_, labels in parts for y in labels], dtype=np.int64),
            "key": np.array([k for keys, *_ in parts for k in keys], dtype=str),
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache, "wb") as f:  # several processes may build it at once: each replaces it whole
            np.savez(f, **index)
        return index

    def _fd(self, shard: int) -> int:
        """An open descriptor of ``shard``: at most :data:`MAX_OPEN` per process, the least recently used closed
        (a random order touches every shard, and each loader worker holds its own)."""
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if shard in self._fds:
            self._fds[shard] = self._fds.pop(shard)  # now the most recently used
        else:
            if len(self._fds) >= MAX_OPEN:
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getitem__(self, index: int):
        data = os.pread(self._fd(int(self.shard[index])), int(self.size[index]), int(self.offset[index]))
        return io.BytesIO(data), int(self.labels[index])

    def __len__(self) -> int:
        return len(self.labels)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        name = f"{self.shards[int(self.shard[index])].name}:{self.keys[index]}"
        return str(self.root / name) if absolute else name


def wds_dataset(root: str | os.PathLike, split: str, transform=None) -> StrictImageDataset:
    """:class:`~attnzoo.data.StrictImageDataset` (an unreadable image is named and replaced) over
    :class:`WdsReader` (``dataset.reader.class_to_idx`` like a folder's)."""
    reader = WdsReader(root, split)
    if not len(reader):
        raise InputError(f"{Path(root) / INFO}: the {split} split has no samples")
    return StrictImageDataset(str(root), reader=reader, transform=transform)
