"""DCAL: GLCA finds the discriminative patch of a synthetic fine-grained task, the rollout equals the explicit matrix
rollout, PWCA's invariant, the losses' gradients, the Re-ID metrics on a hand case, the CUB and Market-1501
adapters (and their errors), and ``tools/train.py --task dcal`` end to end with an exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from attnzoo.backbones.sparsifiner import attention_maps
from attnzoo.common import InputError
from attnzoo.data.cub import CUB200
from attnzoo.data.market1501 import Market1501Eval, Market1501Train, flatten_identities
from attnzoo.heads.dcal import (
    DCAL,
    batch_hard_triplet_loss,
    random_partners,
    reid_metrics,
    uncertainty_weighted_loss,
)
from attnzoo.kernels import trace, use_backend

# a ViT of 4×4 patches of 8 px on 32 px images, two blocks: a CPU step takes milliseconds
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _dcal(num_classes: int = 4, seed: int = 0, **kwargs) -> DCAL:
    torch.manual_seed(seed)
    return DCAL(timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY_VIT), **kwargs)


# ------------------------------------------------------------------------------------------ the synthetic task

PATTERNS = torch.sign(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(123)))


def _fine_grained(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of noise texture in which one 8×8 grid cell, at a random place, holds the class's ±1 pattern: the
    class is decided by that patch alone. Returns images, labels and the patch's grid cell (0..15)."""
    x = 0.8 * torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(len(PATTERNS), (n,), generator=gen)
    cell = torch.randint(16, (n,), generator=gen)
    for i in range(n):
        row, col = divmod(cell[i].item(), 4)
        x[i, :, 8 * row: 8 * row + 8, 8 * col: 8 * col + 8] = PATTERNS[y[i]]
    return x, y, cell


def test_glca_queries_land_on_the_discriminative_patch():
    model = _dcal(local_ratio=0.1)  # ⌈0.1 · 16⌉ = 2 local queries: chance of holding the patch is 2/16
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(120):
        x, y, _ = _fine_grained(32, gen)
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, cell = _fine_grained(128, torch.Generator().manual_seed(99))
    with torch.no_grad():
        out = model(x)
        accuracy = (model.predict(x).argmax(1) == y).float().mean().item()
    local = out["local_index"]
    assert local.shape == (128, 3) and (local[:, 0] == 0).all()  # the CLS token, then the local queries
    hit_rate = (local[:, 1:] == cell[:, None] + 1).any(1).float().mean().item()  # token = cell + 1 (CLS first)
    assert hit_rate > 0.8, hit_rate  # chance: 0.125
    assert accuracy > 0.8, accuracy  # chance: 0.25


# ------------------------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rollout_equals_the_explicit_matrix_rollout(backend):
    """CLS row of Ŝ = S̄_L ⋯ S̄_1, S̄ = 0.5 mean_h P + 0.5 E rows re-normalised (as the replication forms it), with
    P from timm's own blocks; against DCAL's chain of rollout_step products on either backend."""
    model = _dcal(seed=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    eye = torch.eye(17)
    s_hat = eye
    for p in attention_maps(model.backbone, x):
        s_bar = 0.5 * p.mean(1) + 0.5 * eye
        s_hat = (s_bar / s_bar.sum(-1, keepdim=True)) @ s_hat
    with use_backend(backend), trace() as calls:
        got = model.rollout(x)
    assert calls == [("rollout_step", backend)] * 2
    torch.testing.assert_close(got, s_hat[:, 0], rtol=1e-5, atol=1e-6)


def test_sa_branch_is_the_backbone_and_pwca_with_itself_as_distractor_is_the_sa_branch():
    """Duplicated keys leave a softmax unchanged: [K; K] with [V; V] gives softmax(QKᵀ)V again, so PWCA paired with
    the image itself reproduces the SA branch layer by layer; any other partner changes it."""
    model = _dcal(seed=5)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["sa"], model.backbone(x), rtol=1e-5, atol=1e-6)  # timm's own forward
    model.train()  # no dropout or drop path in this model: training mode is deterministic
    with torch.no_grad():
        itself = model(x, partner=torch.arange(4))
        other = model(x, partner=torch.tensor([1, 2, 3, 0]))
    torch.testing.assert_close(itself["pwca"], itself["sa"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(itself["pwca_feat"], itself["sa_feat"], rtol=1e-5, atol=1e-6)
    assert (other["pwca"] - other["sa"]).abs().max() > 1e-3
    torch.testing.assert_close(other["sa"], itself["sa"])


def test_on_a_sparsifiner_backbone_keeping_every_key_sa_is_the_backbone():
    """DCAL runs a backbone's blocks densely; Sparsifiner with keep_rate 1 keeps every key, so the two agree."""
    torch.manual_seed(14)
    backbone = timm.create_model("sparsifiner_deit_small_patch16_224", num_classes=3, keep_rate=1.0, basis_topk=2,
                                 **TINY_VIT)
    model = DCAL(backbone).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        torch.testing.assert_close(model(x)["sa"], backbone(x), rtol=1e-5, atol=1e-6)


def test_distractors_are_other_images_drawn_from_torch_rng():
    torch.manual_seed(7)
    first = random_partners(6, torch.device("cpu"))
    torch.manual_seed(7)
    assert torch.equal(random_partners(6, torch.device("cpu")), first)  # a function of the torch RNG state
    for _ in range(20):
        p = random_partners(5, torch.device("cpu"))
        assert sorted(p.tolist()) == list(range(5)) and (p != torch.arange(5)).all()
    with pytest.raises(ValueError, match="batch of 1"):
        random_partners(1, torch.device("cpu"))


def test_inference_adds_probabilities_or_concatenates_embeddings():
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    for reid in (False, True):
        model = _dcal(reid=reid).eval()
        with torch.no_grad():
            out, pred = model(x), model.predict(x)
        assert "pwca" not in out  # PWCA is removed at inference
        if reid:
            assert torch.equal(pred, torch.cat([out["sa_feat"], out["glca_feat"]], 1)) and pred.shape == (3, 64)
        else:
            torch.testing.assert_close(pred, out["sa"].softmax(-1) + out["glca"].softmax(-1))
            torch.testing.assert_close(pred.sum(1), torch.full((3,), 2.0))


def test_glca_starts_as_a_copy_of_the_last_block_but_does_not_share_its_weights():
    model = _dcal()
    last = model.backbone.blocks[-1].state_dict()
    assert all(torch.equal(v, last[k]) for k, v in model.glca_block.state_dict().items())
    assert model.glca_block.attn.qkv.weight.data_ptr() != model.backbone.blocks[-1].attn.qkv.weight.data_ptr()


def test_backbone_without_class_token_is_rejected():
    vit = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **TINY_VIT)
    with pytest.raises(ValueError, match="with a class token"):
        DCAL(vit)
    with pytest.raises(ValueError, match=r"`local_ratio` must be in \(0, 1\]"):
        _dcal(local_ratio=0.0)


# --------------------------------------------------------------------------------------------------- losses


def test_uncertainty_weighted_loss_gradients():
    """L = ½ Σ (e^{-w} L_b + w): ∂L/∂L_b = ½ e^{-w_b}, ∂L/∂w_b = ½ (1 − e^{-w_b} L_b), zero at w_b = log L_b."""
    losses = torch.tensor([2.0, 0.5, 1.0], requires_grad=True)
    w = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    total = uncertainty_weighted_loss(losses, w)
    d_losses, d_w = torch.autograd.grad(total, (losses, w))
    # by hand: 0.5 · (2 + 0.5/e + e + 0 + 1 − 1)
    assert total.item() == pytest.approx(0.5 * (2 + 0.5 * np.exp(-1) + np.exp(1)))
    torch.testing.assert_close(d_losses, torch.tensor([0.5, 0.5 * np.exp(-1), 0.5 * np.exp(1)], dtype=torch.float32))
    torch.testing.assert_close(d_w, torch.tensor([0.5 * (1 - 2), 0.5 * (1 - 0.5 * np.exp(-1)), 0.5 * (1 - np.exp(1))],
                                                 dtype=torch.float32))
    at_optimum = torch.log(losses.detach()).requires_grad_()
    (grad,) = torch.autograd.grad(uncertainty_weighted_loss(losses.detach(), at_optimum), at_optimum)
    torch.testing.assert_close(grad, torch.zeros(3))


def test_model_loss_is_the_weighted_sum_and_trains_the_weights():
    model = _dcal(seed=9)
    x, y, _ = _fine_grained(4, torch.Generator().manual_seed(10))
    out = model(x)
    ce = [torch.nn.functional.cross_entropy(out[b], y) for b in ("sa", "glca", "pwca")]
    with torch.no_grad():
        model.loss_weights.copy_(torch.tensor([0.1, -0.2, 0.3]))
    loss = model.loss(out, y)
    want = 0.5 * sum(torch.exp(-w) * c + w for w, c in zip(model.loss_weights, ce, strict=True))
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert model.loss_weights.grad is not None and model.loss_weights.grad.abs().min() > 0


def test_batch_hard_triplet_hand_case():
    """1-D embeddings 0, 1 (id 0) and 3, 10 (id 1), margin 0.3. Hardest positive / nearest negative per anchor:
    0: 1 / 3 -> 0;  1: 1 / 2 -> 0;  3: 7 / 2 -> 5.3;  10: 7 / 9 -> 0.  Mean 5.3 / 4 = 1.325."""
    feat = torch.tensor([[0.0], [1.0], [3.0], [10.0]], requires_grad=True)
    loss = batch_hard_triplet_loss(feat, torch.tensor([0, 0, 1, 1]), margin=0.3)
    assert loss.item() == pytest.approx(1.325)
    (grad,) = torch.autograd.grad(loss, feat)
    # only anchor 3 is active, with (|3 − 10| − |3 − 1| + 0.3) / 4: ∂/∂3 = (−1 − 1)/4, ∂/∂10 = ∂/∂1 = 1/4
    torch.testing.assert_close(grad, torch.tensor([[0.0], [0.25], [-0.5], [0.25]]))


def test_reid_metrics_hand_case():
    """Query 0 (id 1, cam 1): gallery 0 is id 1 seen by cam 1 (left out), gallery 3 is junk (left out); by distance
    the rest rank g1 (id 2) ✗, g2 (id 1) ✓, g4 (distractor) ✗, g5 (id 1) ✓: AP = (1/2 + 2/4)/2 = 0.5, rank-1 miss.
    Query 1 (id 2, cam 1): g1 (id 2, cam 2) ranks first: AP 1, rank-1 hit. Query 2 (id 3) has no match: skipped.
    mAP = 75 %, rank-1 = 50 % over 2 queries."""
    gallery_ids, gallery_cams = torch.tensor([1, 2, 1, -1, 0, 1]), torch.tensor([1, 2, 2, 2, 3, 3])
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.05, 0.4, 0.5],
                         [0.9, 0.1, 0.5, 0.0, 0.2, 0.6],
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    got = reid_metrics(dist, torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]), gallery_ids, gallery_cams)
    assert got == pytest.approx({"rank1": 50.0, "mAP": 75.0, "queries": 2})
    with pytest.raises(ValueError, match=r"`dist` must be \[queries, gallery\] = \[3, 6\]"):
        reid_metrics(dist.T, torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]), gallery_ids, gallery_cams)


# ---------------------------------------------------------------------------------------------- data adapters


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_cub(root: Path, classes: int = 2, train: int = 4, test: int = 2) -> Path:
    """CUB-200-2011's layout with ``classes`` classes of ``train`` + ``test`` images each."""
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "classes.txt": []}
    image_id = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        lines["classes.txt"].append(f"{c} {folder}")
        for j in range(train + test):
            image_id += 1
            name = f"{folder}/Bird_{c}_{j:04d}_{image_id}.jpg"
            _image(root / "images" / name, image_id)
            lines["images.txt"].append(f"{image_id} {name}")
            lines["image_class_labels.txt"].append(f"{image_id} {c}")
            lines["train_test_split.txt"].append(f"{image_id} {int(j < train)}")
    for name, text in lines.items():
        (root / name).write_text("\n".join(text) + "\n")
    (root / "bounding_boxes.txt").write_text("1 0 0 1 1\n")  # present in the release, ignored
    return root


def test_cub_reads_the_published_layout(tmp_path):
    root = _write_cub(tmp_path / "CUB_200_2011", classes=3, train=2, test=1)
    train, test = CUB200(root, train=True), CUB200(root, train=False)
    assert (len(train), len(test)) == (6, 3)
    assert train.classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    assert [label for _, label in test.samples] == [0, 1, 2]  # class ids 1..3 -> labels 0..2
    img, label = train[3]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 1


@pytest.mark.parametrize("file,edit,match", [
    ("images.txt", None, r"images.txt does not exist"),
    ("image_class_labels.txt", "3 two\n", r"image_class_labels.txt line 3: expected '<id> <class_id>', got '3 two'"),
    ("train_test_split.txt", "1 1\n", r"train_test_split.txt has no line for image id 2 of images.txt"),
    ("image_class_labels.txt", "1 9\n", r"image id 1 has class 9, not one of classes.txt's 1..2"),
])
def test_cub_malformed_files_name_the_file_and_line(tmp_path, file, edit, match):
    root = _write_cub(tmp_path / "cub")
    path = root / file
    if edit is None:
        path.unlink()
    else:
        lines = path.read_text().splitlines(keepends=True)
        n = int(edit.split()[0]) - 1 if file != "train_test_split.txt" else 0
        lines = [edit] if file == "train_test_split.txt" else lines[:n] + [edit] + lines[n + 1:]
        path.write_text("".join(lines))
    with pytest.raises(InputError, match=match):
        CUB200(root, train=True)


def test_cub_missing_image_is_named(tmp_path):
    root = _write_cub(tmp_path / "cub")
    (root / "images" / "002.Bird_2" / "Bird_2_0001_8.jpg").unlink()
    with pytest.raises(InputError, match=r"1 image\(s\) listed in images.txt are missing, e.g. .*Bird_2_0001_8.jpg"):
        CUB200(root, train=True)
    with pytest.raises(InputError, match="data folder .* does not exist"):
        CUB200(tmp_path / "nowhere", train=True)


def _write_market(root: Path) -> Path:
    for i, name in enumerate(("0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0002_c3s1_000651_01.jpg",
                              "0007_c1s2_000100_01.jpg", "0007_c4s2_000200_02.jpg")):
        _image(root / "bounding_box_train" / name, i)
    for i, name in enumerate(("0002_c2s1_000801_01.jpg", "-1_c1s1_000001_00.jpg", "0000_c3s1_000002_00.jpg")):
        _image(root / "bounding_box_test" / name, 10 + i)
    _image(root / "query" / "0002_c1s1_000901_00.jpg", 20)
    return root


def _as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.tensor(np.array(img))


def test_market_yields_k_images_of_one_identity_and_the_collate_flattens_them(tmp_path):
    root = _write_market(tmp_path / "Market-1501")
    train = Market1501Train(root, images_per_identity=4, transform=_as_tensor)
    assert train.identities == [2, 7] and len(train) == 2
    torch.manual_seed(0)
    images, labels = train[1]  # identity 7 has 2 images: drawn with replacement
    assert images.shape == (4, 32, 32, 3) and labels.tolist() == [1, 1, 1, 1]
    originals = {_as_tensor(Image.open(p)).numpy().tobytes() for p in train.images[1]}
    assert {im.numpy().tobytes() for im in images} == originals  # 4 draws of 2 images (with seed 0: both)
    torch.manual_seed(0)
    images3, _ = Market1501Train(root, 3, transform=_as_tensor)[0]
    assert len({im.numpy().tobytes() for im in images3}) == 3  # identity 2 has 3 images: each once
    x, y = flatten_identities([(torch.zeros(4, 3, 8, 8), torch.full((4,), 0)), (torch.ones(4, 3, 8, 8),
                                                                                  torch.full((4,), 1))])
    assert x.shape == (8, 3, 8, 8) and y.tolist() == [0] * 4 + [1] * 4 and x[4:].eq(1).all()


def test_market_eval_lists_query_then_gallery_with_ids_and_cameras(tmp_path):
    evaluation = Market1501Eval(_write_market(tmp_path / "m"))
    assert [(pid, cam, q) for _, pid, cam, q in evaluation.samples] == [
        (2, 1, True), (-1, 1, False), (0, 3, False), (2, 2, False)]  # sorted by name: "-1_" < "0000_" < "0002_"


def test_market_bad_names_and_missing_folders(tmp_path):
    root = _write_market(tmp_path / "m")
    _image(root / "query" / "person_7.jpg", 0)
    with pytest.raises(InputError, match=r"query/person_7.jpg: the name does not read as <identity>_c<camera>"):
        Market1501Eval(root)
    with pytest.raises(InputError, match=r"bounding_box_train does not exist"):
        Market1501Train(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ tools/train.py


def test_train_tool_runs_dcal_on_cub_writes_a_checkpoint_and_resumes_exactly(tmp_path, capsys):
    from tests.tools.conftest import load_tool

    train = load_tool("train")
    data = _write_cub(tmp_path / "cub", classes=2, train=4, test=2)
    common = [str(data), "--task", "dcal", "--dcal-dataset", "cub", "--model", "vit_tiny_patch16_224",
              "--model-args", json.dumps(TINY_VIT), "--img-size", "32", "--batch-size", "4", "--workers", "0",
              "--epochs", "2", "--warmup-epochs", "0.5", "--lr", "1e-3"]
    # 8 training images / batch 4: two steps an epoch; step 3 is inside the second epoch, after an evaluation
    assert train.main([*common, "--output", str(tmp_path / "whole"), "--max-steps", "3"]) == 0
    assert train.main([*common, "--output", str(tmp_path / "cut"), "--max-steps", "1"]) == 0
    assert train.main([*common, "--output", str(tmp_path / "cut"), "--max-steps", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out

    def checkpoint(run: str) -> Path:
        root = tmp_path / run / "checkpoints"
        return root / json.loads((root / "last.json").read_text())["checkpoint"]

    state = json.loads((checkpoint("whole") / "state.json").read_text())
    assert state["step"] == 3 and state["dcal"]["classes"] == ["001.Bird_1", "002.Bird_2"]
    assert {"top1", "top1_sa", "top1_glca", "val_loss"} <= set(state["metrics"])
    whole, cut = (load_file(checkpoint(r) / "model.safetensors") for r in ("whole", "cut"))
    assert {"loss_weights", "glca_block.attn.qkv.weight", "backbone.cls_token"} <= whole.keys()
    assert [k for k in whole if not torch.equal(whole[k], cut[k])] == []  # PWCA's pairs drawn alike after resume
    model = _dcal(num_classes=2)
    model.load_state_dict(whole)  # the checkpoint is a DCAL state_dict


def test_reid_mode_learns_identities_that_rank_first_in_a_gallery():
    """The synthetic task as Re-ID: the pattern is the identity; P×K batches (4 ids × 8), CE + triplet per branch;
    new query and gallery images (cameras 0/1 so that same-camera matches are left out) rank by the concatenated
    SA + GLCA embeddings."""
    model = _dcal(seed=11, local_ratio=0.3, reid=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(12)
    for _ in range(80):
        x, y, _ = _fine_grained(32, gen)
        order = y.argsort()  # P×K-like batches: every identity several times
        loss = model.loss(model(x[order]), y[order])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, ids, _ = _fine_grained(96, torch.Generator().manual_seed(13))
    cams = torch.arange(96) % 2
    with torch.no_grad():
        feats = model.predict(x)
    query = torch.arange(96) < 16
    got = reid_metrics(torch.cdist(feats[query], feats[~query]), ids[query], cams[query], ids[~query], cams[~query])
    assert got["mAP"] > 80 and got["rank1"] > 80, got  # chance: mAP about 25 (4 equally frequent identities)


def test_train_tool_runs_dcal_on_market1501(tmp_path):
    from tests.tools.conftest import load_tool

    data = _write_market(tmp_path / "market")
    out = tmp_path / "run"
    # 2 identities per batch × 2 images: one step, then the query-gallery evaluation
    assert load_tool("train").main([
        str(data), "--task", "dcal", "--dcal-dataset", "market1501", "--dcal-k", "2", "--model",
        "vit_tiny_patch16_224", "--model-args", json.dumps({**TINY_VIT, "img_size": [32, 16]}), "--batch-size", "2",
        "--workers", "0", "--epochs", "1", "--output", str(out)]) == 0
    row = (out / "log.csv").read_text().splitlines()
    metrics = dict(zip(row[0].split(","), row[1].split(","), strict=True))
    # one query (id 2, cam 1) against a gallery of one match (id 2, cam 2), one distractor and one junk image
    assert (float(metrics["mAP"]), float(metrics["rank1"])) in ((100.0, 100.0), (50.0, 0.0))
