_base_ = [
    '../_base_/models/mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/adamw_1x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='davit_tiny', out_norm=True, out_indices=(0, 1, 2, 3), drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint='timm/davit_tiny.msft_in1k')),
    neck=dict(in_channels=[96, 192, 384, 768]))
