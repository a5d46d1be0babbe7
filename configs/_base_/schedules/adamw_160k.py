# UperNet on ADE20K as in Swin and DaViT: 160k iterations at batch 16 (8 GPUs x 2), AdamW lr 6e-5, weight decay
# 0.01 (none on norms and position tables), 1500 iterations of linear warm-up, then linear decay to 0.
_base_ = 'mmseg::_base_/schedules/schedule_160k.py'
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.), 'relative_position': dict(decay_mult=0.),
                                    'rel_pos': dict(decay_mult=0.), 'pos_embed': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
