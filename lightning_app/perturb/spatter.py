"""ImageNet-C ``spatter`` (an extra corruption of the weather group): water drops or mud splashes.

Both variants start from a liquid layer: ``N(loc, scale)`` per pixel, Gaussian-blurred
(``skimage.filters.gaussian``, float64), zeroed below ``threshold``.

* water (``mud == 0``, severities 1-3): the layer as 8 bits, its Canny edges, the chamfer distance to
  them (capped at 20), 3x3 blur, histogram equalisation, an emboss-like 3x3 filter, 3x3 blur: a
  drop texture ``m``, normalised to its maximum times ``intensity``; the image gains
  ``m * (175, 238, 238) / 255`` (pale turquoise).
* mud (``mud == 1``, severities 4-5): the blurred mask ``layer > threshold`` (``sigma = intensity``),
  zeroed below 0.8, replaces the image by mud brown ``(63, 42, 20) / 255`` with that weight.

The OpenCV steps are in :mod:`._cv` (integer-exact; the float32 chamfer distances can differ from
OpenCV's in the last bit, which changes the 8-bit texture where a blurred distance sits on an integer).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _cv
from ._ops import correlate1d, gaussian_filter, gaussian_kernel1d
from ._rng import SampleRNG

#: ``ker`` of the reference's ``cv2.filter2D`` step.
EMBOSS = ((-2, -1, 0), (-1, 1, 1), (0, 1, 2))
WATER_RGB = (175, 238, 238)
MUD_RGB = (63, 42, 20)
CANNY_THRESHOLDS = (50, 150)
DISTANCE_CAP = 20.0


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def liquid_layer(rng: SampleRNG, h: int, w: int, loc: float, scale: float, sigma: float, threshold: float,
                 device: torch.device) -> Tensor:
    """``[B, h, w]`` float64: normal draws, Gaussian blur (scipy ``nearest`` border), zeroed below ``threshold``."""
    layer = rng.normal((h, w), loc, scale, dtype=_float_dtype(device))
    layer = gaussian_filter(layer, sigma)
    return layer.masked_fill_(layer < threshold, 0.0)


def water_texture(layer: Tensor) -> Tensor:
    """The reference's drop texture ``liquid_layer * dist`` before normalisation, float32 ``[B, h, w]``."""
    u8 = torch.remainder(torch.floor(layer * 255), 256).to(torch.int32)  # numpy astype(uint8) wraps
    edges = _cv.canny(u8, *CANNY_THRESHOLDS)
    dist = _cv.chamfer_distance(edges, DISTANCE_CAP)
    dist = torch.floor(_cv.box3(dist)).to(torch.int32)  # astype(uint8) truncates (values 0..20)
    dist = _cv.equalize_hist(dist)
    dist = _cv.filter3_u8(dist, EMBOSS)
    dist = _cv.box3_u8(dist).to(torch.float32)
    return u8.to(torch.float32) * dist


def _color(rgb: Tuple[int, int, int], like: Tensor) -> Tensor:
    return torch.tensor([v / 255.0 for v in rgb], dtype=torch.float32, device=like.device).view(1, 3, 1, 1)


def water(x: Tensor, layer: Tensor, intensity: float) -> Tensor:
    m = water_texture(layer)
    peak = m.amax(dim=(1, 2), keepdim=True)
    # the reference divides by the peak (NaN for a layer without drops); no drops here means no change
    m = torch.where(peak > 0, m / peak.clamp_min(1e-30), 0.0) * intensity
    return (x + m[:, None].to(x.dtype) * _color(WATER_RGB, x).to(x.dtype)).clamp_(0, 1)


def mud(x: Tensor, layer: Tensor, threshold: float, intensity: float) -> Tensor:
    mask = (layer > threshold).to(_float_dtype(x.device))
    # skimage.filters.gaussian of a float32 mask: scipy filters each axis in float64, stores float32
    k = gaussian_kernel1d(intensity)
    m = correlate1d(mask, k, -2, "replicate").to(torch.float32).to(mask.dtype)
    m = correlate1d(m, k, -1, "replicate").to(torch.float32)
    m = m.masked_fill_(m < 0.8, 0.0)[:, None].to(x.dtype)
    return (x * (1 - m) + m * _color(MUD_RGB, x).to(x.dtype)).clamp_(0, 1)


def spatter(x: Tensor, p: Tuple[float, ...], rng: SampleRNG) -> Tensor:
    """ImageNet-C spatter ``p = (loc, scale, sigma, threshold, intensity, mud)``; see the module doc."""
    loc, scale, sigma, threshold, intensity, is_mud = p
    layer = liquid_layer(rng, x.shape[-2], x.shape[-1], loc, scale, sigma, threshold, x.device)
    if is_mud:
        return mud(x, layer, threshold, intensity)
    return water(x, layer, intensity)


__all__ = ["spatter", "liquid_layer", "water_texture", "water", "mud"]
