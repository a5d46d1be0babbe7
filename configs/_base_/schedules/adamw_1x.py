# The 1x (12 epochs) schedule of the hierarchical-transformer detection papers (Swin, DaViT): AdamW lr 1e-4,
# weight decay 0.05 (none on norms and position tables), 1000 iterations of linear warm-up, x0.1 at epochs 8, 11.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.), 'relative_position': dict(decay_mult=0.),
                                    'rel_pos': dict(decay_mult=0.), 'pos_embed': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
