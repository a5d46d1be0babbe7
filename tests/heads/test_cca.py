"""Conditional cross-attention: the head (batched conditions, attention parity, a two-attribute task it learns),
the loss and metrics on hand-computed cases, the ASEN++/CSN data adapters, and ``tools/train.py --task cca``."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from attnzoo.common import InputError
from attnzoo.data.asen import AttributeImages, Attributes, AttributeTriplets, ZapposTriplets, read_attributes
from attnzoo.heads.cca import (
    ConditionalCrossAttention,
    attribute_map,
    average_precision,
    mean_average_precision,
    triplet_accuracy,
    triplet_ranking_loss,
)

from ..tools.conftest import load_tool

TINY_VIT = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)


def tiny_cca(num_attributes: int = 2) -> ConditionalCrossAttention:
    return ConditionalCrossAttention("vit_tiny_patch16_224", num_attributes, embed_dim=16, num_heads=2,
                                     backbone_kwargs=dict(img_size=SIZE, **TINY_VIT))


# ------------------------------------------------------------------------------------------- synthetic images

SIZE = 24
SHAPES = ("disk", "bar", "small square")  # unlike in area, so that shape is not only a matter of corners
COLOURS = np.array([[250, 140, 140], [140, 250, 140], [140, 140, 250]], dtype=float)  # light red, green, blue


def draw(rng: np.random.Generator, shape: int, colour: int, size: int = SIZE) -> np.ndarray:
    """A dark noisy square with one light shape of one colour near its centre, [size, size, 3] uint8."""
    img = rng.normal(90, 12, (size, size, 3))
    r = rng.uniform(0.3, 0.37) * size
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    yy, xx = np.mgrid[:size, :size] + 0.5
    dx, dy = xx - cx, yy - cy
    mask = (dx ** 2 + dy ** 2 < r ** 2,  # area 3.1 r^2
            (abs(dx) < r) & (abs(dy) < 0.35 * r),  # 1.4 r^2
            np.maximum(abs(dx), abs(dy)) < 0.45 * r)[shape]  # 0.8 r^2
    img[mask] = COLOURS[colour] + rng.normal(0, 15, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def shapes_and_colours(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 3, S, S] in [-1, 1] and their (shape, colour) labels [n, 2], both uniform and independent."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (n, 2))
    images = np.stack([draw(rng, s, c) for s, c in labels])
    return torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.tensor(labels)


# ----------------------------------------------------------------------------------------------------- the head


def test_batched_conditions_equal_single_condition_forwards():
    torch.manual_seed(0)
    model = tiny_cca(num_attributes=3).eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        every = model(x)  # [B, A, E], the three condition queries in one cross-attention
        assert every.shape == (4, 3, 16)
        torch.testing.assert_close(every.norm(dim=-1), torch.ones(4, 3))
        for a in range(3):  # one query per image, A separate passes
            torch.testing.assert_close(model(x, torch.full((4,), a)), every[:, a], rtol=1e-5, atol=1e-6)
        mixed = torch.tensor([2, 0, 1, 2])
        torch.testing.assert_close(model(x, mixed), every[torch.arange(4), mixed], rtol=1e-5, atol=1e-6)
    # gradients flow into the condition embeddings, the block and the backbone
    model(x, mixed).sum().backward()
    assert model.conditions.weight.grad[[0, 1, 2]].abs().sum(-1).gt(0).all()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_cross_attention_matches_torch_multihead_attention_with_the_same_weights():
    torch.manual_seed(0)
    block = tiny_cca().block.eval()
    for p in block.parameters():  # away from the init so that the biases and norms take part
        torch.nn.init.normal_(p, std=0.3)
    query, tokens = torch.randn(2, 3, 32), torch.randn(2, 10, 32)
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([block.q.weight, block.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([block.q.bias, block.kv.bias]))
        mha.out_proj.load_state_dict(block.proj.state_dict())
        kv = block.norm_kv(tokens)
        x = query + mha(block.norm_q(query), kv, kv, need_weights=False)[0]
        expected = x + block.mlp(block.norm_mlp(x))
        torch.testing.assert_close(block(query, tokens), expected, rtol=1e-5, atol=1e-5)


def test_cnn_backbone_feature_map_becomes_tokens():
    torch.manual_seed(0)
    model = ConditionalCrossAttention("resnet10t", 2, embed_dim=8, num_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.tokens(x)
        assert tokens.shape == (2, 1, 512)  # 32 px / stride 32 = 1 x 1 positions of 512 channels
        fmap = model.backbone.forward_features(x)
        torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))
        assert model(x).shape == (2, 2, 8)


def test_bad_input_is_named():
    model = tiny_cca()
    with pytest.raises(ValueError, match=r"attributes has shape \(2, 1\); expected \[2\]"):
        model(torch.randn(2, 3, SIZE, SIZE), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="num_heads=3 must divide the backbone's width 32"):
        ConditionalCrossAttention("vit_tiny_patch16_224", 2, num_heads=3,
                                  backbone_kwargs=dict(img_size=SIZE, **TINY_VIT))


def test_each_attribute_embedding_ranks_by_its_own_attribute_and_ignores_the_other():
    """Shape (3 values) and colour (3 values), independent; triplets drawn per attribute as ASEN++ draws them."""
    images, labels = shapes_and_colours(600, seed=0)
    val_images, val_labels = shapes_and_colours(120, seed=1)
    torch.manual_seed(0)
    model = tiny_cca()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        attribute = torch.randint(0, 2, (32,), generator=g)
        value = labels[:, attribute].T  # [32, N]: each image's value of the triplet's attribute
        anchor = torch.randint(len(images), (32,), generator=g)
        same = value == value[torch.arange(32), anchor][:, None]
        same[torch.arange(32), anchor] = False
        positive = torch.multinomial(same.float(), 1, generator=g).squeeze(1)
        negative = torch.multinomial((~same).float().index_put((torch.arange(32), anchor), torch.tensor(0.0)), 1,
                                     generator=g).squeeze(1)
        embeddings = model(torch.cat([images[anchor], images[positive], images[negative]]), attribute.repeat(3))
        loss = triplet_ranking_loss(*embeddings.chunk(3), margin=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
    model.eval()
    with torch.no_grad():
        every = model(val_images)  # [120, 2, 16]
    queries, candidates = slice(0, 40), slice(40, None)

    def map_of(embedding: torch.Tensor, attribute: int) -> float:
        return mean_average_precision(embedding[queries], embedding[candidates], val_labels[queries, attribute],
                                      val_labels[candidates, attribute])

    # chance: the mAP of rankings that know nothing (random embeddings, averaged over draws), about 0.37 here
    chance = [np.mean([map_of(torch.randn(120, 16, generator=g), a) for _ in range(20)]) for a in range(2)]
    shape_by_shape, shape_by_colour = map_of(every[:, 0], 0), map_of(every[:, 0], 1)
    colour_by_colour, colour_by_shape = map_of(every[:, 1], 1), map_of(every[:, 1], 0)
    report = dict(shape_by_shape=shape_by_shape, shape_by_colour=shape_by_colour, colour_by_colour=colour_by_colour,
                  colour_by_shape=colour_by_shape, chance=chance)
    assert shape_by_shape > chance[0] + 0.5 and colour_by_colour > chance[1] + 0.5, report
    assert shape_by_colour < chance[1] + 0.1, report  # the shape embedding ignores colour
    # the colour embedding keeps a trace of shape (a small square shows less colour than a disk), far below what
    # the shape embedding knows of it
    assert colour_by_shape < chance[0] + 0.2 and colour_by_shape < shape_by_shape - 0.4, report


# ---------------------------------------------------------------------------------------------- loss, metrics


def test_triplet_ranking_loss_by_hand():
    anchor = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    positive = torch.tensor([[0.6, 0.8], [0.0, 3.0]])  # cos 0.6; cos 0
    negative = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # cos 0;   cos 1/sqrt(2)
    # max(0, 0.2 - 0.6 + 0) = 0 and max(0, 0.2 - 0 + 0.70711) = 0.90711; mean 0.45355
    loss = triplet_ranking_loss(anchor, positive, negative, margin=0.2)
    assert loss.item() == pytest.approx((0.2 + 1 / math.sqrt(2)) / 2, abs=1e-6)


def test_triplet_accuracy_by_hand():
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    positive = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 1.0]])  # cos 0.995, 0, 0.707
    negative = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, -1.0]])  # cos 0,     1, 0.707 (a tie counts as wrong)
    assert triplet_accuracy(anchor, positive, negative) == pytest.approx(1 / 3)


def test_average_precision_by_hand():
    # relevant at ranks 1, 3, 6: precisions 1/1, 2/3, 3/6 -> AP = (1 + 0.6667 + 0.5) / 3 = 0.7222
    assert average_precision(torch.tensor([1, 0, 1, 0, 0, 1])).item() == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    # a batch of rankings; nothing relevant gives 0 (ASEN++'s APScorer)
    torch.testing.assert_close(average_precision(torch.tensor([[0, 1, 1], [0, 0, 0]])),
                               torch.tensor([(1 / 2 + 2 / 3) / 2, 0.0]))


def test_mean_average_precision_by_hand():
    candidates = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    candidate_values = torch.tensor([0, 1, 0, 1])
    queries = torch.tensor([[1.0, 0.0], [-0.1, 1.0]])
    query_values = torch.tensor([0, 1])
    # query 0, value 0: dot products 1, 0.8, 0, -1 -> ranking c0 (hit), c1, c2 (hit), c3: AP = (1/1 + 2/3) / 2
    # query 1, value 1: dot products -0.1, 0.52, 1, 0.1 -> ranking c2, c1 (hit), c3 (hit), c0: AP = (1/2 + 2/3) / 2
    expected = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2  # 0.70833
    assert mean_average_precision(queries, candidates, query_values, candidate_values) == pytest.approx(expected)


def test_attribute_map_weights_attributes_by_their_queries():
    # attribute 0: the two queries and four candidates of test_mean_average_precision_by_hand, mAP 0.70833;
    # attribute 1: one query (1, 0) of value 0 over candidates (1, 0) value 0 and (0, 1) value 1, AP 1.
    # Candidates of the other attribute never enter a ranking (the -1 x 3 candidate of attribute 1 would be
    # ranked first by attribute 0's query 1 otherwise).
    q = torch.tensor([[1.0, 0.0], [-0.1, 1.0], [1.0, 0.0]])
    q_attr, q_val = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    c = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 3.0]])
    c_attr, c_val = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    total, per_attribute = attribute_map(q, q_attr, q_val, c, c_attr, c_val, num_attributes=3)
    map0 = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert per_attribute == pytest.approx({0: map0, 1: 1.0})  # attribute 2 has no query: left out
    assert total == pytest.approx((2 * map0 + 1 * 1.0) / 3)  # 0.80556


# ------------------------------------------------------------------------------------------------ data adapters

ATTRIBUTES = Attributes(("shape", "colour"), (3, 3))


def write_asen(root: Path, n_train: int = 12, n_eval: int = 8, size: int = 16, seed: int = 0) -> Path:
    """A tiny ASEN++ ``data`` folder: meta.json and FashionAI/ with the index files and images of shapes."""
    rng = np.random.default_rng(seed)
    folder = root / "FashionAI"
    (folder / "img").mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(
        {"FashionAI": {"ATTRIBUTES": ["shape", "colour"], "ATTRIBUTES_NUM": {"shape": 3, "colour": 3}}}))

    def images(split: str, n: int) -> list[tuple[int, int]]:
        labels = [(i % 3, (i // 3) % 3) for i in range(n)]  # every value of each attribute, several times
        for i, (s, c) in enumerate(labels):
            Image.fromarray(draw(rng, s, c, size)).save(folder / "img" / f"{split}_{i}.png")
        (folder / f"filenames_{split}.txt").write_text("".join(f"img/{split}_{i}.png\n" for i in range(n)))
        return labels

    train = images("train", n_train)
    (folder / "label_train.txt").write_text("".join(f"{i} 0 {s} 1 {c}\n" for i, (s, c) in enumerate(train)))
    for split in ("valid", "test"):
        labels = images(split, n_eval)
        half = n_eval // 2
        for name, rows in (("query", range(half)), ("candidate", range(half, n_eval))):
            (folder / f"{name}_{split}.txt").write_text(
                "".join(f"{i} {a} {labels[i][a]}\n" for i in rows for a in (0, 1)))
    return root


def test_attributes_from_meta_json_and_asenpp_yaml(tmp_path):
    root = write_asen(tmp_path)
    (tmp_path / "FashionAI.yaml").write_text(
        "DATA:\n  DATASET: FashionAI\n  ATTRIBUTES:\n    NAME:\n      - shape\n      - colour\n    NUM: [3, 3]\n")
    assert read_attributes(root / "meta.json", "FashionAI") == ATTRIBUTES
    assert read_attributes(tmp_path / "FashionAI.yaml", "FashionAI") == ATTRIBUTES


def test_training_triplets_follow_the_attribute(tmp_path):
    root = write_asen(tmp_path)
    data = AttributeTriplets(root / "FashionAI", ATTRIBUTES, num_triplets=50)
    labels = {i: tuple(map(int, line.split()[2::2]))
              for i, line in enumerate((root / "FashionAI" / "label_train.txt").read_text().splitlines())}
    seen = set()
    for seed in range(200):
        random.seed(seed)
        anchor, positive, negative, a = data.draw()
        random.seed(seed)
        assert data.draw() == (anchor, positive, negative, a)  # a function of the seed tools/train.py sets
        assert anchor != positive and labels[anchor][a] == labels[positive][a] != labels[negative][a]
        seen.add(a)
    assert seen == {0, 1}
    random.seed(0)
    *images, a = data[0]
    assert len(data) == 50 and all(img.size == (16, 16) and img.mode == "RGB" for img in images)


def test_evaluation_images_are_the_queries_then_the_candidates(tmp_path):
    root = write_asen(tmp_path)
    data = AttributeImages(root / "FashionAI", ATTRIBUTES, "test")
    assert (len(data), data.num_queries) == (16, 8)  # 4 query images x 2 attributes, the same for candidates
    img, a, v, is_query = data[9]  # candidate row 2: image 5 (shape 2, colour 1) under attribute 1
    assert (a, v, is_query, img.size) == (1, 1, False, (16, 16))
    assert data[0][1:] == (0, 0, True)


def test_zappos_triplets_put_the_close_image_second(tmp_path):
    (tmp_path / "ut-zap50k-images" / "Shoes").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "ut-zap50k-images" / "Shoes" / f"{i}.jpg")
    (tmp_path / "filenames.json").write_text("".join(f"Shoes/{i}.jpg\n" for i in range(4)))
    (tmp_path / "tripletlists").mkdir()
    for condition in ("class", "closure", "gender", "heel"):
        (tmp_path / "tripletlists" / f"{condition}_tripletlist_val.txt").write_text("0 1 2\n" if condition == "heel"
                                                                                     else "3 2 1\n")
    data = ZapposTriplets(tmp_path, "val")
    # "a b c": a is closer to c than to b, so (anchor, positive, negative) = (a, c, b)
    assert data.triplets == [(3, 1, 2, 0), (3, 1, 2, 1), (3, 1, 2, 2), (0, 2, 1, 3)]
    anchor, positive, negative, c = data[3]
    assert c == 3 and [img.getpixel((0, 0))[0] for img in (anchor, positive, negative)] == [0, 120, 60]
    assert len(ZapposTriplets(tmp_path, "val", num_triplets=2)) == 2


@pytest.mark.parametrize("file, text, message", [
    ("label_train.txt", "0 0 1 1\n", r"label_train.txt line 1: '0 0 1 1' is not 'image attribute value"),
    ("label_train.txt", "0 0 x\n", r"label_train.txt line 1: '0 0 x' is not"),
    ("label_train.txt", "0 0 1\n0 1 7\n", r"label_train.txt line 2: value 7 of attribute 1 \(colour\) is outside 0..2"),
    ("label_train.txt", "0 2 1\n", r"label_train.txt line 1: attribute 2 is outside 0..1"),
    ("label_train.txt", "12 0 1\n", r"label_train.txt line 1: image index 12 is outside the 12 images"),
    ("query_valid.txt", "0 0 1 1\n", r"query_valid.txt line 1: '0 0 1 1' is not 'image attribute value'"),
    ("candidate_valid.txt", "", r"candidate_valid.txt lists no images"),
    ("filenames_train.txt", None, r"filenames_train.txt does not exist"),
    ("query_valid.txt", None, r"query_valid.txt does not exist"),
])
def test_malformed_asen_files_are_named_with_their_line(tmp_path, file, text, message):
    root = write_asen(tmp_path)
    path = root / "FashionAI" / file
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    with pytest.raises(InputError, match=message):
        AttributeTriplets(root / "FashionAI", ATTRIBUTES, 10)
        AttributeImages(root / "FashionAI", ATTRIBUTES, "valid")


def test_malformed_attribute_files_and_missing_images(tmp_path):
    root = write_asen(tmp_path)
    with pytest.raises(InputError, match=r"meta.json has no entry 'DARN' \(it has \['FashionAI'\]\)"):
        read_attributes(root / "meta.json", "DARN")
    (root / "bad.json").write_text('{"FashionAI": {"ATTRIBUTES": ["shape"]}}')
    with pytest.raises(InputError, match=r"bad.json: malformed attribute file \(KeyError"):
        read_attributes(root / "bad.json", "FashionAI")
    (root / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"bad.json: malformed attribute file \(JSONDecodeError"):
        read_attributes(root / "bad.json", "FashionAI")
    with pytest.raises(InputError, match=r"attribute file .*missing.yaml does not exist"):
        read_attributes(root / "missing.yaml", "FashionAI")
    (root / "FashionAI" / "img" / "valid_0.png").unlink()
    data = AttributeImages(root / "FashionAI", ATTRIBUTES, "valid")
    with pytest.raises(InputError, match=r"image .*valid_0.png \(listed in .*filenames_valid.txt\) does not exist"):
        data[0]
    (root / "FashionAI" / "label_train.txt").write_text("0 0 1\n1 0 2\n")  # one image per value: no positive pair
    with pytest.raises(InputError, match="no training triplet can be drawn"):
        AttributeTriplets(root / "FashionAI", ATTRIBUTES, 10)


# ----------------------------------------------------------------------------------------------- tools/train.py


def test_train_tool_writes_a_checkpoint_and_resumes_exactly(tmp_path, capsys):
    train = load_tool("train")
    data = write_asen(tmp_path / "data", size=32)
    vit = ["--model", "vit_tiny_patch16_224", "--model-args", json.dumps({"img_size": 32, **TINY_VIT})]
    common = [str(data), "--task", "cca", *vit, "--img-size", "32", "--batch-size", "4", "--workers", "0",
              "--warmup-epochs", "0.5", "--epochs", "2", "--cca-triplets", "8", "--cca-embed-dim", "16",
              "--cca-heads", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train.main([*common, "--output", str(whole)]) == 0
    assert train.main([*common, "--output", str(split), "--max-steps", "3"]) == 0  # stops inside epoch 2
    assert train.main([*common, "--output", str(split), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out

    def checkpoint(run: Path) -> Path:
        return run / "checkpoints" / json.loads((run / "checkpoints" / "last.json").read_text())["checkpoint"]

    a, b = load_file(checkpoint(whole) / "model.safetensors"), load_file(checkpoint(split) / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    state = json.loads((checkpoint(whole) / "state.json").read_text())
    assert (state["step"], state["cca"]["attributes"], state["cca"]["num_values"]) == (4, ["shape", "colour"], [3, 3])
    rows = (whole / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3 and {"mAP", "mAP_shape", "mAP_colour"} <= set(header)
    assert 0 < float(rows[2].split(",")[header.index("mAP")]) <= 100
    model = ConditionalCrossAttention(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32,
                                                        **TINY_VIT), 2, embed_dim=16, num_heads=2)
    model.load_state_dict(a)  # strict: the checkpoint is exactly the head on its backbone
