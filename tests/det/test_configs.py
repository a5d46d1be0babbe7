"""Every config in configs/ builds; per family a train step (loss.backward) and a predict call on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet", reason="the det extra is not installed")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import attnzoo.det  # noqa: E402, F401

CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "configs").rglob("*.py") if "_base_" not in p.parts)


def build(cfg):
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == "mmseg":
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    return MODELS.build(cfg.model)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_builds(path):
    cfg = Config.fromfile(path)
    model = build(cfg)
    assert cfg.custom_imports.imports == ["attnzoo.det"]
    assert dict(type="WeightsOnlyCheckpointHook") in cfg.custom_hooks
    neck = model.neck if hasattr(model, "neck") else model.decode_head
    in_channels = list(neck.in_channels)
    assert list(model.backbone.out_channels) == in_channels


def det_batch(model, size, with_mask):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8))
        s = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0),
                                        pad_shape=(size, size)))
        s.gt_instances = InstanceData(bboxes=torch.tensor([[8.0, 10.0, 60.0, 50.0], [30.0, 20.0, 90.0, 100.0]]),
                                      labels=torch.tensor([1, 3]))
        if with_mask:
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            masks[0, 10:50, 8:60] = 1
            masks[1, 20:100, 30:90] = 1
            s.gt_instances.masks = BitmapMasks(masks.numpy(), size, size)
        samples.append(s)
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)


# the smallest model of each family, at the smallest input it takes
FAMILIES = {
    "davit": ("davit/mask-rcnn_davit-t_fpn_1x_coco.py", 128),
    "maxvit": ("maxvit/mask-rcnn_maxvit-t_fpn_1x_coco.py", 128),
    "halonet": ("halonet/mask-rcnn_halonet26t_fpn_1x_coco.py", 256),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_train_step_and_predict(family):
    path, size = FAMILIES[family]
    cfg = Config.fromfile(Path(__file__).parents[2] / "configs" / path)
    cfg.model.backbone.init_cfg = None
    # fewer proposals and detections: the heads' cost, not the backbone's, dominates at this input size
    cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    cfg.model.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
    cfg.model.test_cfg.rcnn.max_per_img = 10
    torch.manual_seed(0)
    model = build(cfg)
    model.train()
    data = det_batch(model, size, with_mask=True)
    losses = model(**data, mode="loss")
    assert {"loss_rpn_cls", "loss_cls", "loss_bbox", "loss_mask"} <= set(losses)
    loss = sum(v for k, v in losses.items() if "loss" in k for v in (v if isinstance(v, list) else [v]))
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        (result, _) = model(**data, mode="predict")
    assert result.pred_instances.bboxes.shape[1] == 4
    assert len(result.pred_instances.masks) == len(result.pred_instances.bboxes)
