"""The authors' mmdet/mmseg checkpoints of DaViT, L2ViT and RAVLT: their backbone loads into AttnzooBackbone
(init_cfg Pretrained) and the whole model converts to a checkpoint of an attnzoo config. The files are made here:
small models' weights written back in each authors' detection backbone layout (module names from their code)."""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mmdet", reason="the det extra is not installed")

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

import attnzoo.det  # noqa: E402, F401
from attnzoo.common import InputError  # noqa: E402
from attnzoo.det import AttnzooBackbone  # noqa: E402
from attnzoo.det.checkpoint import convert_mm_checkpoint  # noqa: E402

from ..backbones.test_davit import _to_msft_layout  # noqa: E402
from .test_configs import build  # noqa: E402

CONFIGS = Path(__file__).parents[2] / "configs"


def _ravlt_layout(state_dict: dict) -> dict:
    """Ours → qhfan/RALA detection/mmdet/models/backbones/RALA.py ``GLTA`` (no conv head, no classifier)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("conv_head.", "head.")):
            continue
        stem = re.match(r"stem\.(\d)\.(conv|bn)\.(.*)", key)
        down = re.match(r"stages\.(\d)\.downsample\.(conv|bn)\.(.*)", key)
        if stem:  # PatchEmbed.proj: conv, SyncBN, GELU, ... (an index per module, the GELUs included)
            key = f"patch_embed.proj.{3 * int(stem[1]) + (stem[2] == 'bn')}.{stem[3]}"
        elif down:  # PatchMerging at the end of the previous BasicLayer
            key = f"layers.{int(down[1]) - 1}.downsample.{'reduction' if down[2] == 'conv' else 'norm'}.{down[3]}"
        else:
            key = re.sub(r"stages\.(\d)\.blocks\.", r"layers.\1.blocks.", key)
            key = key.replace(".cpe.", ".pos.").replace(".norm1.", ".norm1.norm.").replace(
                ".norm2.", ".norm2.norm.").replace(".mlp.", ".ffn.")
            if key.endswith((".ls1.gamma", ".ls2.gamma")):
                key, value = key[:-len(".lsN.gamma")] + f".gamma_{key[-7]}", value.reshape(1, -1, 1, 1)
        out[key] = value
    for i in range(4):  # each BasicLayer's RoPE frequencies, a buffer the converter rebuilds
        out[f"layers.{i}.RoPE.angle"] = torch.ones(4)
    return out


def _l2vit_layout(state_dict: dict) -> dict:
    """Ours → ChuanyangZheng/L2ViT object_detection/mmdet/models/backbones/l2vit.py ``L2ViT`` (no final norm,
    no head)."""
    stem = {"conv1": "proj.proj.0", "norm1": "proj.proj.1", "conv2": "proj.proj.3", "norm2": "proj.proj.4",
            "norm": "norm"}
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("norm.", "head.")):
            continue
        parts = key.split(".")
        if parts[0] == "stem":
            key = f"downsample_layers.0.{stem[parts[1]]}.{parts[2]}"
        elif parts[2] == "downsample":
            key = f"downsample_layers.{parts[1]}.{'proj' if parts[3] == 'conv' else 'norm'}.{parts[4]}"
        else:  # stages.i.blocks.j.* → stages.i.j.*, the CPEs a ModuleList, the LCM `local_mp`
            rest = ".".join(parts[4:]).replace("cpe1.", "cpe.0.").replace("cpe2.", "cpe.1.").replace(
                "lcm.", "local_mp.")
            rest = re.sub(r"^cpe\.proj", "cpe.0.proj", rest)
            key = f"stages.{parts[1]}.{parts[3]}.{rest}"
        out[key] = value
    return out


def _davit_layout(state_dict: dict) -> dict:
    """Ours → dingmyu/davit mmdet/mmdet/models/backbones/davit.py ``DaViT``: the MSFT layout without the head."""
    return {k: v for k, v in _to_msft_layout(state_dict).items() if not k.startswith(("norms.", "head."))}


# per family: model name, small model arguments, the authors' layout, their output norm's key for level i,
# the levels they build norms for (None: those returned), and their norm's eps
FAMILIES = {
    "ravlt": ("ravlt_t", dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                              head_hidden_size=32), _ravlt_layout, "extra_norms.{}.norm", (0, 1, 2, 3), 1e-6),
    "l2vit": ("l2vit_tiny", dict(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
              _l2vit_layout, "norm{}", None, 1e-5),
    "davit": ("davit_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
              _davit_layout, "norm{}", (0, 1, 2, 3), 1e-5),
}


def authors_checkpoint(family: str, path: Path, out_indices=(0, 1, 2, 3), others: dict | None = None,
                       seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(our full model, its authors' output norms by level), and at ``path`` the mmdet 2.x file of both in the
    authors' layout, with ``others`` (neck, heads) beside the backbone and a meta as mmcv 1.x writes it."""
    name, kwargs, layout, norm_key, norm_levels, _ = FAMILIES[family]
    torch.manual_seed(seed)
    with torch.device("meta"):  # random weights below: the init's cost spared
        model = timm.create_model(name, **kwargs).eval()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                tensor.fill_(3)
            elif key.endswith("running_var"):
                tensor.uniform_(0.5, 2)
            else:
                tensor.normal_(0, 0.2)
    channels = model.feature_info.channels() if hasattr(model.feature_info, "channels") else \
        [f["num_chs"] for f in model.feature_info]
    norms = {i: (torch.rand(channels[i]) + 0.5, torch.randn(channels[i])) for i in (norm_levels or out_indices)}
    backbone = layout(model.state_dict())
    for i, (weight, bias) in norms.items():
        backbone[f"{norm_key.format(i)}.weight"], backbone[f"{norm_key.format(i)}.bias"] = weight, bias
    meta = dict(mmdet_version="2.28.2", CLASSES=("person", "car"), epoch=12, config="model = dict(...)",
                hook_msgs=dict(best_score=np.float64(0.41), last_ckpt="work_dirs/epoch_12.pth"))
    state_dict = {f"backbone.{k}": v for k, v in backbone.items()} | (others or {})
    torch.save(dict(meta=meta, state_dict=state_dict, optimizer=dict(state={}, param_groups=[])), path)
    return model, norms


def expected_features(family: str, model, norms: dict, x: torch.Tensor, out_indices) -> list[torch.Tensor]:
    """What the authors' backbone returns: each stage's output, layer-normed over channels with their norm."""
    eps = FAMILIES[family][5]
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    return [F.layer_norm(f.permute(0, 2, 3, 1), f.shape[1:2], *norms[i], eps).permute(0, 3, 1, 2)
            for i, f in zip(out_indices, feats, strict=True)]


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 2, 3)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_backbone_loads_the_authors_detection_checkpoint(family, out_indices, tmp_path):
    name, kwargs = FAMILIES[family][:2]
    path = tmp_path / "retinanet_1x.pth"
    model, norms = authors_checkpoint(family, path, out_indices)
    backbone = AttnzooBackbone(name, out_indices=out_indices, out_norm=True,
                               init_cfg=dict(type="Pretrained", checkpoint=str(path)), **kwargs)
    backbone.init_weights()
    backbone.eval()
    x = torch.randn(1, 3, 72, 88)  # windows that do not tile: the authors' padding
    with torch.no_grad():
        out = backbone(x)
    for o, e in zip(out, expected_features(family, model, norms, x, out_indices), strict=True):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    own = backbone.model.state_dict()
    for key, value in model.state_dict().items():  # every weight of the levels kept, by timm's names
        kept = key.replace(".", "_", 1) if key.startswith("stages.") else key
        if kept in own:
            assert torch.equal(own[kept], value), key


def test_output_norms_need_out_norm(tmp_path):
    path = tmp_path / "maskrcnn_t_1x.pth"
    authors_checkpoint("ravlt", path)
    backbone = AttnzooBackbone("ravlt_t", **FAMILIES["ravlt"][1])
    with pytest.raises(InputError, match=r"extra_norms|out_norms\.0.*out_norm=True"):
        backbone.load_pretrained(str(path))


def test_missing_and_unknown_keys_are_named(tmp_path):
    path = tmp_path / "uper_t_2x.pth"
    authors_checkpoint("l2vit", path)
    checkpoint = torch.load(path, weights_only=False)
    state_dict = checkpoint["state_dict"]
    del state_dict["backbone.stages.1.1.local_mp.conv1.weight"]
    state_dict["backbone.stages.1.1.extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, path)
    backbone = AttnzooBackbone("l2vit_tiny", out_norm=True, **FAMILIES["l2vit"][1])
    with pytest.raises(InputError, match=r"(?s)uper_t_2x\.pth does not fit.*missing.*"
                                         r"model\.stages_1\.blocks\.1\.lcm\.conv1\.weight.*not in the model.*"
                                         r"stages\.1\.blocks\.1\.extra\.weight"):
        backbone.load_pretrained(str(path))


def test_a_checkpoint_of_an_attnzoo_config_loads_its_backbone_as_it_is(tmp_path):
    trained = AttnzooBackbone("maxvit_tiny_tf_224", out_indices=(1, 2), out_norm=True, img_size=64)
    path = tmp_path / "epoch_12.pth"
    torch.save(dict(meta={}, state_dict={f"backbone.{k}": v for k, v in trained.state_dict().items()}), path)
    backbone = AttnzooBackbone("maxvit_tiny_tf_224", out_indices=(1, 2), out_norm=True, img_size=64,
                               init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    for key, value in trained.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


def test_a_family_without_a_detection_converter_is_refused(tmp_path):
    path = tmp_path / "x.pth"
    torch.save(dict(state_dict={"backbone.stem.weight": torch.zeros(1)}), path)
    with pytest.raises(InputError, match="no converter of its authors' detection layout"):
        AttnzooBackbone("maxvit_tiny_tf_224", out_indices=(1,)).load_pretrained(str(path))


@functools.cache
def _config(path: str) -> Config:
    return Config.fromfile(CONFIGS / path)  # a few seconds each: mmengine formats the merged text


def small_config(path: str, family: str) -> Config:
    """The config with the family's small backbone and narrow necks and heads (32 channels)."""
    cfg = copy.deepcopy(_config(path))
    cfg.model.backbone.update(FAMILIES[family][1], out_norm=True, init_cfg=None)
    with torch.device("meta"):
        channels = list(AttnzooBackbone(**{k: v for k, v in cfg.model.backbone.items() if k != "type"}).out_channels)
    if "neck" in cfg.model:  # RetinaNet
        cfg.model.neck.update(in_channels=channels, out_channels=32)
        cfg.model.bbox_head.update(in_channels=32, feat_channels=32, stacked_convs=1)
    else:  # UPerNet
        cfg.model.decode_head.update(in_channels=channels, channels=32)
        cfg.model.auxiliary_head.update(in_channels=channels[2], channels=32)
    return cfg


# per family an attnzoo config of a detector or a segmentor
WHOLE = {
    "ravlt": "ravlt/retinanet_ravlt-t_fpn_1x_coco.py",
    "l2vit": "l2vit/retinanet_l2vit-t_fpn_ms-crop-1x_coco.py",
    "davit": "davit/upernet_davit-t_8xb2-160k_ade20k-512x512.py",
}


@pytest.mark.parametrize("family", list(WHOLE))
def test_whole_model_converts_to_a_checkpoint_of_the_config(family, tmp_path):
    cfg = small_config(WHOLE[family], family)
    torch.manual_seed(1)
    reference = build(cfg)  # its neck and heads stand for the authors' (mmdet 2.x names them alike)
    others = {k: v for k, v in reference.state_dict().items() if not k.startswith("backbone.")}
    out_indices = tuple(cfg.model.backbone.out_indices)
    model, norms = authors_checkpoint(family, tmp_path / "authors.pth", out_indices, others)
    converted = convert_mm_checkpoint(cfg, tmp_path / "authors.pth", tmp_path / "converted.pth")

    torch.manual_seed(2)
    detector = build(cfg).eval()
    checkpoint = load_checkpoint(detector, str(converted), map_location="cpu", strict=True)
    assert checkpoint["meta"]["dataset_meta"] == dict(classes=("person", "car"))
    own = detector.state_dict()
    for key, value in others.items():
        assert torch.equal(own[key], value), key
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        out = detector.backbone(x)
    for o, e in zip(out, expected_features(family, model, norms, x, out_indices), strict=True):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def test_whole_model_conversion_names_what_does_not_fit(tmp_path):
    cfg = small_config(WHOLE["ravlt"], "ravlt")
    authors_checkpoint("ravlt", tmp_path / "authors.pth", (1, 2, 3), {"neck.lateral_convs.0.conv.weight":
                                                                     torch.zeros(1)})
    with pytest.raises(InputError, match=r"(?s)authors\.pth does not fit.*missing.*neck\.fpn_convs.*shape.*"
                                         r"neck\.lateral_convs\.0\.conv\.weight \(1,\) vs \(32, 32, 1, 1\)"):
        convert_mm_checkpoint(cfg, tmp_path / "authors.pth", tmp_path / "converted.pth")
    assert not (tmp_path / "converted.pth").exists()


def test_convert_tool_writes_what_eval_loads_and_refuses_other_files(tmp_path, capsys):
    from ..tools.conftest import load_tool

    convert = load_tool("convert")
    cfg = small_config(WHOLE["ravlt"], "ravlt")
    cfg.dump(tmp_path / "config.py")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build(cfg).state_dict().items() if not k.startswith("backbone.")}
    others = {k: torch.randn(shape) for k, shape in shapes.items()}  # the neck and head: no BatchNorm
    model, norms = authors_checkpoint("ravlt", tmp_path / "retinanet_t_1x_12_epoch.pth", (1, 2, 3), others)
    assert convert.main(["--det", str(tmp_path / "config.py"), str(tmp_path / "retinanet_t_1x_12_epoch.pth"),
                         "--out", str(tmp_path / "out.pth")]) == 0
    state_dict = torch.load(tmp_path / "out.pth", weights_only=True)["state_dict"]
    torch.testing.assert_close(state_dict["backbone.out_norms.0.weight"], norms[1][0])
    torch.testing.assert_close(state_dict["backbone.model.stages_3.blocks.0.attn.qkvo.weight"],
                               model.stages[3].blocks[0].attn.qkvo.weight)
    torch.testing.assert_close(state_dict["bbox_head.retina_cls.weight"], others["bbox_head.retina_cls.weight"])
    torch.save({"model": model.state_dict()}, tmp_path / "classification.pth")
    assert convert.main(["--det", str(tmp_path / "config.py"), str(tmp_path / "classification.pth"),
                         "--out", str(tmp_path / "other.pth")]) == 2
    assert "is not an mmdet/mmseg checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "other.pth").exists()
