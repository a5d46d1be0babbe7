_base_ = 'mmdet::_base_/default_runtime.py'
custom_imports = dict(imports=['attnzoo.det'], allow_failed_imports=False)
custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]
