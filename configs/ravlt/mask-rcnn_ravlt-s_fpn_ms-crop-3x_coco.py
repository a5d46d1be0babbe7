_base_ = [
    '../_base_/models/mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance_ms-crop.py',
    '../_base_/schedules/adamw_3x_warmup-500.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='ravlt_s', out_indices=(0, 1, 2, 3), drop_path_rate=0.15, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='ravlt_s.in1k')),
    neck=dict(in_channels=[64, 128, 320, 512]))
