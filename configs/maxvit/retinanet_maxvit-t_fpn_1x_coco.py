# MaxViT-T. The paper reports only Cascade Mask R-CNN (52.1 box / 44.6 mask AP, see the cascade config); the
# other heads use the hierarchical-transformer recipe. attnzoo's MaxViT pads block/grid partitions, so any input
# size works. out_indices 1-4: feature level 0 is the stride-2 stem.
_base_ = [
    '../_base_/models/retinanet_attnzoo_fpn.py', '../_base_/datasets/coco_detection.py',
    '../_base_/schedules/adamw_1x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='maxvit_tiny_tf_224', out_indices=(2, 3, 4), drop_path_rate=0.3,
                  init_cfg=dict(type='Pretrained', checkpoint='timm/maxvit_tiny_tf_224.in1k')),
    neck=dict(in_channels=[128, 256, 512]))
