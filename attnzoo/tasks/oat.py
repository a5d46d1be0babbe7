"""``--task oat``: OAT gaze scanpath prediction (``attnzoo.heads.oat``) on a folder in the layout of
``attnzoo.data.oat`` (the authors' Amazon book-cover and shelf data converted once, or generated grid search).

Training is the authors' teacher-forced cross-entropy. Validation decodes greedily and reports, against the human
scanpaths of the val split: the sequence score (Needleman-Wunsch, the lead metric), SIM of the teacher-forced
distributions, the behavioural delta and MultiMatch on object centres (``attnzoo.heads.scanpath_metrics``). The authors
train with Adam at lr 1e-4 (constant), batch 20, gradient clipping 1.0 and early stopping on delta: pass
``--opt adam --lr 1e-4 --weight-decay 0 --warmup-epochs 0 --min-lr 1e-4 --clip-grad 1.0 --batch-size 20``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..common import InputError
from ..data.oat import OATScanpaths, collate_scanpaths, load_oat_folder, read_index_file, split_records
from ..heads.oat import OAT, oat_loss
from ..heads.scanpath_metrics import (
    MULTIMATCH_KEYS,
    behaviour,
    behaviour_delta,
    multimatch,
    object_centres,
    scanpath_sim,
    sequence_score,
)
from . import Task, check_input_size


class OATTask(Task):
    name = "oat"
    metric = "seq_score"
    shard_val = False  # decoding: every process evaluates the whole val split
    collate_fn = staticmethod(collate_scanpaths)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        a = parser.add_argument_group("oat: gaze scanpath prediction (the data folder holds records.json, crops.npz "
                                      "and an index file; --model is not used)")
        a.add_argument("--oat-task", help="which records to train on: their 'id' (Q1 wine, Q3 yogurt, amazon, ...); "
                                          "default: the only one in the folder")
        a.add_argument("--oat-index-file", default="splitlist.txt", help="the split order file in the data folder")
        a.add_argument("--oat-leave-out", metavar="LAYOUT:TARGET",
                       help="hold out this (layout_id, tgt_id) combination as the test set (the authors' "
                            "leave_one_comb_out); default: the 80/10/10 split")
        a.add_argument("--oat-crop-encoder", default="cnn", help="'cnn' (the paper's) or a timm/attnzoo model name")
        a.add_argument("--oat-pretrained", action="store_true", help="pretrained weights for the crop backbone")
        a.add_argument("--oat-crop-size", type=int, nargs=2, metavar=("H", "W"),
                       help="resize the crops to H x W (default: as stored)")
        a.add_argument("--oat-d-model", type=int, default=512)
        a.add_argument("--oat-heads", type=int, default=4)
        a.add_argument("--oat-layers", type=int, default=4, help="encoder layers, and as many decoder layers")
        a.add_argument("--oat-ffn", type=int, default=512)
        a.add_argument("--oat-dropout", type=float, default=0.1)
        a.add_argument("--oat-pointer-heads", type=int, default=2)
        a.add_argument("--oat-max-len", type=int,
                       help="decoding length (default: the longest training scanpath, as the authors)")

    def build(self):
        args = self.args
        records, crops, grids = load_oat_folder(args.data)
        ids = sorted({r["id"] for r in records})
        task = args.oat_task or (ids[0] if len(ids) == 1 else None)
        if task not in ids:
            raise InputError(f"--oat-task {args.oat_task!r}: choose one of the records' ids {ids}")
        leave_out = None
        if args.oat_leave_out:
            if ":" not in args.oat_leave_out:
                raise InputError(f"--oat-leave-out {args.oat_leave_out!r}: expected LAYOUT:TARGET")
            leave_out = tuple(args.oat_leave_out.split(":", 1))
        order = read_index_file(Path(args.data) / args.oat_index_file, len(records))
        splits = split_records(records, order, task, leave_out)
        if not splits["val"]:
            raise InputError(f"{args.data}: task {task!r} has too few records for a val split")
        self.grid = grids[task]
        train_set = OATScanpaths(splits["train"], crops, args.oat_crop_size)
        val_set = OATScanpaths(splits["val"], crops, args.oat_crop_size)
        crop_size = tuple(next(iter(train_set.layouts.values())).shape[-2:])
        self.max_len = args.oat_max_len or max(len(r["package_seq"]) for r in splits["train"])
        longest = max(len(r["package_seq"]) for part in splits.values() for r in part)
        self.config = dict(rows=self.grid.rows, cols=self.grid.cols, crop_encoder=args.oat_crop_encoder,
                           crop_size=crop_size, d_model=args.oat_d_model, nhead=args.oat_heads,
                           num_encoder_layers=args.oat_layers, num_decoder_layers=args.oat_layers,
                           dim_feedforward=args.oat_ffn, dropout=args.oat_dropout,
                           pointer_heads=args.oat_pointer_heads, max_len=max(self.max_len, longest))
        try:
            model = OAT(**self.config, pretrained=args.oat_pretrained)
        except ValueError as e:
            raise InputError(f"--oat-* options: {e}") from None
        if args.oat_crop_encoder != "cnn":
            check_input_size(model.crop_encoder.backbone, (3, *crop_size),
                             f"--oat-crop-encoder {args.oat_crop_encoder} on {crop_size[0]}x{crop_size[1]} crops")
        self.task_id = task
        self.centres = object_centres(self.grid.rows, self.grid.cols, self.grid.cell, self.grid.top)
        return model, train_set, val_set

    def loss(self, net, batch):
        logits = net(batch["crops"], batch["target"], batch["fixations"])
        return oat_loss(logits, batch["fixations"], self.grid.rows * self.grid.cols)

    @torch.no_grad()
    def evaluate(self, model, loader):
        """Teacher-forced loss and SIM; greedy decoding -> sequence score, behavioural delta, MultiMatch."""
        stop = model.stop_index
        loss_sum = tokens = 0.0
        scores, sims, pred_stats, human_stats = [], [], [], []
        mm: dict[str, list[float]] = {k: [] for k in MULTIMATCH_KEYS}
        for batch in loader:
            crops, target, fixations = (batch[k].to(self.run.device) for k in ("crops", "target", "fixations"))
            with self.run.autocast():
                logits = model(crops, target, fixations).float()
                decoded, _ = model.generate(crops, target, max_len=self.max_len)
            n = int((fixations >= 0).sum()) + len(fixations)  # the fixations and one stop per scanpath
            loss_sum += oat_loss(logits, fixations, stop).item() * n
            tokens += n
            probs = logits.softmax(-1).cpu().numpy()
            for i in range(len(target)):
                human = fixations[i][fixations[i] >= 0].tolist()
                pred = decoded[i][decoded[i] >= 0].tolist()
                t = int(target[i])
                scores.append(sequence_score(pred, human))
                sims.append(scanpath_sim(probs[i, : len(human)], human))
                pred_stats.append(behaviour(pred, t))
                human_stats.append(behaviour(human, t))
                for k, v in multimatch(self.centres[human], self.centres[pred], self.grid.size).items():
                    mm[k].append(v)
        out = {"val_loss": loss_sum / tokens, "seq_score": float(np.mean(scores)), "sim": float(np.mean(sims)),
               "delta": behaviour_delta(pred_stats, human_stats)}
        out.update({f"mm_{k}": float(np.mean(v)) for k, v in mm.items()})
        out["mm_mean"] = float(np.mean([out[f"mm_{k}"] for k in MULTIMATCH_KEYS]))
        return out

    def state(self):
        return {"task": self.task_id, **self.config, "decode_len": self.max_len}
