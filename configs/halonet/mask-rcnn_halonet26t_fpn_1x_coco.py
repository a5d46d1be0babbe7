_base_ = [
    '../_base_/models/mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/adamw_1x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    data_preprocessor=dict(pad_size_divisor=256),
    backbone=dict(model_name='halonet26t', out_indices=(1, 2, 3, 4), drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint='timm/halonet26t.a1h_in1k')),
    neck=dict(in_channels=[256, 512, 1024, 2048]))
