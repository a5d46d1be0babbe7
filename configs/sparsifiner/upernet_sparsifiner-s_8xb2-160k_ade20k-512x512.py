_base_ = [
    '../_base_/models/upernet_attnzoo.py', '../_base_/datasets/ade20k.py',
    '../_base_/schedules/adamw_160k.py', '../_base_/default_runtime_seg.py',
]
crop_size = (512, 512)
model = dict(
    # test images are cut into 512x512 windows, each padded to the full window
    data_preprocessor=dict(size=crop_size, test_cfg=dict(size=crop_size)),
    backbone=dict(model_name='sparsifiner_deit_small_patch16_224', img_size=512, out_indices=(3, 5, 7, 11),
                  drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint='sparsifiner_deit_small_patch16_224.deit_init')),
    neck=dict(type='MultiLevelNeck', in_channels=[384, 384, 384, 384], out_channels=384, scales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))
train_dataloader = dict(batch_size=2)  # 8 GPUs x 2 images
find_unused_parameters = True  # the predictor gets no gradient here; DDP must not wait for one
