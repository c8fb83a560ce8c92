"""The process-wide CPU settings every Trainer stage runs under, made in one place.

* float32 denormals flushed to zero (:mod:`lightning_app.denormals`), as Keras's CPU backends (XLA, TensorFlow)
  compute; without it Adam's steps ran 2.8x slower once the gradients got tiny.
* freed memory kept in the process for reuse (:mod:`lightning_app.host_memory`); without it each batch's large
  tensors are page-faulted in afresh (MobileNetV2 extraction at 224 px on 2 cores: 53 -> 125 img/s via the CLI).

Called from :meth:`lightning_app.module.TransferModule.setup` and from the feature extractor's ``setup`` (its
predict loop runs before the module's ``setup``), with the Trainer's device: only a run on the CPU makes them (on
a GPU the activations live in device memory, and the host keeps glibc's defaults). Idempotent.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_app.denormals import flush_denormals
from lightning_app.host_memory import keep_freed_memory

_said = False


def trainer_device(module: Any) -> Optional[torch.device]:
    """The root device of ``module``'s Trainer (``None`` without one); in ``setup`` the module itself has not been
    moved there yet."""
    try:
        return module.trainer.strategy.root_device
    except (AttributeError, RuntimeError):  # no Trainer attached
        return None


def apply_cpu_settings(device: Union[torch.device, str, None] = None) -> None:
    """Flush float32 denormals and keep freed memory (module docstring) when ``device`` (the run's; ``None``: not
    known) is the CPU; says once when denormals are kept."""
    global _said
    if device is not None and torch.device(device).type != "cpu":
        return
    if not flush_denormals() and not _said:
        _said = True
        rank_zero_info("float32 denormals are kept on this CPU (flush-to-zero could not be set on every thread)")
    keep_freed_memory()


__all__ = ["apply_cpu_settings", "trainer_device"]
