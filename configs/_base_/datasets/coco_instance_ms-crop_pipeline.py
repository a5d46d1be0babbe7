# The multi-scale + crop train pipeline of the 3x schedules (Swin, DaViT) for instance segmentation: shorter side
# 480-800, or resize 400-600 -> crop 384-600 -> resize 480-800. No base and a key of its own, not train_pipeline:
# mmengine forbids a key in two bases, so a 3x config that inherits its 1x config adds this file as a second base
#     _base_ = ['./<its 1x config>.py', '../_base_/datasets/coco_instance_ms-crop_pipeline.py']
#     train_pipeline = _base_.ms_crop_train_pipeline
#     train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
_scales = [(s, 1333) for s in range(480, 801, 32)]
ms_crop_train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),  # mmdet's COCO bases read from disk (backend_args None)
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice', transforms=[
        [dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)],
        [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
         dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
         dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)],
    ]),
    dict(type='PackDetInputs'),
]
