"""mmengine Runner on tiny sets written by the tests (COCO-format shapes for Mask R-CNN, ADE-like PNG label maps for
UperNet): the loss falls, COCO mAP / mIoU are computed, and the run resumes from its checkpoint under
torch.load(weights_only=True) (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD unset)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="the det extra is not installed")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import attnzoo.det  # noqa: E402, F401

CONFIGS = Path(__file__).parents[2] / "configs"
SMALL = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))


def write_shapes_coco(root: Path, n: int = 4, size: int = 96) -> None:
    """n images, each with a filled rectangle (class 0) and a disc (class 1), as COCO json with polygons."""
    import cv2

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        img = np.full((size, size, 3), 40, np.uint8)
        x, y = rng.integers(4, 30, 2)
        w, h = rng.integers(24, 40, 2)
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), (220, 60, 60), -1)
        cx, cy, r = int(rng.integers(60, 80)), int(rng.integers(60, 80)), int(rng.integers(8, 14))
        cv2.circle(img, (cx, cy), r, (60, 200, 60), -1)
        cv2.imwrite(str(root / "images" / f"{i}.png"), img)
        images.append(dict(id=i, file_name=f"{i}.png", width=size, height=size))
        rect = [float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        disc = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).ravel().tolist()
        for cat, poly, box in ((0, rect, [x, y, w, h]), (1, disc, [cx - r, cy - r, 2 * r, 2 * r])):
            annotations.append(dict(id=len(annotations), image_id=i, category_id=cat, segmentation=[poly],
                                    bbox=[float(b) for b in box], area=float(box[2] * box[3]), iscrowd=0))
    categories = [dict(id=0, name="rectangle"), dict(id=1, name="disc")]
    (root / "ann.json").write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))


def tiny_cfg(root: Path, work_dir: Path, max_iters: int) -> Config:
    cfg = Config.fromfile(CONFIGS / "davit/mask-rcnn_davit-t_fpn_1x_coco.py")
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.update(init_cfg=None, **SMALL)
    cfg.model.neck.in_channels = list(SMALL["embed_dims"])
    cfg.model.roi_head.bbox_head.num_classes = 2
    cfg.model.roi_head.mask_head.num_classes = 2
    metainfo = dict(classes=("rectangle", "disc"))
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
                dict(type="Resize", scale=(96, 96), keep_ratio=True), dict(type="PackDetInputs")]
    dataset = dict(type="CocoDataset", data_root=str(root), ann_file="ann.json", metainfo=metainfo,
                   data_prefix=dict(img="images/"), pipeline=pipeline)
    loader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                  sampler=dict(type="DefaultSampler", shuffle=False), dataset=dataset)
    cfg.train_dataloader = loader
    cfg.val_dataloader = cfg.test_dataloader = dict(
        loader, dataset=dict(dataset, test_mode=True, pipeline=pipeline[:1] + pipeline[2:3] + [
            dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
            dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]))
    cfg.val_evaluator = cfg.test_evaluator = dict(type="CocoMetric", ann_file=str(root / "ann.json"),
                                                  metric=["bbox", "segm"])
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
    cfg.optim_wrapper.optimizer.lr = 1e-3
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=max_iters, by_epoch=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.log_processor = dict(by_epoch=False)
    cfg.default_hooks.visualization = dict(type="DetVisualizationHook")
    cfg.launcher = "none"
    return cfg


def train_evaluate_resume(make_cfg, data: Path, work: Path) -> dict:
    """8 iterations in which the loss falls, a checkpoint that ``torch.load(weights_only=True)`` reads whole
    (message hub included), then a resumed run to 10 that brings back the logged losses; returns the metrics."""
    torch.manual_seed(0)
    runner = Runner.from_cfg(make_cfg(data, work, max_iters=8))
    runner.train()
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    assert len(losses) == 8
    assert losses[-2:].mean() < losses[:2].mean()
    metrics = runner.val_loop.run()
    checkpoint = work / "iter_8.pth"
    assert checkpoint.exists()
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") is None
    torch.load(checkpoint, weights_only=True)

    cfg = make_cfg(data, work, max_iters=10)
    cfg.resume = True
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    assert resumed.iter == 10
    history = resumed.message_hub.get_scalar("train/loss").data[0]
    np.testing.assert_allclose(history[:8], losses)  # the smoothed logs came back with the checkpoint
    assert len(history) == 10
    return metrics


# about 3.5 minutes on 2 shared cores (Mask R-CNN, 10 iterations, COCO evaluation)
@pytest.mark.slow
def test_runner_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    write_shapes_coco(tmp_path / "data")
    metrics = train_evaluate_resume(tiny_cfg, tmp_path / "data", tmp_path / "work")
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0 and "coco/segm_mAP" in metrics


def write_shapes_ade(root: Path, n: int = 4, size: int = 64) -> None:
    """n images with a rectangle and a disc on a floor, and their label maps as ADE20K stores them: PNGs of class
    index + 1, where 0 (here a 2-pixel frame) is "unlabelled" and reduce_zero_label maps it to the ignore index."""
    import cv2

    rng = np.random.default_rng(0)
    for sub in ("images", "annotations"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        img = np.full((size, size, 3), 40, np.uint8)
        label = np.full((size, size), 1, np.uint8)  # floor
        x, y = (int(v) for v in rng.integers(4, 20, 2))
        w, h = (int(v) for v in rng.integers(14, 24, 2))
        cv2.rectangle(img, (x, y), (x + w, y + h), (220, 60, 60), -1)
        cv2.rectangle(label, (x, y), (x + w, y + h), 2, -1)
        cx, cy, r = int(rng.integers(40, 52)), int(rng.integers(40, 52)), int(rng.integers(6, 10))
        cv2.circle(img, (cx, cy), r, (60, 200, 60), -1)
        cv2.circle(label, (cx, cy), r, 3, -1)
        label[:2], label[-2:], label[:, :2], label[:, -2:] = 0, 0, 0, 0
        cv2.imwrite(str(root / "images" / f"{i}.png"), img)
        cv2.imwrite(str(root / "annotations" / f"{i}.png"), label)


def tiny_seg_cfg(root: Path, work_dir: Path, max_iters: int) -> Config:
    cfg = Config.fromfile(CONFIGS / "l2vit/upernet_l2vit-t_8xb2-160k_ade20k-512x512.py")
    cfg.work_dir = str(work_dir)
    dims = [16, 32, 64, 128]
    cfg.model.backbone.update(init_cfg=None, depths=(1, 1, 1, 1), dims=dims, num_heads=(1, 2, 4, 8))
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.model.decode_head.update(in_channels=dims, channels=32, num_classes=3)
    cfg.model.auxiliary_head.update(in_channels=dims[2], channels=16, num_classes=3)
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
                dict(type="PackSegInputs")]
    dataset = dict(type="BaseSegDataset", data_root=str(root), img_suffix=".png", seg_map_suffix=".png",
                   reduce_zero_label=True, data_prefix=dict(img_path="images", seg_map_path="annotations"),
                   metainfo=dict(classes=("floor", "rectangle", "disc"), palette=[[40, 40, 40], [220, 60, 60],
                                                                                   [60, 200, 60]]),
                   pipeline=pipeline)
    loader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                  sampler=dict(type="DefaultSampler", shuffle=False), dataset=dataset)
    cfg.train_dataloader = loader
    cfg.val_dataloader = cfg.test_dataloader = dict(loader, batch_size=1)
    cfg.val_evaluator = cfg.test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
    cfg.optim_wrapper.optimizer.lr = 1e-3
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=max_iters, by_epoch=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.launcher = "none"
    return cfg


def test_seg_runner_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    write_shapes_ade(tmp_path / "data")
    metrics = train_evaluate_resume(tiny_seg_cfg, tmp_path / "data", tmp_path / "work")
    assert 0.0 <= metrics["mIoU"] <= 100.0 and "aAcc" in metrics
