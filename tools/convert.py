"""Convert an authors' checkpoint to timm's Hub layout through the model's ``checkpoint_filter_fn``.

    python tools/convert.py davit_tiny DaViT-tiny.pth --out hub/davit_tiny_msft
    python tools/convert.py davit_tiny DaViT-tiny.pth --out hub/x --model-args '{"num_classes": 1000}'

The checkpoint (``.pth`` read with ``weights_only=True``, or ``.safetensors``) goes through the
``checkpoint_filter_fn`` of the model's family (the one timm applies to that family's pretrained files), must
then fit the model exactly (an error lists the keys that do not), and is written as config.json +
model.safetensors + README.md; ``timm.create_model("local-dir:OUT", pretrained=True)`` loads the result, and
tools/publish.py's ``--repo`` or ``huggingface-cli upload`` pushes it. For checkpoints of tools/train.py use
tools/publish.py.

    python tools/convert.py --det configs/ravlt/retinanet_ravlt-t_fpn_1x_coco.py retinanet_t_1x_12_epoch.pth \
        --out retinanet_ravlt-t.pth

``--det``: the first argument is an attnzoo mmdetection/mmsegmentation config and the checkpoint the authors'
mmdet 2.x / mmseg 0.x one of that model (DaViT, L2ViT, RAVLT); the result (``attnzoo.det.checkpoint.
convert_mm_checkpoint``) is a checkpoint of the config's model, for ``tools/eval.py CONFIG OUT``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import attnzoo  # noqa: F401  (registers attnzoo's models with timm)
from attnzoo.cli import tool_main
from attnzoo.common import InputError
from attnzoo.hub import create_model, filter_fn_of, load_weights, save_hub_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="registered model name (timm's or attnzoo's); with --det an mmdet/mmseg config")
    p.add_argument("checkpoint", help="the authors' weights (.pth, .pt, .bin or .safetensors)")
    p.add_argument("--out", required=True, help="the Hub folder to write (with --det: the .pth file)")
    p.add_argument("--det", action="store_true",
                   help="convert the authors' mmdet/mmseg checkpoint of the model of config MODEL")
    p.add_argument("--model-args", default="{}", type=json.loads, metavar="JSON",
                   help="keyword arguments for timm.create_model (e.g. num_classes of the checkpoint's head)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def convert(model_name: str, checkpoint: Path, out: Path, model_args: dict, overwrite: bool = False) -> Path:
    model = create_model(model_name, **model_args)
    load_weights(model, checkpoint, filter_fn=filter_fn_of(model))
    card = {"description": f"{model_name} with the weights of {checkpoint.name}, converted to timm's layout "
                           "by attnzoo's tools/convert.py.",
            "details": {"Model Type": "Image classification / feature backbone", "Source": checkpoint.name}}
    return save_hub_folder(model, out, card=card, overwrite=overwrite)


def convert_det(config: str, checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    from attnzoo.det.checkpoint import convert_mm_checkpoint
    from attnzoo.det.runner import load_config

    if out.exists() and not overwrite:
        raise InputError(f"output file {out} exists (pass --overwrite to replace it)")
    cfg = load_config(argparse.Namespace(config=config, cfg_options={}, data_root=None, checkpoint=str(checkpoint)))
    return convert_mm_checkpoint(cfg, checkpoint, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        if args.det:
            path = convert_det(args.model, Path(args.checkpoint), Path(args.out), args.overwrite)
            print(f"wrote {path}: evaluate it with tools/eval.py {args.model} {path}")
        else:
            path = convert(args.model, Path(args.checkpoint), Path(args.out), args.model_args, args.overwrite)
            print(f"wrote {path}: load it with timm.create_model('local-dir:{path}', pretrained=True)")

    return tool_main("convert.py", run)


if __name__ == "__main__":
    sys.exit(main())
