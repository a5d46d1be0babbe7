_base_ = [
    '../_base_/models/upernet_attnzoo.py', '../_base_/datasets/ade20k.py',
    '../_base_/schedules/adamw_160k.py', '../_base_/default_runtime_seg.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size, test_cfg=dict(size_divisor=256)),
    backbone=dict(model_name='halonet26t', out_indices=(1, 2, 3, 4), drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint='timm/halonet26t.a1h_in1k')),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
    auxiliary_head=dict(in_channels=1024))
train_dataloader = dict(batch_size=2)  # 8 GPUs x 2 images
