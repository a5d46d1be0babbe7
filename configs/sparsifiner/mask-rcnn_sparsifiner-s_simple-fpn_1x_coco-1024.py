_base_ = [
    '../_base_/models/mask-rcnn_attnzoo_fpn.py', '../_base_/datasets/coco_instance_fixed-1024.py',
    '../_base_/schedules/adamw_1x.py', '../_base_/default_runtime_det.py',
]
model = dict(
    backbone=dict(model_name='sparsifiner_deit_small_patch16_224', img_size=1024, out_indices=(11,),
                  drop_path_rate=0.1,
                  init_cfg=dict(type='Pretrained', checkpoint='sparsifiner_deit_small_patch16_224.deit_init')),
    neck=dict(_delete_=True, type='SimpleFPN', in_channels=[384], out_channels=256,
              scale_factors=(4.0, 2.0, 1.0, 0.5), num_outs=5))
find_unused_parameters = True  # the predictor gets no gradient here; DDP must not wait for one
