"""AttnzooBackbone: parity with timm's features_only model, freezing, checkpointing, pretrained loading, errors."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("mmdet", reason="the det extra is not installed")

import timm  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo.det import AttnzooBackbone  # noqa: E402

# a narrow DaViT (timm kwargs pass through the wrapper) keeps these tests fast on the CPU
SMALL = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))


def test_features_match_timm_features_only_with_same_weights():
    backbone = AttnzooBackbone("davit_tiny", out_indices=(1, 3), **SMALL).eval()
    reference = timm.create_model("davit_tiny", features_only=True, out_indices=(1, 3), **SMALL).eval()
    reference.load_state_dict(backbone.model.state_dict())
    x = torch.randn(1, 3, 72, 88)  # not a multiple of the window: DaViT pads
    with torch.no_grad():
        out, ref = backbone(x), reference(x)
    assert backbone.out_channels == (32, 128) and backbone.out_strides == (8, 32)
    assert [o.shape[1:] for o in out] == [(32, 9, 11), (128, 3, 3)]
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r)


def test_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    assert DET.get("AttnzooBackbone") is AttnzooBackbone and SEG.get("AttnzooBackbone") is AttnzooBackbone


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_frozen_stages_get_no_gradient_and_stay_in_eval(frozen_stages):
    backbone = AttnzooBackbone("davit_tiny", frozen_stages=frozen_stages, **SMALL).train()
    frozen = {"stem"} | {f"stages_{i}" for i in range(frozen_stages)}
    for name, module in backbone.model.named_children():
        params = list(module.parameters())
        assert all(not p.requires_grad for p in params) == (name in frozen or not params), name
        assert module.training == (name not in frozen), name
    sum(o.sum() for o in backbone(torch.randn(1, 3, 64, 64))).backward()
    assert backbone.model.stem.conv.weight.grad is None
    assert backbone.model.stages_3.downsample.conv.weight.grad is not None


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = AttnzooBackbone("davit_tiny", out_indices=(0, 1, 2, 3), **SMALL)
    checkpointed = AttnzooBackbone("davit_tiny", out_indices=(0, 1, 2, 3), with_cp=True, **SMALL)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for m in (plain, checkpointed):
        sum(o.square().mean() for o in m(x)).backward()
        grads.append(m.model.stages_0.blocks[0][0].attn.qkv.weight.grad)
    assert checkpointed.model.grad_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


def _classifier_weights(name):
    return timm.create_model(name, **SMALL).state_dict()


def test_pretrained_from_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    weights = _classifier_weights("davit_tiny")
    path = tmp_path / "davit_tiny.safetensors"
    save_file(weights, str(path))
    backbone = AttnzooBackbone("davit_tiny", init_cfg=dict(type="Pretrained", checkpoint=str(path)), **SMALL)
    assert not torch.equal(backbone.model.stem.conv.weight, weights["stem.conv.weight"])
    backbone.init_weights()
    torch.testing.assert_close(backbone.model.stem.conv.weight, weights["stem.conv.weight"])
    torch.testing.assert_close(backbone.model.stages_3.blocks[0][1].attn.qkv.weight,
                               weights["stages.3.blocks.0.1.attn.qkv.weight"])


def test_pretrained_from_pth_file_loads_weights_only(tmp_path):
    weights = _classifier_weights("davit_tiny")
    path = tmp_path / "davit_tiny.pth"
    torch.save({"state_dict": weights, "epoch": 3}, path)
    backbone = AttnzooBackbone("davit_tiny", init_cfg=dict(type="Pretrained", checkpoint=str(path)), **SMALL)
    backbone.init_weights()
    torch.testing.assert_close(backbone.model.stem.conv.weight, weights["stem.conv.weight"])


def test_pretrained_from_timm_tag_offline(offline_hub):
    weights = _classifier_weights("davit_tiny")
    offline_hub("timm/davit_tiny.msft_in1k", weights)
    backbone = AttnzooBackbone(
        "davit_tiny", init_cfg=dict(type="Pretrained", checkpoint="timm/davit_tiny.msft_in1k"), **SMALL)
    backbone.init_weights()
    torch.testing.assert_close(backbone.model.stages_1.downsample.conv.weight,
                               weights["stages.1.downsample.conv.weight"])


def test_bad_arguments_name_model_and_argument():
    with pytest.raises(ValueError, match="`model_name`='davit_tinyy' is not a timm model"):
        AttnzooBackbone("davit_tinyy")
    with pytest.raises(ValueError, match=r"AttnzooBackbone\(davit_tiny\): `out_indices`=\(2, 5\) is out of range"):
        AttnzooBackbone("davit_tiny", out_indices=(2, 5), **SMALL)
    with pytest.raises(ValueError, match=r"`frozen_stages`=5 exceeds its 4 stages"):
        AttnzooBackbone("davit_tiny", frozen_stages=5, **SMALL)
    backbone = AttnzooBackbone(
        "davit_tiny", init_cfg=dict(type="Pretrained", checkpoint="maxvit_tiny_tf_224.in1k"), **SMALL)
    with pytest.raises(ValueError, match="checkpoint='maxvit_tiny_tf_224.in1k' is neither an existing file"):
        backbone.init_weights()


def test_triton_backend_runs_the_fused_window_kernel():
    backbone = AttnzooBackbone("davit_tiny", out_indices=(0,), **SMALL).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = backbone(x)[0]
        with attnzoo.kernels.use_backend("triton"), attnzoo.kernels.trace() as calls:
            out = backbone(x)[0]
    assert ("window_attention", "triton") in calls
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
