# HaloNet (timm's halonet26t). The paper's COCO numbers were not published with code; the heads use the
# hierarchical-transformer recipe. Halo attention needs every feature map divisible by its block size 8, so
# inputs are padded to multiples of 256 (stride 32 x 8). out_indices 1-4: feature level 0 is the stride-2 stem.
_base_ = [
    '../_base_/models/mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/adamw_1x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    data_preprocessor=dict(pad_size_divisor=256),
    backbone=dict(model_name='halonet26t', out_indices=(1, 2, 3, 4), drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint='timm/halonet26t.a1h_in1k')),
    neck=dict(in_channels=[256, 512, 1024, 2048]))
