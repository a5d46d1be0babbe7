"""attnzoo: attention-based vision backbones for timm, running on fused Triton kernels.

Importing the package registers its models with timm (``timm.create_model("davit_tiny", pretrained=True)``).
"""
from . import backbones, kernels
from .kernels import use_backend, window_attention

__version__ = "0.1.0.dev0"
__all__ = ["backbones", "kernels", "use_backend", "window_attention"]
