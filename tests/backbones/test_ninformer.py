"""NiNformer: the block against the paper's equations, the authors' configuration and checkpoint layout, the timm
model surface."""
from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.backbones.ninformer import NiNBlock, NiNformer, checkpoint_filter_fn

from ._reference import assert_close_fp32, randomize_norms
from ._reference_ninformer import NiNformerImageClassification as AuthorsNiNformer

TINY = dict(embed_dim=32, depth=3, mlp_dim=48, token_mlp_dim=24, proj_drop_rate=0.0)


def _small_model(**kwargs) -> NiNformer:
    torch.manual_seed(0)
    return timm.create_model("ninformer_cifar", **dict(TINY, **kwargs))


def _randomize(module: torch.nn.Module) -> None:
    """LayerNorm affine parameters and biases away from their init, so a swapped one shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_registered_in_timm():
    for name in ("ninformer_cifar", "ninformer_tiny_patch16_224", "ninformer_small_patch16_224",
                 "ninformer_base_patch16_224"):
        assert timm.models.model_entrypoint(name).__module__ == "attnzoo.backbones.ninformer"
    assert timm.list_pretrained("ninformer*") == []  # the authors published no weights


def test_parameter_count_matches_the_authors_configuration():
    # 2,652,170: NiNformerImageClassification() of Abdullah-88/NiNformer train.py (d_model 256, d_ffn 512,
    # seq_len 64, 4 layers, CIFAR-10 head), counted by instantiating the authors' code at commit 0ec85d4
    model = timm.create_model("ninformer_cifar")
    assert sum(p.numel() for p in model.parameters()) == 2_652_170
    # of which the 4 NiN blocks (the authors' NiNformer module): 2,637,056
    assert sum(p.numel() for p in model.blocks.parameters()) == 2_637_056


def _ffn(x, fc1, fc2):
    return F.linear(F.gelu(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)


def test_block_is_the_papers_equations():
    """x + proj(u) ⊙ Mixer(u), u = LN(x); then x + FFN(LN(x)) with the same LN; Mixer = token MLP over the
    token axis then channel MLP, each with its own pre-norm and residual."""
    torch.manual_seed(1)
    block = NiNBlock(dim=16, num_tokens=9, token_mlp_dim=12, mlp_dim=20).eval()
    _randomize(block)
    x = torch.randn(2, 9, 16)
    ln = lambda t, m: F.layer_norm(t, (16,), m.weight, m.bias, 1e-5)
    mixer = block.gate.mixer
    u = ln(x, block.norm)
    y = u + _ffn(ln(u, mixer.norm1).transpose(1, 2), mixer.mlp_tokens.fc1, mixer.mlp_tokens.fc2).transpose(1, 2)
    y = y + _ffn(ln(y, mixer.norm2), mixer.mlp_channels.fc1, mixer.mlp_channels.fc2)
    x1 = x + F.linear(u, block.gate.proj.weight, block.gate.proj.bias) * y
    want = x1 + _ffn(ln(x1, block.norm), block.mlp.fc1, block.mlp.fc2)
    torch.testing.assert_close(block(x), want, atol=1e-6, rtol=1e-5)


def test_model_is_patchify_blocks_mean_fc():
    model = _small_model().eval()
    _randomize(model)
    x = torch.randn(2, 3, 32, 32)
    tokens = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4)
    tokens = tokens.flatten(2).transpose(1, 2)  # row-major, as the authors' permute + view
    for block in model.blocks:
        tokens = block(tokens)
    want = F.linear(tokens.mean(1), model.head.weight, model.head.bias)
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-5)


def _to_authors_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys written back in the layout of the authors' train.py model."""
    rules = (
        (r"^patch_embed\.proj\.", "patcher."), (r"^blocks\.(\d+)\.", r"model.\1."),
        (r"\.gate\.mixer\.norm1\.", ".mgu.Mixer.token_mix.0."),
        (r"\.gate\.mixer\.mlp_tokens\.fc1\.", ".mgu.Mixer.token_mix.2.net.0."),
        (r"\.gate\.mixer\.mlp_tokens\.fc2\.", ".mgu.Mixer.token_mix.2.net.3."),
        (r"\.gate\.mixer\.norm2\.", ".mgu.Mixer.channel_mix.0."),
        (r"\.gate\.mixer\.mlp_channels\.fc1\.", ".mgu.Mixer.channel_mix.1.net.0."),
        (r"\.gate\.mixer\.mlp_channels\.fc2\.", ".mgu.Mixer.channel_mix.1.net.3."),
        (r"\.gate\.proj\.", ".mgu.proj."), (r"\.mlp\.fc1\.", ".ffn.net.0."), (r"\.mlp\.fc2\.", ".ffn.net.3."),
        (r"^head\.", "classifier."),
    )
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_checkpoint_filter_converts_the_authors_layout():
    ref = timm.create_model("ninformer_cifar")
    authors = _to_authors_layout(ref.state_dict())
    assert "model.3.mgu.Mixer.channel_mix.1.net.3.weight" in authors and "patcher.weight" in authors
    ours = timm.create_model("ninformer_cifar")
    ours.load_state_dict(checkpoint_filter_fn(authors, ours), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_matches_the_authors_code(tmp_path):
    """Logits and features_only maps of the authors' train.py model (tests/backbones/_reference_ninformer.py,
    written from their code) and ours, same weights loaded from the file their script saves (a bare state_dict
    in their layout), at the one size the token-mixing MLP takes; another size is a clear error for both."""
    torch.manual_seed(0)
    authors = randomize_norms(AuthorsNiNformer())
    path = tmp_path / "NiNformerImageClassification_cifar10.pth"
    torch.save(authors.state_dict(), path)
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = timm.create_model("ninformer_cifar", **kwargs).eval()
    features = timm.create_model("ninformer_cifar", features_only=True, **kwargs).eval()
    assert ours.pretrained_cfg["fixed_input_size"] and ours.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_maps = authors(x)
        assert_close_fp32(ours(x), want, "logits")
        blocks = [int(m.split(".")[1]) for m in features.feature_info.module_name()]
        assert blocks == [1, 2, 3]
        for i, got in zip(blocks, features(x), strict=True):
            assert_close_fp32(got, want_maps[i], f"block {i} map")
        for model in (ours, features):
            with pytest.raises(ValueError, match=r"ninformer_cifar: input `x` must be \[B, 3, 32, 32\]"):
                model(torch.randn(1, 3, 36, 32))


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (1, 3, 32, 36), (1, 1, 32, 32), (3, 32, 32)])
def test_other_input_size_is_a_clear_error(shape):
    model = timm.create_model("ninformer_cifar")
    expected = (r"ninformer_cifar: input `x` must be \[B, 3, 32, 32\]: the token-mixing MLP was built for 64 "
                r"tokens of a 32×32 image")
    with pytest.raises(ValueError, match=expected):
        model(torch.randn(shape))


def test_imagenet_variants_take_224():
    model = timm.create_model("ninformer_tiny_patch16_224", depth=1).eval()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    # timm's tools (and its test suite) read this before they feed any other size
    assert all(timm.models.get_pretrained_cfg(name).fixed_input_size for name in timm.list_models("ninformer_*"))
    assert model.blocks[0].gate.mixer.mlp_tokens.fc1.weight.shape == (96, 196)  # token MLP over 196 tokens
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"built for 196 tokens of a 224×224 image"):
        model(torch.randn(1, 3, 256, 256))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ninformer_tiny_patch16_224", "ninformer_small_patch16_224",
                                  "ninformer_base_patch16_224"])
def test_imagenet_variants_full_forward(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_torch_compile_fullgraph():
    model = _small_model().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)

