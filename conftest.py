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
# one intra-op thread per xdist worker: with a worker per core, more threads only contend (small ops slow down
# by orders of magnitude)
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
