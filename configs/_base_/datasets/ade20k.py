_base_ = 'mmseg::_base_/datasets/ade20k.py'
