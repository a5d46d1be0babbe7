_base_ = './mask-rcnn_l2vit-t_fpn_ms-crop-1x_coco.py'  # the 1x already trains with the ms-crop pipeline
model = dict(backbone=dict(drop_path_rate=0.2))
train_cfg = dict(max_epochs=36)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
