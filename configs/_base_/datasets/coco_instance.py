_base_ = 'mmdet::_base_/datasets/coco_instance.py'
