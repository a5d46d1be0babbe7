_base_ = ['./mask-rcnn_davit-t_fpn_1x_coco.py', '../_base_/datasets/coco_instance_ms-crop_pipeline.py']
train_pipeline = _base_.ms_crop_train_pipeline
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
train_cfg = dict(max_epochs=36)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
