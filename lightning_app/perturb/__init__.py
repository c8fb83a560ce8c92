"""Robustness perturbations in [0, 1] RGB pixel space, batched on any device.

* Corruptions: ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich 2019), 5 severities each::

      from lightning_app.perturb import corrupt, suite, CORRUPTIONS
      for name, severity in suite():            # ("clean", 0), ("gaussian_noise", 1), ...
          x_c = corrupt(x, name, severity, indices=batch_indices, seed=0, table="imagenet")

  ``CORRUPTIONS[name].exact`` is False for approximations (``snow``; ``frost`` without its
  photographs, which the ``[imagenet-c]`` extra installs); see ``.note``. Tables: ``imagenet``
  (224), ``imagenet299`` (Inception size), ``cifar10``, or ``auto`` (by image size).
* Attacks: ``fgsm`` / ``pgd`` (L-inf) against a model that maps [0, 1] images to logits
  (normalisation inside the model, e.g. ``nn.Sequential(Normalize(mean, std), backbone)``).
"""
from lightning_app.zoo.normalize import Normalize

from .attacks import fgsm, pgd
from .registry import (
    BENCHMARK_CORRUPTIONS,
    CLEAN,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    Corruption,
    corrupt,
    corruption_params,
    suite,
)
from .tables import AUTO, TABLES, SeverityTable, resolve_table

__all__ = [
    "AUTO",
    "BENCHMARK_CORRUPTIONS",
    "CLEAN",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "SEVERITIES",
    "TABLES",
    "Corruption",
    "Normalize",
    "SeverityTable",
    "corrupt",
    "corruption_params",
    "fgsm",
    "pgd",
    "resolve_table",
    "suite",
]
