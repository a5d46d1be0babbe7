# mmdet's runtime, plus attnzoo.det (mmcv op stand-in, AttnzooBackbone) and checkpoints that resume under
# torch.load(weights_only=True).
_base_ = 'mmdet::_base_/default_runtime.py'
custom_imports = dict(imports=['attnzoo.det'], allow_failed_imports=False)
custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]
