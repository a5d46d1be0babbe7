_base_ = [
    '../_base_/models/retinanet_attnzoo_fpn.py', '../_base_/datasets/coco_detection_ms-crop.py',
    '../_base_/schedules/adamw_1x_warmup-500.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='l2vit_tiny', out_indices=(1, 2, 3), drop_path_rate=0.1, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='l2vit_tiny.in1k')),
    neck=dict(in_channels=[192, 384, 768]))
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True))
