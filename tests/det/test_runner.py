"""mmengine Runner on a tiny COCO-format set written by the test: the loss falls, COCO mAP is computed, and the run
resumes from its checkpoint under torch.load(weights_only=True) (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD unset)."""
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


# about 3.5 minutes on 2 shared cores (Mask R-CNN, 10 iterations, COCO evaluation)
@pytest.mark.slow
def test_runner_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    write_shapes_coco(tmp_path / "data")
    torch.manual_seed(0)
    runner = Runner.from_cfg(tiny_cfg(tmp_path / "data", tmp_path / "work", max_iters=8))
    runner.train()
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    assert len(losses) == 8
    assert losses[-2:].mean() < losses[:2].mean()
    metrics = runner.val_loop.run()
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0 and "coco/segm_mAP" in metrics
    checkpoint = tmp_path / "work" / "iter_8.pth"
    assert checkpoint.exists()
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") is None
    torch.load(checkpoint, weights_only=True)  # the whole Runner checkpoint, message hub included

    cfg = tiny_cfg(tmp_path / "data", tmp_path / "work", max_iters=10)
    cfg.resume = True
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    assert resumed.iter == 10
    history = resumed.message_hub.get_scalar("train/loss").data[0]
    np.testing.assert_allclose(history[:8], losses)  # the smoothed logs came back with the checkpoint
    assert len(history) == 10
