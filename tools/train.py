"""Train a model: an image classifier (any model timm can build, attnzoo's included) on an ImageNet-style
folder (``DATA/train/<class>/*``, ``DATA/val/<class>/*``), WebDataset shards or a Hugging Face dataset, a task
head (``--task``, see ``attnzoo.tasks``), or a detector/segmentor from an mmdetection config (a ``.py`` path as
the first argument).

    python tools/train.py DATA --model davit_tiny --pretrained --epochs 30 --output runs/davit
    torchrun --nproc_per_node=4 tools/train.py DATA --model maxvit_tiny_tf_224 --batch-size 64
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=RUN \
        tools/train.py DATA --output /shared/runs/davit          # on each node; --output on shared storage
    python tools/train.py hfds/ILSVRC/imagenet-1k --model davit_tiny     # a Hugging Face dataset (the data extra)
    python tools/train.py DATA --output runs/davit --resume      # continue from the last checkpoint
    python tools/train.py DATA --config configs/imagenet/davit.yaml --epochs 100   # a paper's recipe
    python tools/train.py configs/davit/retinanet_davit-t_fpn_1x_coco.py --output runs/det

The engine (``attnzoo.engine``) trains: timm's optimizer (layer-wise lr decay), schedules with warm-up and EMA,
with DDP, AMP, torch.compile, channels-last, gradient checkpointing, SyncBatchNorm, gradient accumulation,
atomic safetensors checkpoints (``--output``/checkpoints, the last two kept, each file's sha256 checked on resume,
which falls back to the previous one) and exact resumption; one run at a time holds ``--output`` (a second one
exits naming the first one's pid). The task (``attnzoo.tasks``) supplies the model, the data, the loss and the
metrics; only the one named by ``--task`` is imported. A config hands the run to mmengine's Runner
(``attnzoo.det.runner``), with the same ``--output`` and ``--resume`` behaviour.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

import attnzoo  # noqa: F401  (registers attnzoo's models with timm)
from attnzoo.cli import add_config_arguments, at_least, fraction, given_options, tool_main
from attnzoo.engine import AMP_CHOICES, Run, train
from attnzoo.engine.trainer import SCHEDULES
from attnzoo.tasks import TASKS, get_task

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def optimizer_name(text: str) -> str:
    """``--opt``: a name timm's ``create_optimizer_v2`` takes (``lookahead_NAME`` is NAME wrapped in Lookahead)."""
    from timm.optim import get_optimizer_info

    try:
        get_optimizer_info(text.lower().split("_")[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"timm has no optimizer {text!r} (timm.optim.list_optimizers() lists "
                                         "them)") from None
    return text


def _pre_parse(argv: list[str]) -> tuple[str | None, dict, str]:
    """``--config`` (its file and its options) and ``--task``, before the task's own options are known."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--task")
    known = pre.parse_known_args(argv)[0]
    config = {}
    if known.config:
        try:
            config = yaml.safe_load(Path(known.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            pre.error(f"--config {known.config}: {e}")
        if not isinstance(config, dict):
            pre.error(f"--config {known.config}: expected a mapping of option names to values")
        config = {k.replace("-", "_"): v for k, v in config.items()}
    task = known.task or config.get("task", "classification")
    if task not in TASKS:
        pre.error(f"--task {task!r}: choose one of {', '.join(sorted(TASKS))}")
    return known.config, config, task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--config FILE`` (timm's format: a YAML mapping of option names, ``batch_size: 128``) sets
    defaults that the command line overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return parser(argv).parse_args(argv)


def parser(argv: list[str]) -> argparse.ArgumentParser:
    """The options of tools/train.py, with those of the task ``argv`` names; ``--config FILE`` (timm's format: a
    YAML mapping of option names, ``batch_size: 128``) sets defaults that the command line overrides."""
    config_file, config, task = _pre_parse(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="the task's data (classification: an ImageNet-style folder with train/ and val/, "
                                "one sub-folder per class; a folder of WebDataset shards in timm's layout, with "
                                "_info.json; hfds/NAME, a Hugging Face dataset; a parquet or save_to_disk folder)")
    p.add_argument("--task", default="classification", choices=sorted(TASKS),
                   help="what to train (default: classification); `--task NAME --help` lists its options")
    p.add_argument("--config", metavar="FILE",
                   help="YAML file of options (e.g. configs/imagenet/davit.yaml); command-line flags override it")
    p.add_argument("--output", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="davit_tiny", help="timm/attnzoo name, hf-hub:ORG/NAME or local-dir:PATH")
    m.add_argument("--model-args", default="{}", type=json.loads, metavar="JSON",
                   help='extra keyword arguments for timm.create_model, e.g. \'{"embed_dims": [32, 64, 128, 256]}\'')
    m.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    m.add_argument("--pretrained-file", help="start from these weights (.safetensors) instead of the tag's")
    m.add_argument("--drop-path", type=fraction, default=0.0, help="stochastic depth rate")
    m.add_argument("--img-size", type=at_least(1), help="input size (default: the model's)")
    m.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward (timm's set_grad_checkpointing): less memory")
    m.add_argument("--channels-last", action="store_true", help="model and images in channels-last memory format")
    m.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    m.add_argument("--compile", action="store_true", help="torch.compile the model (DDP's wrapper under torchrun)")
    m.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile's mode (default: its default)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=at_least(1), default=30)
    o.add_argument("--max-steps", type=at_least(0),
                   help="stop after this many optimizer steps (the schedule still spans --epochs)")
    o.add_argument("--batch-size", type=at_least(1), default=64, help="per process")
    o.add_argument("--accum-steps", type=at_least(1), default=1, help="micro-batches per optimizer step")
    o.add_argument("--opt", type=optimizer_name, default="adamw")
    o.add_argument("--lr", type=at_least(0.0, float), default=1e-3)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--layer-decay", type=at_least(0.0, float),
                   help="layer-wise lr decay (timm's param_groups_layer_decay)")
    o.add_argument("--sched", choices=SCHEDULES, default="cosine", help="timm's lr schedule (default: cosine)")
    o.add_argument("--decay-epochs", type=float, help="step: decay interval; wsd/rsqrt: decay length (timm's)")
    o.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep: epochs")
    o.add_argument("--decay-rate", type=float, default=0.1, help="step/multistep: lr factor; poly: power")
    o.add_argument("--warmup-epochs", type=at_least(0.0, float), default=1.0)
    o.add_argument("--warmup-lr", type=float, default=1e-6)
    o.add_argument("--min-lr", type=float, default=1e-6)
    o.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    o.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="autocast dtype (auto: bf16 on CUDA when supported, none on CPU)")
    o.add_argument("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights with this decay (0: off)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workers", type=at_least(0), default=4,
                   help="data loading processes per training process (spawned once: persistent)")
    r.add_argument("--prefetch-factor", type=at_least(1), default=2, help="batches each worker loads ahead")
    r.add_argument("--log-interval", type=at_least(0), default=50, metavar="STEPS",
                   help="print (and log to TensorBoard) loss, lr, images/s and the share of time waiting for data "
                        "every STEPS optimizer steps (0: off)")
    r.add_argument("--checkpoint-every", type=at_least(0), default=0, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (always at the end of each epoch)")
    get_task(task).add_arguments(p)
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "data", "config")}
    for key, value in config.items():
        if key not in actions:
            p.error(f"--config {config_file}: {key!r} is not an option of train.py --task {task}")
        if actions[key].choices is not None and value not in actions[key].choices:
            choices = ", ".join(map(str, actions[key].choices))
            p.error(f"--config {config_file}: {key} {value!r}: choose one of {choices}")
    p.set_defaults(**config)
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
