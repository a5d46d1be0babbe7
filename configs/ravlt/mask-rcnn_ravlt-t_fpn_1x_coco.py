_base_ = [
    '../_base_/models/mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/adamw_1x_warmup-500.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='ravlt_t', out_indices=(0, 1, 2, 3), drop_path_rate=0.1, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='ravlt_t.in1k')),
    neck=dict(in_channels=[64, 128, 256, 512]))
