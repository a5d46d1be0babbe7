_base_ = [
    '../_base_/models/cascade-mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance_ms-crop.py',
    '../_base_/schedules/adamw_3x_warmup-500.py', '../_base_/default_runtime_det.py',
]
# their cascade heads (as Swin's): 4 convs + 1 fc with SyncBN, GIoU box loss on decoded boxes
_stage_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
model = dict(
    backbone=dict(model_name='ravlt_s', out_indices=(0, 1, 2, 3), drop_path_rate=0.15, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='ravlt_s.in1k')),
    neck=dict(in_channels=[64, 128, 320, 512]),
    roi_head=dict(bbox_head=[
        dict(type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256, conv_out_channels=256,
             fc_out_channels=1024, roi_feat_size=7, num_classes=80, reg_class_agnostic=False, reg_decoded_bbox=True,
             bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
             norm_cfg=dict(type='SyncBN', requires_grad=True),
             loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
             loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
        for stds in _stage_stds]))
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.))
