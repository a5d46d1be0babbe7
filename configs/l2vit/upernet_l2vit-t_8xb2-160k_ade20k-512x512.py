_base_ = [
    '../_base_/models/upernet_attnzoo.py', '../_base_/datasets/ade20k.py',
    '../_base_/schedules/adamw_160k.py', '../_base_/default_runtime_seg.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(model_name='l2vit_tiny', out_indices=(0, 1, 2, 3), drop_path_rate=0.3, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='l2vit_tiny.in1k')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True))  # weight decay 0.01 on all parameters, as theirs
train_dataloader = dict(batch_size=2)  # 8 GPUs x 2 images
