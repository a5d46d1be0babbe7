# Sparsifiner-S (DeiT-S with the connectivity predictor). The paper has no detection or segmentation results; this is
# our reading, the plain-ViT recipe of ViTDet (Li et al., 2022): the last block's stride-16 map through a simple
# feature pyramid (SimpleFPN for mmdet; mmseg's MultiLevelNeck on blocks 4, 6, 8, 12 for UperNet, as mmseg's ViT
# configs), trained from the authors' starting point, DeiT-S ImageNet weights (position embedding resized by
# timm). The predictor has one row per token, so the model is built for one input size and every image is padded
# to it. Its top-k mask carries no gradient: the predictor learns only from the reconstruction loss of the paper's
# first phase, which these heads do not add, so here it keeps its initial connectivity (train it at this size with
# Sparsifiner.set_attn_recon first for the paper's learned sparsity).
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
