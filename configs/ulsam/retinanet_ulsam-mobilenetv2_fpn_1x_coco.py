_base_ = [
    '../_base_/models/retinanet_attnzoo_fpn.py', '../_base_/datasets/coco_detection.py',
    '../_base_/schedules/adamw_1x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='ulsam_mobilenetv2_100', out_indices=(2, 3, 4), drop_path_rate=0.0, frozen_stages=1,
                  norm_eval=True,
                  init_cfg=dict(type='Pretrained', checkpoint='hub/ulsam_mobilenetv2_100/model.safetensors')),
    neck=dict(in_channels=[32, 96, 320]))
