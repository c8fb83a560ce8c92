"""Train-time augmentation on the device, on float [0, 1] batches (kornia: per-sample random parameters)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from lightning_app.errors import ConfigError


@dataclass
class Augment:
    """Which random augmentations to apply to training batches.

    Attributes:
        hflip: probability of a horizontal flip (Keras ``RandomFlip("horizontal")`` = 0.5).
        vflip: probability of a vertical flip.
        crop_scale: ``(min, max)`` area fraction for a random resized crop back to the input
            size (e.g. ``(0.08, 1.0)`` Inception-style); ``None`` = off.
        rotation: maximum rotation in degrees (uniform in ``[-rotation, rotation]``); 0 = off.
        color_jitter: brightness / contrast / saturation strength (hue gets a quarter); 0 = off.
    """

    hflip: float = 0.5
    vflip: float = 0.0
    crop_scale: Optional[Tuple[float, float]] = None
    rotation: float = 0.0
    color_jitter: float = 0.0

    def is_identity(self) -> bool:
        """True when no augmentation would ever change a batch."""
        return (self.hflip <= 0 and self.vflip <= 0 and self.crop_scale is None
                and self.rotation <= 0 and self.color_jitter <= 0)


AugmentArg = Union[bool, Augment, None]


def resolve_augment(augment: AugmentArg) -> Augment:
    """``True`` -> default :class:`Augment` (horizontal flip); ``False``/``None`` -> no augmentation."""
    if isinstance(augment, Augment):
        return augment
    if augment is None or augment is False:
        return Augment(hflip=0.0)
    if augment is True:
        return Augment()
    if isinstance(augment, dict):
        return Augment(**augment)
    raise TypeError(f"augment must be a bool or an Augment, got {type(augment).__name__}")


def build_augmentation(cfg: Augment, image_size: Tuple[int, int]) -> Optional[nn.Module]:
    """A kornia pipeline for ``cfg`` (input and output ``[B, 3, H, W]`` in [0, 1]), or ``None``."""
    if cfg.is_identity():
        return None
    import kornia.augmentation as K  # late import: only needed when augmenting

    ops = []
    if cfg.crop_scale is not None:
        lo, hi = cfg.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {cfg.crop_scale}")
        ops.append(K.RandomResizedCrop(tuple(image_size), scale=(lo, hi)))
    if cfg.hflip > 0:
        ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        ops.append(K.RandomVerticalFlip(p=cfg.vflip))
    if cfg.rotation > 0:
        ops.append(K.RandomRotation(degrees=float(cfg.rotation), p=1.0))
    if cfg.color_jitter > 0:
        s = float(cfg.color_jitter)
        ops.append(K.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4), p=1.0))
    return _Clamp01(nn.Sequential(*ops))


class _Clamp01(nn.Module):
    """Run the pipeline without gradients and clamp to [0, 1] (colour jitter can overshoot)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.inner(x).clamp_(0.0, 1.0)
