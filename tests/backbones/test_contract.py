"""timm's model surface, once, for every model attnzoo registers: forward at the default input size (and at an odd
size where the family takes any size), forward_features + forward_head (pre_logits), features_only against
forward_intermediates, reset_classifier, gradient checkpointing, the state_dict round trip, a build on the meta
device, and bad inputs rejected with a ValueError naming the model, the argument and what it expects.

The families' own test files keep what is theirs: parity with timm or the authors, the papers' numbers.
Models are reduced (narrow, one block a stage) where the family takes the sizes as arguments, so the whole
module stays fast on CI's two cores; HaloNet's configurations are fixed, so only its two fastest run by default.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import pytest
import timm
import torch

import attnzoo  # noqa: F401

from ..tools.conftest import one_thread  # noqa: F401  (autouse: one intra-op thread, as the tools' tests)

SLOW = pytest.mark.slow


@dataclass(frozen=True)
class Family:
    kwargs: dict = field(default_factory=dict)
    size: tuple[int, int] | None = None  # the size the checks run at (None: the model's default)
    odd: tuple[int, int] | None = None  # an untypical size, for the families that take any size


_SMALL_MAXVIT = dict(embed_dim=(32, 64, 64, 64), depths=(1, 1, 1, 1), stem_width=16, img_size=128)
FAMILIES = {
    "davit": Family(dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4)), (64, 64), (50, 37)),
    "maxvit": Family(_SMALL_MAXVIT, (128, 128), (77, 100)),
    "halonet": Family(),
    "l2vit": Family(dict(depths=(2, 2, 2, 2), dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4)), (64, 64), (50, 37)),
    "ravlt": Family(dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), head_hidden_size=32),
                    (64, 64), (50, 37)),
    # three blocks: timm's features_only takes the last three of a plain ViT's blocks
    "ninformer": Family(dict(embed_dim=32, depth=3, mlp_dim=48, token_mlp_dim=24)),
    "sparsifiner": Family(dict(img_size=64, embed_dim=32, depth=3, num_heads=2, basis_topk=2), (64, 64)),
    "ela": Family({}, (32, 32), (40, 27)),  # full-size CNNs: small inputs keep them fast
    "ulsam": Family({}, (32, 32), (40, 27)),
}
FAST_HALONETS = {"halonet26t", "haloregnetz_b"}


def _family(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[1]


MODELS = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("attnzoo."))
PARAMS = [pytest.param(n, marks=SLOW if _family(n) == "halonet" and n not in FAST_HALONETS else ()) for n in MODELS]


def _kwargs(name: str) -> dict:
    kwargs = dict(FAMILIES[_family(name)].kwargs)
    if _family(name) == "maxvit" and "_tf_" in name:
        kwargs["head_hidden_size"] = 64  # the TF models' pre-logits layer, narrowed with the rest
    return kwargs


def _odd(name: str) -> tuple[int, int] | None:
    if _family(name) == "maxvit" and "_tf_" not in name:  # 'same' padding only in the TF models: any size there,
        return (95, 127)  # the others need each stage's size even (a multiple of 32, or one less)
    return FAMILIES[_family(name)].odd


@functools.cache
def _built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **_kwargs(name)).eval()


def _model(name: str) -> torch.nn.Module:
    return copy.deepcopy(_built(name))


def _size(model: torch.nn.Module, name: str) -> tuple[int, int]:
    return FAMILIES[_family(name)].size or _default_size(model)


def _default_size(model: torch.nn.Module) -> tuple[int, int]:
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)  # the models built for one size
    return tuple(fixed) if fixed is not None else tuple(model.pretrained_cfg["input_size"][1:])


def _x(model: torch.nn.Module, size: tuple[int, int], batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, model.in_chans if hasattr(model, "in_chans") else 3, *size,
                       generator=torch.Generator().manual_seed(1))


def _load_weights(features: torch.nn.Module, model: torch.nn.Module) -> None:
    """``model``'s weights into its ``features_only`` wrapper, strictly (timm's module-list wrappers flatten the
    first level of module names: ``stages.0`` becomes ``stages_0``; its getter wrapper holds the model as
    ``model``)."""
    own = model.state_dict()

    def source(key: str) -> str:
        if key in own or key.removeprefix("model.") in own:
            return key if key in own else key.removeprefix("model.")
        head, _, rest = key.partition(".")
        return ".".join(head.rsplit("_", 1)) + "." + rest

    features.load_state_dict({k: own[source(k)] for k in features.state_dict()})


def test_every_family_is_covered():
    assert {_family(n) for n in MODELS} == set(FAMILIES)


@pytest.mark.parametrize("name", PARAMS)
@torch.no_grad()
def test_forward_features_and_head(name):
    model = _built(name)
    pre_logits = getattr(model, "head_hidden_size", model.num_features)
    for size in {_default_size(model), _size(model, name), _odd(name)} - {None}:
        x = _x(model, size)
        out = model(x)
        # (the Florence-2 DaViTs are feature extractors: no classifier, num_classes=0)
        assert out.shape == (1, model.num_classes or pre_logits) and torch.isfinite(out).all(), size
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), out)
        assert model.forward_head(features, pre_logits=True).shape == (1, pre_logits)


@pytest.mark.parametrize("name", PARAMS)
@torch.no_grad()
def test_features_only_equals_forward_intermediates(name):
    model = _built(name)
    features = timm.create_model(name, features_only=True, **_kwargs(name)).eval()
    _load_weights(features, model)
    x = _x(model, _size(model, name))
    maps = features(x)
    expected = model.forward_intermediates(x, indices=list(features.feature_info.out_indices),
                                           intermediates_only=True)
    assert len(maps) == len(expected) == len(features.feature_info.channels())
    for got, want, channels, reduction in zip(maps, expected, features.feature_info.channels(),
                                              features.feature_info.reduction(), strict=True):
        torch.testing.assert_close(got, want)
        assert got.shape[1] == channels
        assert got.shape[-1] == -(-x.shape[-1] // reduction) or got.shape[-1] == x.shape[-1] // reduction


@pytest.mark.parametrize("name", PARAMS)
@torch.no_grad()
def test_prune_intermediate_layers_keeps_the_intermediates(name):
    """timm's features-only surface (its test suite and FeatureGetterNet call it): pruning after the second
    feature level leaves the first two levels' maps as they were."""
    model = _model(name)  # a copy: pruned in place
    if not hasattr(model, "prune_intermediate_layers"):
        pytest.skip(f"{name}: timm's {type(model).__name__} has no prune_intermediate_layers to match")
    x = _x(model, _size(model, name))
    before = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1], prune_head=True) == [0, 1]
    after = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for got, want in zip(after, before, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", PARAMS)
@torch.no_grad()
def test_reset_classifier(name):
    model = _model(name)
    x = _x(model, _size(model, name))
    model.reset_classifier(4, "avg")
    assert model.num_classes == 4 and model(x).shape == (1, 4)
    model.reset_classifier(0)
    assert model(x).shape == (1, getattr(model, "head_hidden_size", model.num_features))


@pytest.mark.parametrize("name", PARAMS)
def test_grad_checkpointing_gives_the_same_gradients(name):
    model = _model(name).train()
    x = _x(model, _size(model, name), batch=2)
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(5)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


@pytest.mark.parametrize("name", PARAMS)
@torch.no_grad()
def test_state_dict_round_trip_and_meta_build(name):
    model = _built(name)
    torch.manual_seed(1)
    other = timm.create_model(name, **_kwargs(name)).eval()
    other.load_state_dict(model.state_dict())
    x = _x(model, _size(model, name))
    torch.testing.assert_close(other(x), model(x))
    meta = timm.create_model(name, device="meta", **_kwargs(name))
    assert all(t.is_meta for t in meta.state_dict().values())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    half = timm.create_model(name, dtype=torch.bfloat16, device="meta", **_kwargs(name))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", PARAMS)
def test_bad_input_is_a_value_error_naming_model_argument_and_expectation(name):
    model = _built(name)
    features = timm.create_model(name, features_only=True, **_kwargs(name)).eval()
    x = _x(model, _size(model, name))
    channels = x.shape[1]
    bad = {"channels": torch.randn(1, channels + 1, *x.shape[2:]), "3-D": x[0],
           "integer": torch.zeros(x.shape, dtype=torch.uint8)}
    paths = {"forward": model, "forward_features": model.forward_features,
             "forward_intermediates": model.forward_intermediates, "features_only": features}
    for what, value in bad.items():
        for path, call in paths.items():
            with pytest.raises(ValueError) as err:
                call(value)
            message = str(err.value)
            assert message.startswith(f"{name}: input `x` must be"), (what, path, message)
            assert (f"[B, {channels}," in message if what != "integer" else "floating-point" in message), \
                (what, path, message)
