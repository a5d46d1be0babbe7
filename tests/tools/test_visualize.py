"""tools/visualize.py: feature-map and attention-map PNGs; the recorded attention is a real softmax and
recording leaves the model's output unchanged."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image

from attnzoo.hub import save_hub_folder

from .conftest import TINY_DAVIT, load_tool

visualize = load_tool("visualize")


def test_feature_and_attention_pngs(shapes, tmp_path, capsys):
    model = timm.create_model("davit_tiny", num_classes=5, **json.loads(TINY_DAVIT[3]))
    hub = save_hub_folder(model, tmp_path / "hub", data_config={"input_size": (3, 32, 32)})
    image = next((shapes / "val" / "star").glob("*.png"))
    out = tmp_path / "vis"
    assert visualize.main([f"local-dir:{hub}", str(image), "--out", str(out)]) == 0
    features = sorted((out / "features").glob("*.png"))
    attention = sorted((out / "attention").glob("*.png"))
    assert len(features) == len(model.feature_info)  # one per features_only level
    assert len(attention) == 4  # one spatial (window) attention block per stage
    for png in features + attention:
        assert Image.open(png).size[0] > 0
    assert visualize.main([f"local-dir:{hub}", str(tmp_path / "none.png"), "--out", str(out)]) == 2
    assert "image" in capsys.readouterr().err


def test_recorded_attention_is_the_softmax_and_changes_nothing():
    model = timm.create_model("davit_tiny", num_classes=5, window_padding="masked",
                              **json.loads(TINY_DAVIT[3])).eval()
    x = torch.randn(1, 3, 40, 40)  # 10x10 tokens in stage 1: windows of 7 are padded, keys masked
    with torch.no_grad():
        plain = model(x)
        with visualize.record_window_attention() as maps:
            recorded = model(x)
    assert torch.equal(plain, recorded) and len(maps) == 4
    for attn in maps:
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    # stage 1 (10x10 tokens in 7x7 windows): the last window holds 3x3 real tokens, the other keys get no weight
    last = maps[0][-1]
    assert (last > 0).any(-2).sum() == 9


# one model of every family, at a small size where the family takes any size
FAMILIES = [("davit_tiny", 64), ("maxvit_tiny_tf_224", None), ("halonet26t", None), ("l2vit_tiny", 64),
            ("ravlt_t", 64), ("sparsifiner_deit_small_patch16_224", None), ("ninformer_cifar", None),
            ("ela_t_resnet18", 64), ("ulsam_mobilenetv1_100", 64)]


@pytest.mark.parametrize("name,size", FAMILIES)
def test_random_weights_for_every_family(name, size, shapes, tmp_path):
    """--no-pretrained builds the model and its features_only twin from one seed (their key names differ by
    family, so copying the state_dict across failed for L2ViT, RAVLT, NiNformer, ...)."""
    image = next((shapes / "val" / "star").glob("*.png"))
    out = tmp_path / "vis"
    argv = [name, str(image), "--out", str(out), "--no-pretrained"] + (["--img-size", str(size)] if size else [])
    assert visualize.main(argv) == 0
    levels = len(timm.create_model(name, features_only=True).feature_info.channels())
    assert len(list((out / "features").glob("*.png"))) == levels
