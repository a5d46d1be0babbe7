"""Train a model: an image classifier (any model timm can build, attnzoo's included) on an ImageNet-style
folder (``DATA/train/<class>/*``, ``DATA/val/<class>/*``), a task head (``--task``, see ``attnzoo.tasks``), or
a detector/segmentor from an mmdetection config (a ``.py`` path as the first argument).

    python tools/train.py DATA --model davit_tiny --pretrained --epochs 30 --output runs/davit
    torchrun --nproc_per_node=4 tools/train.py DATA --model maxvit_tiny_tf_224 --batch-size 64
    python tools/train.py DATA --output runs/davit --resume      # continue from the last checkpoint
    python tools/train.py configs/davit/retinanet_davit-t_fpn_1x_coco.py --output runs/det

The engine (``attnzoo.engine``) trains: timm's optimizer, cosine schedule with warm-up and EMA, with DDP, AMP,
gradient accumulation, atomic safetensors checkpoints (``--output``/checkpoints) and exact resumption. The task
(``attnzoo.tasks``) supplies the model, the data, the loss and the metrics; only the one named by ``--task`` is
imported. A config hands the run to mmengine's Runner (``attnzoo.det.runner``), with the same ``--output`` and
``--resume`` behaviour.
"""
from __future__ import annotations

import argparse
import json
import sys

import attnzoo  # noqa: F401  (registers attnzoo's models with timm)
from attnzoo.cli import add_config_arguments, given_options, tool_main
from attnzoo.engine import AMP_CHOICES, Run, train
from attnzoo.tasks import TASKS, get_task


def _task_name(argv: list[str]) -> str:
    """``--task`` alone, before the task's own options are known."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="classification", choices=sorted(TASKS))
    return pre.parse_known_args(argv)[0].task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    return parser(argv).parse_args(argv)


def parser(argv: list[str]) -> argparse.ArgumentParser:
    """The options of tools/train.py, with those of the task ``argv`` names."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="the task's data (classification: an ImageNet-style folder with train/ and val/, "
                                "one sub-folder per class)")
    p.add_argument("--task", default="classification", choices=sorted(TASKS),
                   help="what to train (default: classification); `--task NAME --help` lists its options")
    p.add_argument("--output", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="davit_tiny", help="timm/attnzoo name, hf-hub:ORG/NAME or local-dir:PATH")
    m.add_argument("--model-args", default="{}", type=json.loads, metavar="JSON",
                   help='extra keyword arguments for timm.create_model, e.g. \'{"embed_dims": [32, 64, 128, 256]}\'')
    m.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    m.add_argument("--pretrained-file", help="start from these weights (.safetensors) instead of the tag's")
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    m.add_argument("--img-size", type=int, help="input size (default: the model's)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=30)
    o.add_argument("--max-steps", type=int,
                   help="stop after this many optimizer steps (the schedule still spans --epochs)")
    o.add_argument("--batch-size", type=int, default=64, help="per process")
    o.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--opt", default="adamw")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--warmup-epochs", type=float, default=1.0)
    o.add_argument("--warmup-lr", type=float, default=1e-6)
    o.add_argument("--min-lr", type=float, default=1e-6)
    o.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    o.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="autocast dtype (auto: bf16 on CUDA when supported, none on CPU)")
    o.add_argument("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights with this decay (0: off)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workers", type=int, default=4, help="data loading processes per training process")
    r.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (always at the end of each epoch)")
    get_task(_task_name(argv)).add_arguments(p)
    return p


def parse_config_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train an mmdetection/mmsegmentation config.")
    add_config_arguments(p)
    p.add_argument("--output", help="work dir: checkpoints and logs (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--seed", type=int, help="random seed (default: the config's randomness.seed, else 0)")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision (AmpOptimWrapper; CUDA only)")
    p.add_argument("--auto-scale-lr", action="store_true",
                   help="scale the lr by total batch size / the config's auto_scale_lr.base_batch_size")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(".py"):  # an mmdetection/mmsegmentation config
        def train_config() -> None:
            args = parse_config_args(argv)  # needs the det extra
            from attnzoo.det import runner

            last = runner.train(args)
            if runner.is_main_process():
                print(f"checkpoint: {last}", flush=True)

        return tool_main("train.py", train_config, cleanup=Run.close)

    p = parser(argv)
    args = p.parse_args(argv)
    return tool_main("train.py", lambda: train(args, given_options(p, argv)), cleanup=Run.close)


if __name__ == "__main__":
    sys.exit(main())
