# COCO instance segmentation with the multi-scale + crop train pipeline of coco_instance_ms-crop_pipeline.py.
_base_ = ['mmdet::_base_/datasets/coco_instance.py', './coco_instance_ms-crop_pipeline.py']
train_pipeline = _base_.ms_crop_train_pipeline
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
