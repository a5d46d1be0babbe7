# MaxViT paper, Table 4: Cascade Mask R-CNN, 3x, IN-1k pretrained MaxViT-T: 52.1 box AP / 44.6 mask AP
# (trained at 896^2).
_base_ = [
    '../_base_/models/cascade-mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance_ms-crop.py',
    '../_base_/schedules/adamw_3x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='maxvit_tiny_tf_224', out_indices=(1, 2, 3, 4), drop_path_rate=0.3,
                  init_cfg=dict(type='Pretrained', checkpoint='timm/maxvit_tiny_tf_224.in1k')),
    neck=dict(in_channels=[64, 128, 256, 512]))
