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


# a two-block Sparsifiner (a plain ViT: every feature level is a block at stride 16)
VIT = dict(img_size=48, depth=2, embed_dim=32, num_heads=2, basis_topk=1)


def test_plain_vit_frozen_stages_freeze_embeddings_and_first_blocks():
    backbone = AttnzooBackbone("sparsifiner_deit_small_patch16_224", out_indices=(1,), frozen_stages=1, **VIT).train()
    vit = backbone.model.model
    assert backbone.out_channels == (32,) and backbone.out_strides == (16,)
    frozen = [vit.cls_token, vit.pos_embed, *vit.patch_embed.parameters(), *vit.blocks[0].parameters()]
    assert all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in vit.blocks[1].parameters())
    assert not vit.blocks[0].training and vit.blocks[1].training
    backbone(torch.randn(2, 3, 48, 48))[0].sum().backward()
    assert vit.pos_embed.grad is None and vit.blocks[0].attn.qkv.weight.grad is None
    assert vit.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"`frozen_stages`=3 exceeds its 2 blocks"):
        AttnzooBackbone("sparsifiner_deit_small_patch16_224", out_indices=(1,), frozen_stages=3, **VIT)


def test_plain_vit_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = AttnzooBackbone("sparsifiner_deit_small_patch16_224", out_indices=(0, 1), **VIT)
    checkpointed = AttnzooBackbone("sparsifiner_deit_small_patch16_224", out_indices=(0, 1), with_cp=True, **VIT)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.model.model.grad_checkpointing and not plain.model.model.grad_checkpointing
    x = torch.randn(1, 3, 48, 48)
    grads = []
    for m in (plain, checkpointed):
        sum(o.square().mean() for o in m(x)).backward()
        grads.append(m.model.model.blocks[0].mlp.fc1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_norm_eval_keeps_batchnorm_statistics_while_training():
    x = torch.randn(2, 3, 64, 64)
    for norm_eval in (False, True):
        backbone = AttnzooBackbone("ela_s_resnet18", out_indices=(1, 2), norm_eval=norm_eval).train()
        bn = backbone.model.layer2[0].bn1
        before = bn.running_mean.clone()
        backbone(x)
        assert torch.equal(bn.running_mean, before) == norm_eval
        assert backbone.model.layer2.training  # only the BatchNorm layers switch to eval
        assert bn.weight.requires_grad  # their affine parameters still train, as in mmdet's ResNet


def test_out_norm_is_a_layer_norm_over_channels_of_each_output():
    plain = AttnzooBackbone("davit_tiny", out_indices=(1, 3), **SMALL).eval()
    normed = AttnzooBackbone("davit_tiny", out_indices=(1, 3), out_norm=True, **SMALL).eval()
    normed.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        normed.out_norms[1].weight.uniform_(0.5, 1.5)
        normed.out_norms[1].bias.uniform_(-1, 1)
        x = torch.randn(1, 3, 64, 64)
        out, ref = normed(x), plain(x)
    for o, r, norm in zip(out, ref, normed.out_norms, strict=True):
        expected = torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), (r.shape[1],), norm.weight, norm.bias,
                                                  norm.eps).permute(0, 3, 1, 2)
        torch.testing.assert_close(o, expected)


@pytest.mark.parametrize("model_name,eps", [("l2vit_tiny", 1e-5), ("ravlt_t", 1e-6), ("davit_tiny", 1e-5)])
def test_out_norm_takes_the_authors_eps(model_name, eps):
    """L2ViT's and DaViT's authors build nn.LayerNorm(dim) (eps 1e-5) on each output, RAVLT's their LayerNorm2d
    (1e-6)."""
    backbone = AttnzooBackbone(model_name, out_norm=True)
    assert [norm.eps for norm in backbone.out_norms] == [eps] * len(backbone.out_norms)


def test_window_padding_is_a_backbone_setting():
    """The default pads DaViT's windows as timm and the authors; window_padding='masked' reaches the model."""
    from timm.models import davit as timm_davit

    kwargs = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4))
    torch.manual_seed(0)
    ref = timm_davit.davit_tiny(features_only=True, **kwargs).eval()
    default = AttnzooBackbone("davit_tiny", **kwargs).eval()
    masked = AttnzooBackbone("davit_tiny", window_padding="masked", **kwargs).eval()
    default.model.load_state_dict(ref.state_dict())
    masked.model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 100, 130)
    with torch.no_grad():
        for a, b, m in zip(default(x), ref(x), masked(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert (m - b).abs().max() > 1e-3


def test_simple_fpn_builds_vitdet_pyramid_from_last_map():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    from attnzoo.det.necks import SimpleFPN

    assert DET.get("SimpleFPN") is SimpleFPN and SEG.get("SimpleFPN") is SimpleFPN
    torch.manual_seed(0)
    neck = SimpleFPN([8, 16], out_channels=12, num_outs=5).eval()
    early, last = torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        outs = neck((early, last))
    assert [tuple(o.shape[1:]) for o in outs] == [(12, 32, 32), (12, 16, 16), (12, 8, 8), (12, 4, 4), (12, 2, 2)]
    with torch.no_grad():
        torch.testing.assert_close(outs[2], neck.convs[2](last))  # stride 16: the map itself
        # stride 32: 2x2 max pooling; stride 64 (P6): stride-2 subsampling of stride 32
        pooled = last.unflatten(2, (4, 2)).unflatten(4, (4, 2)).amax(dim=(3, 5))
        torch.testing.assert_close(outs[3], neck.convs[3](pooled))
        torch.testing.assert_close(outs[4], outs[3][:, :, ::2, ::2])
        # stride 8: a 2x2 stride-2 transposed convolution writes each input pixel into its own 2x2 block
        up = neck.rescales[1]
        block = torch.einsum("bc,cokl->bokl", last[:, :, 3, 5], up.weight) + up.bias[:, None, None]
        torch.testing.assert_close(up(last)[:, :, 6:8, 10:12], block)
    with pytest.raises(ValueError, match=r"SimpleFPN: got 1 feature maps, expected 2"):
        neck((last,))
    with pytest.raises(ValueError, match=r"`num_outs`=3 is fewer than the 4 `scale_factors`"):
        SimpleFPN([16], num_outs=3)
