# COCO detection (boxes only) with the multi-scale + crop train pipeline of coco_instance_ms-crop_pipeline.py, less
# the masks, which the L2ViT authors use for RetinaNet too (their configs, "augmentation strategy originates from
# DETR / Sparse RCNN").
_base_ = ['mmdet::_base_/datasets/coco_detection.py', './coco_instance_ms-crop_pipeline.py']
train_pipeline = [dict(type='LoadAnnotations', with_bbox=True) if t.type == 'LoadAnnotations' else t
                  for t in _base_.ms_crop_train_pipeline]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
