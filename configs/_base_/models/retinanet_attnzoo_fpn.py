# RetinaNet with an attnzoo/timm backbone. The family configs set model_name, out_indices and neck.in_channels.
# Only the stride 8-32 levels feed the FPN (it adds P6, P7), as in mmdet's Swin RetinaNet.
_base_ = 'mmdet::_base_/models/retinanet_r50_fpn.py'
model = dict(
    backbone=dict(_delete_=True, type='AttnzooBackbone', model_name='davit_tiny', out_indices=(1, 2, 3),
                  drop_path_rate=0.2, frozen_stages=-1, with_cp=False),
    neck=dict(in_channels=[192, 384, 768], start_level=0, add_extra_convs='on_input', num_outs=5))
