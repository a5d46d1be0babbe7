"""OAT (attnzoo.heads.oat), its data (attnzoo.data.oat) and ``tools/train.py --task oat``."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from attnzoo.common import InputError
from attnzoo.data.oat import (
    GridSearchSpec,
    OATScanpaths,
    collate_scanpaths,
    from_authors_records,
    load_oat_folder,
    make_grid_search,
    read_index_file,
    search_policy,
    split_records,
    write_oat_folder,
)
from attnzoo.heads.oat import OAT, fit_position_table, oat_loss
from attnzoo.heads.scanpath_metrics import sequence_score

SMALL = dict(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0)
CROP = 29  # the smallest crop the paper's CNN takes


def _model(rows: int = 2, cols: int = 3, **kw) -> OAT:
    torch.manual_seed(0)
    return OAT(rows, cols, crop_size=(CROP, CROP), **{**SMALL, **kw}).eval()


# --------------------------------------------------------------------------------------------- position code


def test_fitted_position_table_cosines_follow_the_gaussian():
    W = fit_position_table(14, 86, sigma=2.0)  # the authors' Amazon table
    i = torch.arange(14.0)
    target = torch.exp(-((i[:, None] - i[None]) ** 2) / (2 * 2.0**2))
    Wn = F.normalize(W, dim=1)
    assert (Wn @ Wn.T - target).abs().max() < 0.02
    norms = W.norm(dim=1)
    assert norms.std() / norms.mean() < 0.01  # the norm-equalising term
    assert torch.equal(W, fit_position_table(14, 86, sigma=2.0))  # seeded


def test_position_code_is_row_col_flag_concatenated():
    m = _model(rows=2, cols=3)
    W = m.position_table
    assert W.shape == (3, math.ceil(16 / 3))  # max(rows, cols, 2) rows; d_model/2 = 16 channels of code
    code = m._position(torch.tensor([4]), torch.tensor([1]))[0]  # object 4: row 1, col 1, flagged as the target
    assert torch.equal(code, torch.cat([W[1], W[1], W[1]])[:16])
    code = m._position(torch.tensor([2]), torch.tensor([0]))[0]  # row 0, col 2
    assert torch.equal(code, torch.cat([W[0], W[2], W[0]])[:16])


# --------------------------------------------------------------------------------------------- pointer and loss


def _batch(rows: int = 2, cols: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    crops = torch.rand(2, rows * cols, 3, CROP, CROP, generator=g)
    return crops, torch.tensor([4, 1]), torch.tensor([[0, 2, 4], [3, -1, -1]])


def test_pointer_logits_match_a_hand_computation_with_the_same_weights():
    m = _model()
    crops, target, fixations = _batch()
    memory, appearance, bos = m.encode(crops, target)
    assert memory.shape == (2, 7, 32)  # 6 objects + the target token
    logits = m.decode(memory, appearance, bos, target, fixations)
    assert logits.shape == (2, 4, 8)  # BOS + 3 fixations; 6 objects, stop (the target token), PAD

    decoded = {}
    m.pointer.register_forward_hook(lambda mod, args, out: decoded.update(d=args[0]))
    m.decode(memory, appearance, bos, target, fixations)
    p = m.pointer
    heads = [(dec(decoded["d"]) @ enc(memory).transpose(1, 2)) / math.sqrt(32)
             for dec, enc in zip(p.dec, p.enc, strict=True)]
    heads = [F.pad(h, (0, 1)) for h in heads]  # PAD column = 0 in each head
    expected = p.mix.weight[0, 0] * heads[0] + p.mix.weight[0, 1] * heads[1] + p.mix.bias
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(logits[..., -1], p.mix.bias.expand(2, 4))  # the PAD logit is the mix's bias


def test_loss_points_at_the_target_token_to_stop_and_ignores_padding():
    m = _model()
    crops, target, fixations = _batch()
    logits = m(crops, target, fixations)
    # sample 0: fixations 0, 2, 4 then stop (index 6); sample 1: fixation 3 then stop, then two padded steps
    expected = F.cross_entropy(torch.cat([logits[0], logits[1, :2]]), torch.tensor([0, 2, 4, 6, 3, 6]))
    torch.testing.assert_close(oat_loss(logits, fixations, stop_index=6), expected)


def test_teacher_forcing_is_causal_and_padding_changes_nothing():
    m = _model()
    crops, target, fixations = _batch()
    full = m(crops, target, fixations)
    prefix = m(crops, target, fixations[:, :1])
    torch.testing.assert_close(full[:, :2], prefix)  # later fixations do not leak into earlier steps
    alone = m(crops[1:], target[1:], fixations[1:, :1])
    torch.testing.assert_close(full[1, :2], alone[0])  # the padded sample equals itself unpadded


def test_decoding_shapes_termination_and_batching():
    m = _model()
    crops, target, _ = _batch()
    seq, stopped = m.generate(crops, target, max_len=5)
    assert seq.shape == (2, 5) and seq.dtype == torch.long and stopped.shape == (2,)
    for s, done in zip(seq, stopped, strict=True):
        valid = (s >= 0).sum()
        assert valid >= 1 and (s[:valid] < 6).all() and (s[valid:] == -1).all()
        assert bool(done) == bool(valid < 5)  # a sequence that used all 5 steps never chose to stop
    for i in range(2):  # each sample decoded alone gives the same scanpath
        alone, _ = m.generate(crops[i : i + 1], target[i : i + 1], max_len=5)
        assert torch.equal(alone[0], seq[i])
    a, _ = m.generate(crops, target, max_len=5, sample=True, generator=torch.Generator().manual_seed(3))
    b, _ = m.generate(crops, target, max_len=5, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 5) and (a[:, 0] >= 0).all()


def test_first_step_cannot_stop_then_stop_ends_the_sequence(monkeypatch):
    m = _model()
    crops, target, _ = _batch()
    decode = m.decode

    def stop_loving(*args):  # the real logits, with "stop" (index 6) far ahead at every step
        return decode(*args) + 100 * F.one_hot(torch.tensor(6), 8)

    monkeypatch.setattr(m, "decode", stop_loving)
    for sample in (False, True):
        seq, stopped = m.generate(crops, target, max_len=4, sample=sample)
        assert stopped.all()
        assert (seq[:, 0] >= 0).all() and (seq[:, 0] < 6).all()  # step 1 had to fixate an object
        assert (seq[:, 1:] == -1).all()  # step 2 stopped


def test_bad_input_names_the_argument():
    m = _model()
    crops, target, fixations = _batch()
    with pytest.raises(ValueError, match=r"crops must be \(B, 6, 3, H, W\)"):
        m(crops[:, :5], target, fixations)
    with pytest.raises(ValueError, match="target must be"):
        m(crops, torch.tensor([6, 0]), fixations)
    with pytest.raises(ValueError, match="fixations must be"):
        m(crops, target, torch.tensor([[9], [0]]))
    with pytest.raises(ValueError, match="too small"):
        OAT(2, 3, crop_size=(16, 16), **SMALL)


def test_timm_backbone_as_crop_encoder():
    import attnzoo  # noqa: F401  (registers attnzoo's models)

    torch.manual_seed(0)
    m = OAT(2, 3, crop_encoder="resnet18", crop_size=(32, 32), **SMALL).eval()
    crops, target, fixations = _batch()
    crops = F.interpolate(crops.flatten(0, 1), size=(32, 32)).view(2, 6, 3, 32, 32)
    logits = m(crops, target, fixations)
    assert logits.shape == (2, 4, 8) and torch.isfinite(logits).all()
    # the backbone keeps its own init (xavier only touches OAT's own layers)
    torch.manual_seed(0)
    import timm

    assert torch.equal(m.crop_encoder.backbone.conv1.weight, timm.create_model("resnet18", num_classes=0).conv1.weight)


# --------------------------------------------------------------------------------------------- it learns


def test_learns_the_grid_search_policy_better_than_random_order():
    spec = GridSearchSpec(layouts=60, targets_per_layout=4, rows=2, cols=4, crop=CROP, noise=0.1, seed=0)
    records, crops = make_grid_search(spec)
    train, held_out = OATScanpaths(records[:-32], crops), OATScanpaths(records[-32:], crops)  # unseen layouts
    torch.manual_seed(0)
    m = OAT(2, 4, crop_size=(CROP, CROP), d_model=64, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
            dim_feedforward=128, dropout=0.0, max_len=16)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        b = collate_scanpaths([train[int(i)] for i in torch.randint(len(train), (16,), generator=g)])
        loss = oat_loss(m(b["crops"], b["target"], b["fixations"]), b["fixations"], m.stop_index)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    m.eval()
    b = collate_scanpaths([held_out[i] for i in range(len(held_out))])
    seq, stopped = m.generate(b["crops"], b["target"], max_len=16)
    rng = np.random.default_rng(0)
    model_scores, random_scores = [], []
    for s, human, t in zip(seq, b["fixations"], b["target"].tolist(), strict=True):
        human = human[human >= 0].tolist()
        model_scores.append(sequence_score(s[s >= 0].tolist(), human))
        order = rng.permutation(8).tolist()  # random-order search: visit objects at random until the target
        random_scores.append(sequence_score(order[: order.index(t) + 1], human))
    assert stopped.float().mean() > 0.9
    assert np.mean(model_scores) > np.mean(random_scores) + 0.25, (np.mean(model_scores), np.mean(random_scores))


def test_grid_search_follows_its_policy():
    spec = GridSearchSpec(layouts=3, targets_per_layout=2, rows=2, cols=3, crop=CROP, noise=0.0)
    records, crops = make_grid_search(spec)
    assert len(records) == 6 and crops["L0000"].shape == (6, CROP, CROP, 3) and crops["L0000"].dtype == np.uint8
    assert search_policy([0, 1, 0, 2, 0, 1], target=4) == [0, 2, 4]
    for r in records:
        seq, t = [k - 1 for k in r["package_seq"]], r["package_target"][0] - 1
        assert seq[-1] == t and seq == sorted(set(seq))  # raster order, ending at the target
        colours = crops[r["layout_id"]][seq].reshape(len(seq), -1, 3)
        centre = colours[:, CROP * (CROP // 2) + CROP // 2]  # the shape's fill at the crop centre
        assert (centre == centre[-1]).all()  # every fixated object has the target's colour
    assert make_grid_search(spec)[0] == records  # a function of the spec


# --------------------------------------------------------------------------------------------- data adapter


def _folder(tmp_path, n_layouts: int = 5, **kw):
    spec = GridSearchSpec(layouts=n_layouts, targets_per_layout=2, rows=2, cols=3, crop=CROP, **kw)
    records, crops = make_grid_search(spec)
    return write_oat_folder(tmp_path / "oat", records, crops, {"grid": spec.grid}, order=range(len(records))[::-1])


def test_folder_round_trip_and_authors_split(tmp_path):
    root = _folder(tmp_path)
    records, crops, grids = load_oat_folder(root)
    assert len(records) == 10 and grids["grid"].rows == 2 and grids["Q3"].cols == 9  # the authors' grids too
    order = read_index_file(root / "splitlist.txt", len(records))
    assert order == list(range(9, -1, -1))
    split = split_records(records, order, "grid")
    # in index-file order (reversed): val = [8, 9) -> record 1, test = [9, 10) -> record 0, train = the first 8
    assert split["val"] == [records[1]] and split["test"] == [records[0]] and split["train"] == records[:1:-1]
    ds = OATScanpaths(split["train"], crops)
    item = ds[0]
    r = split["train"][0]
    assert item["crops"].shape == (6, 3, CROP, CROP) and 0 <= item["crops"].min() and item["crops"].max() <= 1
    assert item["target"] == r["package_target"][0] - 1
    assert item["fixations"].tolist() == [k - 1 for k in r["package_seq"]]
    assert OATScanpaths(split["train"], crops, crop_size=(40, 30))[0]["crops"].shape == (6, 3, 40, 30)
    batch = collate_scanpaths([ds[0], ds[1]])
    assert batch["fixations"].shape[1] == max(len(ds[0]["fixations"]), len(ds[1]["fixations"]))


def test_leave_one_combination_out(tmp_path):
    records, _, _ = load_oat_folder(_folder(tmp_path))
    held = records[3]
    split = split_records(records, list(range(10)), "grid", (held["layout_id"], held["tgt_id"]))
    assert split["test"] == [held]
    rest = [r for r in records if r is not held]  # 9 left: val = [7, 8), train = [0, 7) + [8, 9)
    assert split["val"] == rest[7:8] and split["train"] == rest[:7] + rest[8:]
    with pytest.raises(InputError, match="no record has layout_id 'nope'"):
        split_records(records, list(range(10)), "grid", ("nope", "T1"))
    with pytest.raises(InputError, match="no record of task 'Q1'"):
        split_records(records, list(range(10)), "Q1")


def _rewrite(root, mutate):
    data = json.loads((root / "records.json").read_text())
    mutate(data)
    (root / "records.json").write_text(json.dumps(data))


def test_malformed_folders_raise_input_errors_that_name_file_and_key(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_oat_folder(tmp_path / "missing")
    (root / "records.json").write_text("{not json")
    with pytest.raises(InputError, match=r"records.json is not valid json"):
        load_oat_folder(root)
    root = _folder(tmp_path / "b")
    _rewrite(root, lambda d: d["records"][2].update(package_seq=[1, 99]))
    with pytest.raises(InputError, match=r"records\[2\]\['package_seq'\]: expected a non-empty list of object "
                                         r"indices in 1..6"):
        load_oat_folder(root)
    _rewrite(root, lambda d: (d["records"][2].update(package_seq=[1]), d["records"][0].pop("package_target")))
    with pytest.raises(InputError, match=r"records\[0\]\['package_target'\].*<missing>"):
        load_oat_folder(root)
    _rewrite(root, lambda d: (d["records"][0].update(package_target=[1]), d["records"][1].update(layout_id="X")))
    with pytest.raises(InputError, match=r"records\[1\]\['layout_id'\]: expected a layout of crops.npz"):
        load_oat_folder(root)
    _rewrite(root, lambda d: (d["records"][1].update(layout_id="L0000"), d["records"][1].update(id="Q3")))
    with pytest.raises(InputError, match=r"crops.npz\['L0000'\] has shape \(6, 29, 29, 3\); records\[1\] .*"
                                         r"needs \(27, H, W, 3\)"):
        load_oat_folder(root)
    _rewrite(root, lambda d: d["records"][1].update(id="grid"))
    np.savez(root / "crops.npz", L0000=np.array([{"a": 1}], dtype=object))  # needs pickle: refused
    with pytest.raises(InputError, match="crops.npz is not a readable .npz"):
        load_oat_folder(root)
    (root / "crops.npz").unlink()
    with pytest.raises(InputError, match="has no crops.npz"):
        load_oat_folder(root)


def test_index_file_errors(tmp_path):
    path = tmp_path / "split.txt"
    with pytest.raises(InputError, match="split.txt does not exist"):
        read_index_file(path, 3)
    path.write_text("0\nx\n")
    with pytest.raises(InputError, match="every line must be a record index"):
        read_index_file(path, 3)
    path.write_text("0\n3\n")
    with pytest.raises(InputError, match=r"out-of-range \[3\]"):
        read_index_file(path, 3)
    path.write_text("0\n0\n")
    with pytest.raises(InputError, match="duplicates"):
        read_index_file(path, 3)


def test_authors_records_convert_to_a_folder_that_loads(tmp_path):
    """The authors' pickled list (crops inside each record, numpy values, int layout ids) -> records + crops."""
    spec = GridSearchSpec(layouts=2, targets_per_layout=2, rows=2, cols=3, crop=CROP)
    records, crops = make_grid_search(spec)
    layout_ids = {name: i for i, name in enumerate(sorted(crops))}
    authors = [{**r, "layout_id": np.int64(layout_ids[r["layout_id"]]), "package_seq": np.array(r["package_seq"]),
                "package_target": [np.int64(r["package_target"][0])], "question_img_feature": crops[r["layout_id"]]}
               for r in records]
    converted, converted_crops = from_authors_records(authors)
    assert sorted(converted_crops) == ["0", "1"]
    for r, c in zip(records, converted, strict=True):
        assert c["layout_id"] == str(layout_ids[r["layout_id"]]) and c["package_seq"] == r["package_seq"]
        assert np.array_equal(converted_crops[c["layout_id"]], crops[r["layout_id"]])
    root = write_oat_folder(tmp_path / "oat", converted, converted_crops, {"grid": spec.grid})
    loaded, loaded_crops, _ = load_oat_folder(root)
    assert loaded == converted and all(np.array_equal(loaded_crops[k], v) for k, v in converted_crops.items())
    clash = [authors[0], {**authors[0], "question_img_feature": authors[0]["question_img_feature"] * 0}]
    with pytest.raises(InputError, match="has other crops than an earlier record"):
        from_authors_records(clash)
    with pytest.raises(InputError, match="expected a dict with 'layout_id' and 'question_img_feature'"):
        from_authors_records([{"layout_id": 0}])


# --------------------------------------------------------------------------------------------- tools/train.py


def test_train_tool_runs_checkpoints_and_resumes(tmp_path, capsys):
    from tests.tools.conftest import load_tool

    train = load_tool("train")
    spec = GridSearchSpec(layouts=12, targets_per_layout=4, rows=2, cols=3, crop=CROP, seed=1)
    records, crops = make_grid_search(spec)
    data = write_oat_folder(tmp_path / "data", records, crops, {"grid": spec.grid})
    out = tmp_path / "run"
    args = [str(data), "--task", "oat", "--output", str(out), "--oat-d-model", "32", "--oat-heads", "2",
            "--oat-layers", "1", "--oat-ffn", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1",
            "--clip-grad", "1.0"]
    assert train.main([*args, "--max-steps", "3"]) == 0
    assert json.loads((out / "checkpoints" / "last.json").read_text())["step"] == 3
    # 48 records: train 38 -> 9 batches of 4; the resumed run finishes the epoch and evaluates on the 5 val records
    assert train.main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    pointer = json.loads((out / "checkpoints" / "last.json").read_text())
    ckpt = out / "checkpoints" / pointer["checkpoint"]
    state = json.loads((ckpt / "state.json").read_text())
    assert pointer["step"] == 9 and state["oat"]["rows"] == 2 and state["oat"]["task"] == "grid"
    header, row = (out / "log.csv").read_text().splitlines()[:2]
    metrics = dict(zip(header.split(","), row.split(","), strict=True))
    for key in ("val_loss", "seq_score", "sim", "delta", "mm_vector", "mm_direction", "mm_length", "mm_position"):
        assert 0 <= float(metrics[key]) < 10, key
    assert 0 < float(metrics["seq_score"]) <= 1
    config = {k: v for k, v in state["oat"].items() if k not in ("task", "decode_len")}
    model = OAT(**{**config, "crop_size": tuple(config["crop_size"])})
    model.load_state_dict(load_file(ckpt / "model.safetensors"))  # strict: the checkpoint is the whole model
    # OAT is no timm classifier: publish refuses the run, naming the task, and writes nothing
    capsys.readouterr()
    assert load_tool("publish").main([str(out), "--out", str(tmp_path / "hub")]) == 2
    assert "trained with --task oat" in capsys.readouterr().err and not (tmp_path / "hub").exists()
    # bad input exits 2 with the file named
    (data / "records.json").unlink()
    assert train.main([str(data), "--task", "oat", "--output", str(tmp_path / "r2")]) == 2
    assert "has no records.json" in capsys.readouterr().err
