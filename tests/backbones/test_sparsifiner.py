"""Sparsifiner on timm's DeiT: against timm's VisionTransformer with the same weights, the predictor's masks,
parameter counts from the authors' code, DeiT-initialised pretrained loading, the recipe's losses, timm surface."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.backbones.sparsifiner import Sparsifiner, attention_maps, attn_recon_loss, distill_loss
from attnzoo.kernels import trace, use_backend
from attnzoo.kernels.sparse.reference import key_mask

from ._reference import assert_close_fp32, randomize_norms
from ._reference_sparsifiner import Sparsifiner as AuthorsSparsifiner

# 64 px, patch 16: 16 patches + cls = 17 tokens, 17 // 6 = 2 basis tokens
TINY = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10)
TINY_PREDICTOR = dict(basis_topk=2)


def _pair(keep_rate: float, **kwargs) -> tuple[VisionTransformer, Sparsifiner]:
    torch.manual_seed(0)
    ours = timm.create_model("sparsifiner_deit_small_patch16_224", keep_rate=keep_rate, **kwargs).eval()
    ref = VisionTransformer(**{k: v for k, v in kwargs.items() if k != "basis_topk"},
                            **({} if "embed_dim" in kwargs else dict(embed_dim=384, num_heads=6))).eval()
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if ".mask_predictor." not in k}, strict=True)
    return ref, ours


def _tiny(keep_rate: float = 0.25, **kwargs) -> Sparsifiner:
    torch.manual_seed(0)
    return timm.create_model("sparsifiner_deit_small_patch16_224", keep_rate=keep_rate,
                             **dict(TINY, **dict(TINY_PREDICTOR, **kwargs)))


def test_registered_with_deit_init_tags():
    for name in ("sparsifiner_deit_small_patch16_224", "sparsifiner_deit_base_patch16_224"):
        assert timm.models.model_entrypoint(name).__module__ == "attnzoo.backbones.sparsifiner"
    cfg = timm.models.get_pretrained_cfg("sparsifiner_deit_small_patch16_224.deit_init")
    assert cfg.hf_hub_id == "timm/deit_small_patch16_224.fb_in1k"


def test_keep_rate_one_equals_timm_deit():
    ref, ours = _pair(1.0, **TINY, **TINY_PREDICTOR)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_keep_rate_one_equals_timm_deit_small_full_size():
    ref, ours = _pair(1.0)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4


# the parity configurations: Sparsifiner-S (DeiT-S, the default yaml's predictor), and a narrow two-block one at
# 96 px (37 tokens, 6 basis tokens of which 3 kept, 10 keys per query), with the blocks its features_only takes
PARITY = {"small": ({}, None), "reduced": (dict(img_size=96, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                                num_classes=10, basis_topk=3), (0, 1))}


@pytest.mark.parametrize("config", ["reduced", pytest.param("small", marks=pytest.mark.slow)])
def test_matches_the_authors_code(tmp_path, config):
    """Logits and features_only maps of the authors' inference (a dense softmax with the dropped keys at -inf:
    tests/backbones/_reference_sparsifiner.py, written from their code) and ours (a sparse kernel over the kept
    keys), same weights loaded from a checkpoint in their layout, at the model's one input size; another size
    is refused with a clear error by both our model and its features_only form."""
    kwargs, out_indices = PARITY[config]
    torch.manual_seed(0)
    authors = randomize_norms(AuthorsSparsifiner(**kwargs))
    for name, p in authors.named_parameters():
        if name.endswith("proj_back_n"):  # about half the basis entries above the 0.02 threshold
            p.data.uniform_(-0.04, 0.04)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": authors.state_dict(), "epoch": 49}, path)  # their main.py (DeiT's) checkpoint
    kwargs = dict(kwargs, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(path), num_classes=kwargs.get("num_classes", 1000)))
    name = "sparsifiner_deit_small_patch16_224"
    ours = timm.create_model(name, **kwargs).eval()
    features = timm.create_model(name, features_only=True, **kwargs,
                                 **({"out_indices": out_indices} if out_indices else {})).eval()
    size = ours.patch_embed.img_size
    assert ours.pretrained_cfg["fixed_input_size"]
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"), trace() as calls:
        want, want_maps = authors(x)
        assert_close_fp32(ours(x), want, "logits")
        blocks = [int(m.split(".")[1]) for m in features.feature_info.module_name()]
        for i, got in zip(blocks, features(x), strict=True):
            assert_close_fp32(got, want_maps[i], f"block {i} map")
    assert {op for op, _ in calls} == {"sparse_attention"}
    other = torch.randn(1, 3, size[0] + 16, size[1])
    for model in (ours, features):
        with pytest.raises(ValueError, match=rf"{name}: input `x` must be \[B, 3, {size[0]}, {size[1]}\]"):
            model(other)


def test_sparse_keep_rate_differs_from_dense():
    """At keep rate 0.25 the dropped keys really are dropped (else the keep rate would be a no-op)."""
    ref, ours = _pair(0.25, **TINY, **TINY_PREDICTOR)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        assert (ours(x) - ref(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("keep_rate", [1.0, 0.25, 0.01])
def test_predictor_masks_keep_exactly_the_requested_keys(keep_rate):
    model = _tiny(keep_rate).eval()
    attn = model.blocks[0].attn
    tokens = torch.randn(2, 17, 32)
    q, k, _ = attn.qkv(tokens).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    index = attn.mask_predictor(q, k)
    K = math.ceil(keep_rate * 17)
    assert index.shape == (2, 2, 16, K)  # one row per patch query; the cls row is dense
    assert (key_mask(index, 17).sum(-1) == K).all()  # K distinct keys per row
    assert not index.requires_grad


def test_predictor_basis_topk_one_gives_one_basis_row_per_query():
    """With one coefficient kept, each query's approximation is one row of the thresholded |proj_back_n|ᵀ,
    scaled by its softmax weight."""
    model = _tiny(0.25, basis_topk=1).eval()
    pred = model.blocks[0].attn.mask_predictor
    with torch.no_grad():
        pred.proj_back_n.copy_(torch.randn(17, 2) * 0.1)
    basis = F.threshold(pred.proj_back_n.t().abs(), 0.02, 0.0)
    q, k = torch.randn(2, 1, 2, 17, 16).unbind(0)
    approx = pred.approx_attention(q, k).reshape(-1, 17)
    weight = approx.amax(-1, keepdim=True) / basis.amax(-1)  # [rows, 2]: the scale against each basis row
    fits = [(approx - weight[:, j:j + 1] * basis[j]).abs().amax(-1) < 1e-6 for j in range(2)]
    assert (fits[0] | fits[1]).all()
    assert ((weight > 0.5 - 1e-6) & (weight <= 1 + 1e-6)).any(-1).all()  # the larger of two softmax weights


def test_predictor_parameter_counts_match_the_authors_code():
    # lim142857/Sparsifiner src/models/sparsifiner.py MaskPredictor(dim, num_heads, num_tokens=197,
    # reduce_n_factor=6, reduce_c_factor=2) (the default yaml), instantiated from the authors' code: 16,768 per
    # layer for DeiT-S (384, 6 heads) and DeiT-B (768, 12 heads) alike (hd 64 → 32; 197 → 32 basis tokens);
    # their full Sparsifiner for DeiT-S (main.py --model sparsifiner) has 22,251,880 parameters.
    small = timm.create_model("sparsifiner_deit_small_patch16_224")
    predictor = sum(p.numel() for n, p in small.named_parameters() if ".mask_predictor." in n)
    assert predictor == 12 * 16_768 and sum(p.numel() for p in small.parameters()) == 22_251_880
    base = timm.create_model("sparsifiner_deit_base_patch16_224")
    assert sum(p.numel() for p in base.blocks[0].attn.mask_predictor.parameters()) == 16_768


def test_pretrained_deit_init_loads_timms_deit_into_the_shared_parts(offline_hub):
    torch.manual_seed(3)
    deit = timm.create_model("deit_small_patch16_224")
    offline_hub("timm/deit_small_patch16_224.fb_in1k", deit.state_dict())
    model = timm.create_model("sparsifiner_deit_small_patch16_224.deit_init", pretrained=True)
    assert type(model) is Sparsifiner
    state = model.state_dict()
    for key, value in deit.state_dict().items():
        assert torch.equal(state[key], value), key
    assert {k for k in state if k not in deit.state_dict()} == {
        f"blocks.{i}.attn.mask_predictor.{n}" for i in range(12)
        for n in ("proj_c_q.weight", "proj_c_q.bias", "proj_c_k.weight", "proj_c_k.bias", "proj_n", "proj_back_n")}


def test_attention_maps_are_timms_attention_probabilities():
    torch.manual_seed(4)
    vit = VisionTransformer(**TINY).eval()
    captured = []
    for block in vit.blocks:
        block.attn.fused_attn = False  # timm's explicit path, whose softmax output enters attn_drop
        block.attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    x = torch.randn(2, 3, 64, 64)
    maps = attention_maps(vit, x)
    captured.clear()  # attention_maps ran the blocks too
    with torch.no_grad():
        vit(x)
    assert len(maps) == len(captured) == 2
    for got, want in zip(maps, captured, strict=True):
        torch.testing.assert_close(got, want)


def test_reconstruction_phase_attends_densely_and_trains_the_predictor():
    ref, model = _pair(0.25, **TINY, **TINY_PREDICTOR)
    model.train().set_attn_recon(True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with use_backend("torch"):
        out = model(x)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)  # dense attention in this phase
    approx = model.approx_attentions()
    assert [a.shape for a in approx] == [(2, 2, 16, 17)] * 2
    loss = attn_recon_loss(approx, attention_maps(ref, x))
    loss.backward()
    pred = model.blocks[1].attn.mask_predictor
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pred.parameters())
    model.set_attn_recon(False)
    with pytest.raises(RuntimeError, match="no approximations recorded"):
        model.approx_attentions()


def test_attn_recon_loss_is_the_summed_squared_error_per_block():
    approx = [torch.rand(1, 2, 4, 5) for _ in range(3)]
    teacher = [torch.rand(1, 2, 5, 5) for _ in range(3)]
    want = sum(((a - t[..., 1:, :]) ** 2).sum() for a, t in zip(approx, teacher, strict=True)) / 3
    torch.testing.assert_close(attn_recon_loss(approx, teacher), want)
    with pytest.raises(ValueError, match="one teacher map per block"):
        attn_recon_loss(approx, teacher[:2])


def test_distill_loss():
    gen = torch.Generator().manual_seed(6)
    logits, t_logits = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    tokens, t_tokens = torch.randn(4, 16, 8, generator=gen), torch.randn(4, 16, 8, generator=gen)
    target = torch.tensor([1, 2, 3, 4])
    ce = F.cross_entropy(logits, target)
    # a student equal to its teacher pays the label loss only
    torch.testing.assert_close(distill_loss(logits, tokens, logits, tokens, target), ce)
    p_t = t_logits.softmax(-1)
    kl = (p_t * (p_t.log() - logits.log_softmax(-1))).sum(-1).mean()
    want = ce + 0.5 * kl + 0.5 * ((tokens - t_tokens) ** 2).mean()
    torch.testing.assert_close(distill_loss(logits, tokens, t_logits, t_tokens, target), want)


def test_triton_backend_matches_torch():
    model = _tiny(0.25).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend), trace() as calls:
            out = model(x)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert calls == [("sparse_attention", backend)] * 4  # per block: the cls row and the patch rows
        results[backend] = out, grad
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph():
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), use_backend("torch"):
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 96, 96), (1, 1, 64, 64)])
def test_other_input_is_a_clear_error(shape):
    model = _tiny()
    expected = (r"sparsifiner_deit_small_patch16_224: input `x` must be \[B, 3, 64, 64\]: the connectivity "
                r"predictor was built for its 64×64 token layout")
    with pytest.raises(ValueError, match=expected):
        model(torch.randn(shape))


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep_rate=0.0), r"`keep_rate` must be in \(0, 1\]"),
    (dict(basis_topk=3), r"`basis_topk` must be in \[1, 2\]"),
    (dict(dynamic_img_size=True), "`dynamic_img_size` is not supported"),
    (dict(class_token=False, global_pool="avg"), "needs the class token"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"Sparsifiner: {match}"):
        timm.create_model("sparsifiner_deit_small_patch16_224", **dict(TINY, **dict(TINY_PREDICTOR, **kwargs)))
