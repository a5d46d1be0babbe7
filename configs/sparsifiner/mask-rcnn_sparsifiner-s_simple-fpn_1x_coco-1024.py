# Sparsifiner-S (DeiT-S with the connectivity predictor). The paper has no detection or segmentation results; this is
# our reading, the plain-ViT recipe of ViTDet (Li et al., 2022): the last block's stride-16 map through a simple
# feature pyramid (SimpleFPN for mmdet; mmseg's MultiLevelNeck on blocks 4, 6, 8, 12 for UperNet, as mmseg's ViT
# configs), trained from the authors' starting point, DeiT-S ImageNet weights (position embedding resized by
# timm). The predictor has one row per token, so the model is built for one input size and every image is padded
# to it. Its top-k mask carries no gradient: the predictor learns only from the reconstruction loss of the paper's
# first phase, which these heads do not add, so here it keeps its initial connectivity (train it at this size with
# Sparsifiner.set_attn_recon first for the paper's learned sparsity).
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
