"""Noise corruptions (ImageNet-C ``gaussian_noise``, ``shot_noise``, ``impulse_noise``, ``speckle_noise``).

Each takes ``x`` (``[B, 3, H, W]`` float in [0, 1]), the severity's parameter from the table
and the per-sample random streams; all draws are per element (every channel independently),
as in the reference, which works on ``H x W x 3`` arrays.
"""
from __future__ import annotations

from torch import Tensor

from ._rng import SampleRNG


def gaussian_noise(x: Tensor, sigma: float, rng: SampleRNG) -> Tensor:
    """``clip(x + N(0, sigma^2))``."""
    return (x + rng.normal(x.shape[1:], dtype=x.dtype) * sigma).clamp_(0, 1)


def shot_noise(x: Tensor, lam: float, rng: SampleRNG) -> Tensor:
    """``clip(Poisson(x * lam) / lam)``."""
    return (rng.poisson(x * lam) / lam).clamp_(0, 1)


def impulse_noise(x: Tensor, amount: float, rng: SampleRNG) -> Tensor:
    """Salt and pepper: each element is replaced with probability ``amount``, by 1 or 0 with
    equal probability (``skimage.util.random_noise(mode='s&p')``, per element as in
    scikit-image >= 0.19; older versions drew a fixed count ``ceil(amount * size / 2)`` of
    salt and of pepper positions with replacement)."""
    # one draw u per element: flipped if u < amount; given that, u < amount / 2 is a fair coin
    u = rng.uniform(x.shape[1:], dtype=x.dtype)
    return x.masked_fill(u < amount, 0.0).masked_fill_(u < 0.5 * amount, 1.0)


def speckle_noise(x: Tensor, c: float, rng: SampleRNG) -> Tensor:
    """``clip(x + x * N(0, c^2))``."""
    return (x + x * rng.normal(x.shape[1:], dtype=x.dtype) * c).clamp_(0, 1)
