# Semantic FPN (Kirillov et al., 2019; mmseg's FPN + FPNHead) with an attnzoo/timm backbone. The family configs set
# model_name, out_indices and neck.in_channels.
_base_ = 'mmseg::_base_/models/fpn_r50.py'
model = dict(
    pretrained=None,
    backbone=dict(_delete_=True, type='AttnzooBackbone', model_name='davit_tiny', out_indices=(0, 1, 2, 3),
                  drop_path_rate=0.1, frozen_stages=-1, with_cp=False),
    neck=dict(in_channels=[96, 192, 384, 768]),
    decode_head=dict(num_classes=150))
