"""Every config in configs/ builds; per family a train step (loss.backward) and a predict call on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet", reason="the det extra is not installed")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import attnzoo.det  # noqa: E402, F401
from attnzoo.det import AttnzooBackbone  # noqa: E402

CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "configs").rglob("*.py") if "_base_" not in p.parts)


def build(cfg):
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == "mmseg":
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    return MODELS.build(cfg.model)


def test_every_family_but_ninformer_has_configs():
    import attnzoo.backbones as families

    modules = {p.stem for p in Path(families.__file__).parent.glob("[!_]*.py")}
    with_configs = {p.parent.name for p in CONFIGS}
    assert modules - with_configs == {"ninformer"}  # its token-mixing MLP takes one token count (README)


@pytest.mark.parametrize("folder", sorted({p.parent for p in CONFIGS}), ids=lambda p: p.name)
def test_folder_documents_its_configs(folder):
    import yaml

    root = folder.parents[1]
    meta = yaml.safe_load((folder / "metafile.yml").read_text())
    assert (folder / "README.md").is_file()
    listed = [root / m["Config"] for m in meta["Models"]]
    assert sorted(listed) == sorted(folder.glob("*.py"))  # every config listed once, and only configs that exist
    assert {m["In Collection"] for m in meta["Models"]} == {c["Name"] for c in meta["Collections"]}
    readme = (folder / "README.md").read_text()
    assert all(f"({p.name})" in readme for p in listed)  # the README's table links every config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_builds(path):
    cfg = Config.fromfile(path)
    with torch.device("meta"):  # the structure and channel plumbing are under test, not the weights: no init cost
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
    # two boxes, as fractions of the image side: x1, y1, x2, y2
    boxes = (torch.tensor([[0.0625, 0.078, 0.47, 0.39], [0.23, 0.16, 0.7, 0.78]]) * size).round()
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8))
        s = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0),
                                        pad_shape=(size, size)))
        s.gt_instances = InstanceData(bboxes=boxes.clone(), labels=torch.tensor([1, 3]))
        if with_mask:
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist(), strict=True):
                mask[y1:y2, x1:x2] = 1
            s.gt_instances.masks = BitmapMasks(masks.numpy(), size, size)
        samples.append(s)
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)


# per family: a config, the input size, and backbone arguments that shrink it (None: the smallest model as
# configured); the neck's in_channels follow the shrunken backbone
FAMILIES = {
    "davit": ("davit/mask-rcnn_davit-t_fpn_1x_coco.py", 128, None),
    "maxvit": ("maxvit/mask-rcnn_maxvit-t_fpn_1x_coco.py", 128, None),
    "halonet": ("halonet/mask-rcnn_halonet26t_fpn_1x_coco.py", 256, None),
    "l2vit": ("l2vit/mask-rcnn_l2vit-t_fpn_ms-crop-1x_coco.py", 64,
              dict(depths=(1, 2, 1, 1), dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))),
    "ravlt": ("ravlt/mask-rcnn_ravlt-t_fpn_1x_coco.py", 64,
              dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))),
    "sparsifiner": ("sparsifiner/mask-rcnn_sparsifiner-s_simple-fpn_1x_coco-1024.py", 64,
                    dict(img_size=64, depth=2, embed_dim=64, num_heads=2, out_indices=(1,), basis_topk=2)),
    "ela": ("ela/retinanet_ela-s-resnet50_fpn_1x_coco.py", 64, dict(model_name="ela_s_resnet18")),
    "ulsam": ("ulsam/retinanet_ulsam-mobilenetv2_fpn_1x_coco.py", 64, None),
}


def shrink(cfg, **backbone_args) -> None:
    cfg.model.backbone.update(backbone_args)
    args = {k: v for k, v in cfg.model.backbone.items() if k != "type"}
    cfg.model.neck.in_channels = list(AttnzooBackbone(**args).out_channels)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_step_and_predict(family):
    path, size, backbone_args = FAMILIES[family]
    cfg = Config.fromfile(Path(__file__).parents[2] / "configs" / path)
    cfg.model.backbone.init_cfg = None
    if backbone_args:
        shrink(cfg, **backbone_args)
    two_stage = "rpn_head" in cfg.model
    heads = [cfg.model.roi_head.bbox_head, cfg.model.roi_head.mask_head] if two_stage else [cfg.model.bbox_head]
    for head in heads:
        head.num_classes = 4  # the labels below are 1 and 3; 80 classes only multiply the post-processing
    if two_stage:
        # fewer proposals and detections: the heads' cost, not the backbone's, dominates at this input size
        cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
        cfg.model.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
        cfg.model.test_cfg.rcnn.update(max_per_img=10, score_thr=0.0)  # untrained: keep low scores, masks included
    else:
        cfg.model.test_cfg.update(nms_pre=200, max_per_img=10, score_thr=0.0)
    torch.manual_seed(0)
    model = build(cfg)
    model.train()
    data = det_batch(model, size, with_mask=two_stage)
    losses = model(**data, mode="loss")
    assert ({"loss_rpn_cls", "loss_cls", "loss_bbox", "loss_mask"} if two_stage else {"loss_cls", "loss_bbox"}) \
        <= set(losses)
    loss = sum(v for k, v in losses.items() if "loss" in k for v in (v if isinstance(v, list) else [v]))
    loss.backward()
    # Sparsifiner's connectivity predictor chooses keys through a top-k, which passes no gradient
    # (configs/sparsifiner/README.md)
    grads = [p.grad for n, p in model.backbone.named_parameters() if p.requires_grad and ".mask_predictor." not in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        (result, _) = model(**data, mode="predict")
    assert result.pred_instances.bboxes.shape[1] == 4
    assert len(result.pred_instances.scores) == len(result.pred_instances.bboxes) > 0
    if two_stage:
        assert len(result.pred_instances.masks) == len(result.pred_instances.bboxes)
