"""Root conftest: runs before any test module, so before triton is first imported.

Without a CUDA GPU the fused Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before `import triton` (and `import timm` / `import torchvision` already import it).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the tests choose their backend explicitly; a stray setting from the shell must not leak in
os.environ.pop("ATTNZOO_BACKEND", None)
