# adamw_1x with mmdet's 500-iteration linear warm-up (the L2ViT and RAVLT authors' configs) instead of 1000.
_base_ = './adamw_1x.py'
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
