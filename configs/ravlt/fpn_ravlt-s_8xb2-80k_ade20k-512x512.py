_base_ = [
    '../_base_/models/fpn_attnzoo.py', '../_base_/datasets/ade20k.py',
    'mmseg::_base_/schedules/schedule_80k.py', '../_base_/default_runtime_seg.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(model_name='ravlt_s', out_indices=(0, 1, 2, 3), drop_path_rate=0.15, out_norm=True,
                  init_cfg=dict(type='Pretrained', checkpoint='ravlt_s.in1k')),
    neck=dict(in_channels=[64, 128, 320, 512]))
# their Semantic FPN: AdamW lr 1e-4, weight decay 1e-4, mmseg's 80k poly schedule (whose floor is 1e-4)
optim_wrapper = dict(_delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4))
train_dataloader = dict(batch_size=2)  # 8 GPUs x 2 images
