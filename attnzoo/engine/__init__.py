"""The training engine behind ``tools/train.py``: what every :class:`attnzoo.tasks.Task` is trained with.

- :mod:`~attnzoo.engine.run`: :class:`Run`, the process's context (process group, device, autocast), and
  :func:`output_lock`, one run per output folder;
- :mod:`~attnzoo.engine.sampler`: the resumable data order and per-sample seeded augmentation;
- :mod:`~attnzoo.engine.checkpoint`: the checkpoint format (safetensors + JSON, atomic, sha256-checked);
- :mod:`~attnzoo.engine.trainer`: :class:`Trainer`, the loop (DDP, AMP, accumulation, EMA), and :func:`train`;
- :mod:`~attnzoo.engine.log`: ``log.csv``, TensorBoard and ``curves.png``.

The task (``attnzoo.tasks``) supplies the model, the data, the loss and the metrics.
"""
from .checkpoint import find_checkpoint, last_checkpoint, read_state, resume_checkpoint, task_state, verify_checkpoint
from .log import Log
from .run import AMP_CHOICES, Run, output_lock
from .sampler import EpochSampler, SeededSamples
from .trainer import RESUME_OVERRIDES, Trainer, train

__all__ = ["AMP_CHOICES", "RESUME_OVERRIDES", "EpochSampler", "Log", "Run", "SeededSamples", "Trainer",
           "find_checkpoint", "last_checkpoint", "output_lock", "read_state", "resume_checkpoint", "task_state",
           "train", "verify_checkpoint"]
