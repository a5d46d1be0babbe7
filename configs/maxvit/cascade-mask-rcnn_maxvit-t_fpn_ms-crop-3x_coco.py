_base_ = [
    '../_base_/models/cascade-mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance_ms-crop.py',
    '../_base_/schedules/adamw_3x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='maxvit_tiny_tf_224', out_indices=(1, 2, 3, 4), drop_path_rate=0.3,
                  init_cfg=dict(type='Pretrained', checkpoint='timm/maxvit_tiny_tf_224.in1k')),
    neck=dict(in_channels=[64, 128, 256, 512]))
