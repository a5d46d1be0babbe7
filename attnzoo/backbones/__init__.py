"""Backbones, one file per family, registered with timm on import.

DaViT, MaxViT and HaloNet deliberately take over timm's own model names (same tags, same state_dict layout, so
timm's published weights load unchanged). timm warns on every such re-registration; the warning is expected
here and silenced, so `import attnzoo` stays quiet.
"""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"Overwriting \S+ in registry", category=UserWarning)
    from . import davit, ela, halonet, l2vit, maxvit, ninformer, ravlt, sparsifiner, ulsam  # noqa: F401
