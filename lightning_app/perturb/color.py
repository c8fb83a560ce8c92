"""Colour corruptions (ImageNet-C ``brightness``, ``contrast``, ``saturate``).

``brightness`` and ``saturate`` change one HSV channel (scikit-image ``rgb2hsv`` /
``hsv2rgb`` in the reference). They are computed here in closed form, which is the same
function without the hue round trip: every RGB channel is ``V * (1 - S * g(H))`` with
``g`` depending on hue only, so changing V scales RGB by ``V' / V`` and changing S scales
``V - RGB`` by ``S' / S``. scikit-image gives grey pixels (S = 0) hue 0 (red), so a grey
pixel that gains saturation becomes ``(V, V (1 - S'), V (1 - S'))``, as here.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._rng import SampleRNG


def brightness(x: Tensor, c: float, rng: SampleRNG) -> Tensor:
    """HSV ``V = clip(V + c, 0, 1)``."""
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp_(0, 1)
    scale = torch.where(v > 0, v_new / v.clamp_min(1e-12), torch.zeros_like(v))
    return torch.where(v > 0, x * scale, v_new.expand_as(x)).clamp_(0, 1)


def contrast(x: Tensor, c: float, rng: SampleRNG) -> Tensor:
    """``clip((x - mean) * c + mean)``, per-channel spatial mean."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp_(0, 1)


def saturate(x: Tensor, p: Tuple[float, float], rng: SampleRNG) -> Tensor:
    """HSV ``S = clip(S * a + b, 0, 1)``."""
    a, b = p
    v = x.amax(dim=1, keepdim=True)
    delta = v - x.amin(dim=1, keepdim=True)
    colored = delta > 0
    s = torch.where(colored, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * a + b).clamp_(0, 1)
    ratio = torch.where(colored, s_new / s.clamp_min(1e-12), torch.zeros_like(s))
    out_colored = v - (v - x) * ratio
    low = v * (1 - s_new)
    out_grey = torch.cat([v, low, low], dim=1)
    return torch.where(colored, out_colored, out_grey).clamp_(0, 1)
