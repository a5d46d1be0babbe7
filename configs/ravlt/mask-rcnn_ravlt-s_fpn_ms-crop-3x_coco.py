# RAVLT, the authors' settings (qhfan/RALA: detection/configs/RALA, segmentation/configs/RALA): mmdet 2 / mmseg 0.x
# configs ported to mmdet 3 / mmseg 1, for the smallest size each table has (T for RetinaNet and Mask R-CNN 1x,
# S for the 3x schedules and segmentation). Their backbone puts a LayerNorm on each output (out_norm). They train
# in fp16 (add --amp to the training command) with mmdet's 500-iteration warm-up. COCO / ADE20K results from their
# README: T RetinaNet 1x 45.9 AP, Mask R-CNN 1x 47.3 / 42.7; S Mask R-CNN 3x 51.4 / 45.5, Cascade Mask R-CNN 3x
# 54.2 / 46.8, Semantic FPN 1x 49.5 mIoU, UperNet 2x (160k) 50.7 mIoU.
_base_ = [
    '../_base_/models/mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance_ms-crop.py',
    '../_base_/schedules/adamw_3x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='ravlt_s', out_indices=(0, 1, 2, 3), drop_path_rate=0.15, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='ravlt_s.in1k')),
    neck=dict(in_channels=[64, 128, 320, 512]))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
