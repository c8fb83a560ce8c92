"""The attack step: FGSM / PGD on a test batch, in [0, 1] pixel space through the model's own normalisation."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

from torch import Tensor, nn

from lightning_app.perturb import fgsm, pgd
from lightning_app.robustness.specs import Perturbation

INFERENCE_MODE_FIX = (
    "adversarial attacks need gradients in the test loop, which runs under torch.inference_mode by default. "
    "Set `trainer.inference_mode: false` in the YAML (or `--trainer.inference_mode false` on the command line, "
    "or `Trainer(inference_mode=False)` in Python), or remove the attacks."
)


def attack_batch(
    model: nn.Module,
    spec: Perturbation,
    images: Tensor,
    labels: Tensor,
    indices: Tensor,
    seed: int = 0,
    context: Optional[ContextManager] = None,
) -> Tensor:
    """Adversarial images for ``spec`` (an ``attack`` perturbation).

    ``model`` maps [0, 1] RGB images to logits (normalisation inside, e.g. a ``TransferModule``) and
    should be in eval mode. PGD's random start is seeded per (``seed``, dataset index), so results do
    not depend on batch size. ``context`` wraps the forward passes (e.g. the precision plugin's
    autocast). Gradients are enabled and inference mode is left inside the attack; parameter
    ``.grad`` are untouched.
    """
    if spec.kind != "attack":
        raise ValueError(f"{spec.key!r} is not an attack")
    if model.training:
        raise RuntimeError("attack the model in eval mode (BatchNorm would update its statistics in train mode)")
    kw = spec.kwargs
    with context or contextlib.nullcontext():
        if spec.name == "fgsm":
            return fgsm(model, images, labels, eps=kw["eps"])
        if spec.name == "pgd":
            return pgd(model, images, labels, eps=kw["eps"], alpha=kw["alpha"], steps=kw["steps"],
                       random_start=kw["random_start"], indices=indices, seed=seed)
    raise ValueError(f"unknown attack {spec.name!r}")


__all__ = ["INFERENCE_MODE_FIX", "attack_batch"]
