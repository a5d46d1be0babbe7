"""Feature maps and window-attention maps of a model for one image, as PNGs.

    python tools/visualize.py davit_tiny photo.jpg --out vis/                 # pretrained weights
    python tools/visualize.py local-dir:runs/demo/hub runs/demo/shapes/val/star/star_00000.png --out vis/

Writes ``features/level<i>.png`` (the first 16 channels of each ``features_only`` output, each scaled to its own
range) and ``attention/call<j>.png`` (for the j-th ``window_attention`` call of the forward pass, the attention
matrix [query x key] of the first 16 windows, averaged over heads), each atomically (the old PNG or the whole
new one, never an empty file).

The attention maps are recorded generically: every attnzoo module that calls
:func:`attnzoo.kernels.window_attention` gets, for the duration of one forward, a wrapper that runs the op
unchanged and also evaluates its reference formula with v = identity, which returns softmax(scale q kᵀ + bias)
itself, padding mask included.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform
from torchvision.utils import save_image

import attnzoo  # (registers attnzoo's models with timm)
from attnzoo.cli import at_least, tool_main
from attnzoo.common import InputError, atomic_file
from attnzoo.hub import create_model
from attnzoo.kernels.window.reference import window_attention_reference
from attnzoo.tasks import data_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="timm/attnzoo name (pretrained weights), hf-hub:ORG/NAME or local-dir:PATH")
    p.add_argument("image", help="an image file")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--model-args", default="{}", type=json.loads, metavar="JSON",
                   help="extra keyword arguments for timm.create_model")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (for a quick look at the plumbing)")
    p.add_argument("--img-size", type=at_least(1), help="input size (default: the model's)")
    return p.parse_args(argv)


@contextlib.contextmanager
def record_window_attention() -> Iterator[list[torch.Tensor]]:
    """Inside the block, every ``window_attention`` call made by attnzoo's modules also appends its attention
    probabilities [windows, heads, N, N] to the yielded list."""
    op = attnzoo.kernels.window_attention
    maps: list[torch.Tensor] = []

    def recording(q, k, v, bias=None, mask=None, scale=None):
        out = op(q, k, v, bias=bias, mask=mask, scale=scale)
        N = q.shape[-2]
        eye = torch.eye(N, dtype=torch.float32, device=q.device).expand(*q.shape[:2], N, N)
        bias_g = bias[None] if bias is not None and bias.dim() == 3 else bias
        mask_g = mask[None] if mask is not None and mask.dim() == 1 else mask
        maps.append(window_attention_reference(q.detach().float(), k.detach().float(), eye, bias_g, mask_g,
                                               scale if scale is not None else q.shape[-1] ** -0.5))
        return out

    users = [m for name, m in list(sys.modules.items())
             if name.startswith("attnzoo.") and getattr(m, "window_attention", None) is op]
    for module in users:
        module.window_attention = recording
    try:
        yield maps
    finally:
        for module in users:
            module.window_attention = op


def load_image(path: str, config: dict) -> torch.Tensor:
    """The image at ``path`` transformed for a model of data ``config`` (timm's eval transform), as a batch of one."""
    if not Path(path).is_file():
        raise InputError(f"image {path} does not exist")
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise InputError(f"image {path} cannot be read: {e}") from None
    return create_transform(**config, is_training=False)(image)[None]


def visualize(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    pretrained = not args.no_pretrained
    # with random weights, one seed gives the classifier and its features_only twin the same ones (timm builds the
    # whole model before wrapping it, whose key names differ from family to family)
    torch.manual_seed(0)
    model = create_model(args.model, pretrained=pretrained, **args.model_args).eval()
    x = load_image(args.image, data_config(args, model))
    out = Path(args.out)
    torch.manual_seed(0)
    features = create_model(args.model, pretrained=pretrained, features_only=True, **args.model_args).eval()
    feature_pngs, attention_pngs = [], []
    with torch.no_grad(), record_window_attention() as maps:
        for i, fmap in enumerate(features(x)):
            channels = fmap[0, :16, None]  # [16, 1, h, w]
            channels = torch.nn.functional.interpolate(channels, size=x.shape[-2:], mode="nearest")
            feature_pngs.append(out / "features" / f"level{i}.png")
            _save_png(channels, feature_pngs[-1])
    for j, attn in enumerate(maps):
        attention_pngs.append(out / "attention" / f"call{j:02d}.png")
        windows = attn[:16].mean(1, keepdim=True)  # [windows, 1, N, N], heads averaged
        _save_png(windows, attention_pngs[-1])
    return feature_pngs, attention_pngs


def _save_png(images: torch.Tensor, path: Path) -> None:
    """``images`` [n, 1, h, w] as one grid PNG of 4 columns, each scaled to its own range; written atomically."""
    with atomic_file(path, "wb") as f:
        save_image(images, f, format="png", nrow=4, normalize=True, scale_each=True, padding=2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        feature_pngs, attention_pngs = visualize(args)
        print(f"{len(feature_pngs)} feature maps in {Path(args.out) / 'features'}, "
              f"{len(attention_pngs)} attention maps in {Path(args.out) / 'attention'}")

    return tool_main("visualize.py", run)


if __name__ == "__main__":
    sys.exit(main())
