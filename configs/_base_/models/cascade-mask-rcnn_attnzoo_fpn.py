# Cascade Mask R-CNN with an attnzoo/timm backbone. The family configs set model_name, out_indices and
# neck.in_channels.
_base_ = 'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py'
model = dict(
    backbone=dict(_delete_=True, type='AttnzooBackbone', model_name='davit_tiny', out_indices=(0, 1, 2, 3),
                  drop_path_rate=0.2, frozen_stages=-1, with_cp=False),
    neck=dict(in_channels=[96, 192, 384, 768]))
