_base_ = [
    '../_base_/models/retinanet_attnzoo_fpn.py', '../_base_/datasets/coco_detection.py',
    '../_base_/schedules/adamw_1x_warmup-500.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='ravlt_t', out_indices=(1, 2, 3), drop_path_rate=0.1, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='ravlt_t.in1k')),
    neck=dict(in_channels=[128, 256, 512]))
# their RetinaNet: AdamW lr 1e-4, weight decay 1e-4 on all parameters
optim_wrapper = dict(optimizer=dict(weight_decay=1e-4), paramwise_cfg=dict(_delete_=True))
