# L2ViT-T, the authors' settings (ChuanyangZheng/L2ViT: object_detection/configs/L2ViT, semantic_segmentation/
# configs/novel): mmdet 2 / mmseg 0.x configs ported to mmdet 3 / mmseg 1. Their backbone puts a LayerNorm on each
# output (out_norm). Their detection configs train every schedule, 1x included, with the multi-scale + crop
# augmentation, AdamW lr 1e-4, weight decay 0.05 on all parameters, mmdet's 500-iteration warm-up; drop_path 0.1
# at 1x, 0.2 at 3x, 0.3 for UperNet. The COCO / ADE20K numbers are not in their README.
_base_ = [
    '../_base_/models/retinanet_attnzoo_fpn.py', '../_base_/datasets/coco_detection_ms-crop.py',
    '../_base_/schedules/adamw_1x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='l2vit_tiny', out_indices=(1, 2, 3), drop_path_rate=0.1, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='l2vit_tiny.in1k')),
    neck=dict(in_channels=[192, 384, 768]))
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
