"""Weather corruptions (ImageNet-C ``fog``, ``snow``, ``frost``; ``spatter`` is in :mod:`.spatter`).

``fog`` is exact. ``snow`` follows the reference recipe step by step but is labelled
approximate (the reference runs ImageMagick on an 8-bit PNG of the snow layer; that motion
blur is re-implemented, not verified against ImageMagick here). ``frost`` blends a random crop
of one of the reference's frost photographs when they are installed (:mod:`.photos`; exact),
and a procedural ice texture otherwise (an approximation, labelled as such; the blend weights
are exact).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from ._ops import clipped_zoom, rgb_to_gray
from ._rng import SampleRNG
from .blur import im_motion_blur
from .photos import FROST_DRAWN, frost_layer_source, frost_photo_dir


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plasma_draws(mapsize: int) -> List[int]:
    """Number of uniform draws per diamond-square level (squares, diamonds, diamonds)."""
    sizes, step = [], mapsize
    while step >= 2:
        n = mapsize // step
        sizes += [n * n] * 3
        step //= 2
    return sizes


def plasma_from_uniforms(u: Tensor, mapsize: int, decay: float) -> Tensor:
    """ImageNet-C ``plasma_fractal`` (diamond-square), batched: ``u`` holds U(-1, 1) draws
    ``[B, sum(plasma_draws(mapsize))]``; returns ``[B, mapsize, mapsize]`` in [0, 1]."""
    b = u.shape[0]
    a = torch.zeros(b, mapsize, mapsize, dtype=u.dtype, device=u.device)
    step, wibble, off = mapsize, 100.0, 0

    def noise(n: int) -> Tensor:
        nonlocal off
        # reference: wibble * np.random.uniform(-wibble, wibble, shape)
        out = u[:, off : off + n * n].reshape(b, n, n) * (wibble * wibble)
        off += n * n
        return out

    while step >= 2:
        n, half = mapsize // step, step // 2
        corner = a[:, 0::step, 0::step]
        sq = corner + corner.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        a[:, half::step, half::step] = sq / 4 + noise(n)
        dr = a[:, half::step, half::step]
        ul = a[:, 0::step, 0::step]
        lt = dr + dr.roll(1, 1) + ul + ul.roll(-1, 2)
        a[:, 0::step, half::step] = lt / 4 + noise(n)
        tt = dr + dr.roll(1, 2) + ul + ul.roll(-1, 1)
        a[:, half::step, 0::step] = tt / 4 + noise(n)
        step //= 2
        wibble /= decay
    a = a - a.amin(dim=(1, 2), keepdim=True)
    return a / a.amax(dim=(1, 2), keepdim=True)


def plasma_fractal(rng: SampleRNG, h: int, w: int, decay: float) -> Tensor:
    """Fractal ``[B, 1, h, w]``: top-left crop of a power-of-two map (256 for 224 images, 32
    for 32, as in the reference; 512 for 299 as in its Inception variant)."""
    mapsize = _next_pow2(max(h, w, 2))
    u = rng.uniform((sum(plasma_draws(mapsize)),), -1.0, 1.0)
    return plasma_from_uniforms(u, mapsize, decay)[:, None, :h, :w]


def fog(x: Tensor, p: Tuple[float, float], rng: SampleRNG) -> Tensor:
    """``clip((x + c * fractal) * max / (max + c))``, max over the whole image."""
    c, decay = p
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    fractal = plasma_fractal(rng, x.shape[-2], x.shape[-1], decay).to(x.dtype)
    return ((x + c * fractal) * peak / (peak + c)).clamp_(0, 1)


def snow(x: Tensor, p: Tuple[float, ...], rng: SampleRNG) -> Tensor:
    """ImageNet-C snow: a zoomed, thresholded normal layer, motion-blurred at U(-135, -45)
    degrees (8-bit as the reference's PNG round trip), added twice (once rotated 180 degrees)
    to the image blended towards ``max(x, 1.5 * grey + 0.5)``. APPROXIMATE: see module doc."""
    loc, scale, zoom, threshold, radius, sigma, blend = p
    h, w = x.shape[-2:]
    layer = rng.normal((1, h, w), loc, scale, dtype=x.dtype)
    layer = clipped_zoom(layer, zoom)
    layer = layer.masked_fill(layer < threshold, 0.0)
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255  # astype(np.uint8) truncates
    angles = rng.uniform((), -135.0, -45.0, dtype=torch.float64).cpu().numpy()
    layer = im_motion_blur(layer, radius, sigma, angles)
    layer = torch.round(layer * 255).clamp_(0, 255) / 255  # ImageMagick writes 8-bit PNG
    x = blend * x + (1 - blend) * torch.maximum(x, rgb_to_gray(x) * 1.5 + 0.5)
    return (x + layer + layer.flip(-1, -2)).clamp_(0, 1)


#: Tint of the procedural ice texture (bluish white, RGB).
FROST_TINT = (0.84, 0.92, 1.0)


def frost_texture(rng: SampleRNG, h: int, w: int) -> Tensor:
    """Procedural stand-in for the reference's frost photographs, ``[B, 3, h, w]`` in [0, 1]:
    thin bright ridges of a rough plasma fractal over a soft fractal haze, bluish white."""
    rough = plasma_fractal(rng, h, w, decay=1.4)
    haze = plasma_fractal(rng, h, w, decay=2.2)
    ridges = (1 - (2 * rough - 1).abs()) ** 6
    ice = (0.45 * haze + 0.9 * ridges).clamp_(0, 1)
    tint = torch.tensor(FROST_TINT, dtype=ice.dtype, device=ice.device).view(1, 3, 1, 1)
    return ice * tint


def frost_procedural(x: Tensor, p: Tuple[float, ...], rng: SampleRNG) -> Tensor:
    """``clip(c_image * x + c_frost * texture)`` with the procedural texture (APPROXIMATE)."""
    c_image, c_frost = p[:2]
    texture = frost_texture(rng, x.shape[-2], x.shape[-1]).to(x.dtype)
    return (c_image * x + c_frost * texture).clamp_(0, 1)


def frost_crops(rng: SampleRNG, h: int, w: int, scale: float, device: torch.device) -> Tensor:
    """The reference's frost layer, uint8 ``[B, 3, h, w]``: photograph ``randint(5)`` (resized by ``scale``),
    then an ``h x w`` crop at rows ``randint(0, PH - h)`` and columns ``randint(0, PW - w)``."""
    u = rng.uniform((3,), dtype=torch.float64).cpu().numpy()  # photo, top, left
    crops = []
    for draw in u:
        photo = frost_layer_source(min(int(draw[0] * FROST_DRAWN), FROST_DRAWN - 1), float(scale), h, w,
                                   torch.device(device))
        top = int(draw[1] * (photo.shape[1] - h))
        left = int(draw[2] * (photo.shape[2] - w))
        crops.append(photo[:, top : top + h, left : left + w])
    return torch.stack(crops)


def frost_photographs(x: Tensor, p: Tuple[float, ...], rng: SampleRNG) -> Tensor:
    """ImageNet-C frost: ``clip(c_image * x + c_frost * crop / 255)`` with a random crop of a frost photograph."""
    c_image, c_frost, scale = p
    out = frost_crops(rng, x.shape[-2], x.shape[-1], scale, x.device).to(x.dtype).mul_(c_frost / 255)
    return out.add_(x, alpha=c_image).clamp_(0, 1)


def frost(x: Tensor, p: Tuple[float, ...], rng: SampleRNG) -> Tensor:
    """ImageNet-C frost from the photographs when installed, else the procedural approximation."""
    if frost_photo_dir() is not None:
        return frost_photographs(x, p, rng)
    return frost_procedural(x, p, rng)
