# UperNet (+ auxiliary FCN head on the stride-16 level) with an attnzoo/timm backbone, as mmseg's Swin UperNet.
# The family configs set model_name, out_indices and the heads' in_channels.
_base_ = 'mmseg::_base_/models/upernet_swin.py'
model = dict(
    backbone=dict(_delete_=True, type='AttnzooBackbone', model_name='davit_tiny', out_indices=(0, 1, 2, 3),
                  drop_path_rate=0.3, frozen_stages=-1, with_cp=False),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))
