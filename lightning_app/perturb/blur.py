"""Blur corruptions (ImageNet-C ``gaussian_blur``, ``defocus_blur``, ``glass_blur``,
``motion_blur``, ``zoom_blur``), batched over ``[B, 3, H, W]`` float images in [0, 1]."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ._ops import clipped_zoom, correlate1d, cpu_chunked, fft_correlate2d, gaussian_filter, pad2d
from ._rng import SampleRNG

#: 2-D kernels with at most this many taps are applied directly, larger ones by FFT.
_MAX_DIRECT_TAPS = 49


def gaussian_blur(x: Tensor, sigma: float, rng: SampleRNG) -> Tensor:
    """``skimage.filters.gaussian(x, sigma)``: scipy Gaussian, truncate 4, border ``nearest``."""
    return gaussian_filter(x, sigma).clamp_(0, 1)


# ----------------------------------------------------------------------------- defocus
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """ImageNet-C ``disk``: a normalised aliased disk on a 17 x 17 grid (radius <= 8, else
    ``2 * radius + 1``), antialiased by ``cv2.GaussianBlur`` (3 x 3, or 5 x 5 above radius 8,
    ``sigmaX = alias_blur``, border ``BORDER_REFLECT_101``) - reimplemented here in numpy."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    # cv2.getGaussianKernel(ksize, sigma): exp(-(i - (ksize - 1) / 2)^2 / (2 sigma^2)), normalised
    i = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(i**2) / (2.0 * alias_blur**2))
    g = (g / g.sum()).astype(np.float32)
    t = torch.as_tensor(disk, dtype=torch.float64)
    t = correlate1d(correlate1d(t, g, -2, "reflect101"), g, -1, "reflect101")
    return t.numpy().astype(np.float32)


def _trim(kernel: np.ndarray) -> np.ndarray:
    """Crop a centred square kernel to the smallest centred square holding all non-zeros."""
    r = kernel.shape[0] // 2
    ys, xs = np.nonzero(kernel)
    reach = int(max(np.abs(ys - r).max(), np.abs(xs - r).max())) if len(ys) else 0
    return kernel[r - reach : r + reach + 1, r - reach : r + reach + 1]


def correlate2d(x: Tensor, kernel: np.ndarray, mode: str) -> Tensor:
    """2-D correlation with a shared centred kernel (direct for small kernels, else FFT)."""
    k = _trim(np.asarray(kernel, dtype=np.float64))
    r = k.shape[0] // 2
    if k.size > _MAX_DIRECT_TAPS:
        kernel = torch.as_tensor(k, device=x.device)
        return cpu_chunked(lambda t: fft_correlate2d(t, kernel, mode), x)
    h, w = x.shape[-2:]
    xp = pad2d(x, (r, r, r, r), mode)
    out = torch.zeros_like(x)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            weight = float(k[dy + r, dx + r])
            if weight != 0:
                out.add_(xp[..., r + dy : r + dy + h, r + dx : r + dx + w], alpha=weight)
    return out


def defocus_blur(x: Tensor, p: Tuple[float, float], rng: SampleRNG) -> Tensor:
    """``cv2.filter2D`` (correlation, ``BORDER_REFLECT_101``) with ``disk(radius, alias_blur)``."""
    radius, alias_blur = p
    return correlate2d(x, disk_kernel(radius, alias_blur), "reflect101").clamp_(0, 1)


# ----------------------------------------------------------------------------- glass
def _wavefront(h: int, w: int, d: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's loop positions regrouped into steps that may run at once, in a valid order.

    The reference visits ``h = H-d .. d+1`` (outer) and ``w = W-d .. d+1`` (inner); the step at
    ``(h, w)`` touches only ``(h, w)`` and ``(h + dy, w + dx)``, ``dx, dy in [-d, d)``, i.e. a
    ``2d x 2d`` box, so steps 2d or more apart in a row or in a column commute. Giving visit
    ``(i, j)`` (i-th row, j-th column visited) the time ``2d * i + j`` keeps every pair of
    possibly overlapping steps in the reference order, and steps sharing a time are disjoint:
    running the groups in time order is exactly the sequential loop.

    Returns ``order`` (visit numbers ``i * nw + j`` sorted by time), the flat pixel position of
    each entry of ``order`` and the group boundaries (``bounds[t]:bounds[t + 1]``).
    """
    nh, nw, c = h - 2 * d, w - 2 * d, 2 * d
    i, j = np.divmod(np.arange(nh * nw), nw)
    order = np.argsort(c * i + j, kind="stable")
    times = (c * i + j)[order]
    bounds = np.searchsorted(times, np.arange(times[-1] + 2))
    pos = ((h - d) - i[order]) * w + ((w - d) - j[order])
    return order, pos, bounds


def local_shuffle_sources(h: int, w: int, d: int, offsets: np.ndarray) -> np.ndarray:
    """Source pixel of every output pixel after ImageNet-C's glass-blur "shuffle".

    The reference's ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on an ``H x W x 3`` numpy
    array swaps *views*: it copies pixel ``(h', w')`` into ``(h, w)`` and leaves ``(h', w')``
    unchanged. That sequential copy process is reproduced here (not a permutation: pixels can
    be duplicated). ``offsets``: ``[B, iterations, H - 2d, W - 2d, 2]`` integer ``(dx, dy)``
    draws in loop order. Returns ``src [B, H * W]`` (int32, a transposed view): output pixel
    ``i`` is input pixel ``src[:, i]``.
    """
    b, iterations = offsets.shape[:2]
    # position-major layout (the B samples of a pixel are adjacent): cache-friendly steps
    src = np.tile(np.arange(h * w, dtype=np.int32)[:, None], (1, b))
    flat = src.reshape(-1)
    order, pos, bounds = _wavefront(h, w, d)
    dest = (pos[:, None] * b + np.arange(b)[None]).astype(np.int64)  # [n, B], in step order
    shift = offsets[..., 1].astype(np.int32) * w + offsets[..., 0]  # dy * W + dx
    shift = shift.reshape(b, iterations, -1)[:, :, order].transpose(1, 2, 0)  # [iterations, n, B]
    edges = bounds.tolist()
    for it in range(iterations):
        source = dest + shift[it] * b
        for lo, hi in zip(edges[:-1], edges[1:]):
            flat[dest[lo:hi]] = flat[source[lo:hi]]
    return src.T


def glass_blur(x: Tensor, p: Tuple[float, int, int], rng: SampleRNG) -> Tensor:
    """Gaussian blur, quantise to uint8 (truncating), move pixels locally exactly as the
    reference's sequential loop does, Gaussian blur again."""
    sigma, d, iterations = p
    b, c, h, w = x.shape
    # np.uint8(v * 255) truncates; the 1e-3 keeps float rounding of integral values (k / 255
    # blurred by a kernel summing to 1 - 1e-8) from dropping a level - the float64 reference
    # itself drops one there now and then, so the two can differ by a level at such pixels
    q = torch.floor(gaussian_filter(x, sigma) * 255 + 1e-3).clamp_(0, 255) / 255
    nh, nw = h - 2 * d, w - 2 * d
    if nh > 0 and nw > 0 and iterations > 0:
        offsets = rng.randint(-d, d, (iterations, nh, nw, 2), dtype=torch.int8).cpu().numpy()
        src = torch.from_numpy(local_shuffle_sources(h, w, d, offsets)).to(x.device).long()
        q = q.flatten(2).gather(2, src[:, None].expand(b, c, h * w)).view(b, c, h, w)
    return gaussian_filter(q, sigma).clamp_(0, 1)


# ----------------------------------------------------------------------------- motion
def motion_taps(radius: float, sigma: float, angles: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageMagick ``MotionBlurImage`` taps (as Wand's ``motion_blur`` in the reference).

    width = 2 * ceil(radius) + 1; weight_i ~ exp(-i^2 / (2 sigma^2)), i = 0..width-1, normalised;
    tap i reads pixel ``(y + oy_i, x + ox_i)`` with ``ox_i = ceil(i cos(a) - 0.5)``,
    ``oy_i = ceil(i sin(a) - 0.5)`` (a in degrees, y down); outside pixels repeat the edge.
    Returns ``weights [width]``, ``oy [B, width]``, ``ox [B, width]``.
    """
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i**2) / (2.0 * sigma * sigma))
    weights /= weights.sum()
    rad = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None]
    px, py = width * np.sin(rad), width * np.cos(rad)
    hyp = np.hypot(px, py)
    ox = np.ceil(i * py / hyp - 0.5).astype(np.int64)
    oy = np.ceil(i * px / hyp - 0.5).astype(np.int64)
    return weights, oy, ox


def im_motion_blur(x: Tensor, radius: float, sigma: float, angles: np.ndarray, method: str = "auto") -> Tensor:
    """Motion blur of each sample along its own angle (degrees), ImageMagick semantics.

    ``method``: ``"direct"`` (shifted adds, fastest on CPU), ``"fft"`` (batched, for GPUs) or
    ``"auto"`` (direct on CPU, else FFT); both compute the same sum.
    """
    weights, oy, ox = motion_taps(radius, sigma, angles)
    b, _, h, w = x.shape
    reach = int(max(np.abs(oy).max(), np.abs(ox).max()))
    if method == "auto":
        method = "direct" if x.device.type == "cpu" else "fft"
    if method == "direct":
        xp = pad2d(x, (reach, reach, reach, reach), "replicate")
        out = torch.zeros_like(x)
        for s in range(b):
            for wt, dy, dx in zip(weights, oy[s], ox[s]):
                out[s].add_(xp[s, :, reach + dy : reach + dy + h, reach + dx : reach + dx + w], alpha=float(wt))
        return out
    if method != "fft":
        raise ValueError(f"method must be 'auto', 'direct' or 'fft', got {method!r}")
    size = 2 * reach + 1
    kern = np.zeros((b, size, size))
    rows = np.repeat(np.arange(b), len(weights))
    np.add.at(kern, (rows, (oy + reach).ravel(), (ox + reach).ravel()), np.tile(weights, b))
    return fft_correlate2d(x, torch.as_tensor(kern, dtype=x.dtype, device=x.device), "replicate")


def motion_blur(x: Tensor, p: Tuple[float, float], rng: SampleRNG) -> Tensor:
    """ImageMagick motion blur ``(radius, sigma)`` at an angle drawn from U(-45, 45) degrees."""
    radius, sigma = p
    angles = rng.uniform((), -45.0, 45.0, dtype=torch.float64).cpu().numpy()
    return im_motion_blur(x, radius, sigma, angles).clamp_(0, 1)


# ----------------------------------------------------------------------------- zoom
def zoom_factors(p: Sequence[float]) -> np.ndarray:
    """The reference's ``np.arange(start, stop, step)`` zoom factors."""
    start, stop, step = p
    return np.arange(start, stop, step)


def zoom_blur(x: Tensor, p: Tuple[float, float, float], rng: SampleRNG) -> Tensor:
    """Mean of the image and its ``clipped_zoom`` copies for every zoom factor."""
    zooms = zoom_factors(p)
    out = x.clone()
    for z in zooms:
        out += clipped_zoom(x, float(z))
    return (out / (len(zooms) + 1)).clamp_(0, 1)


__all__ = [
    "gaussian_blur",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "disk_kernel",
    "correlate2d",
    "local_shuffle_sources",
    "motion_taps",
    "im_motion_blur",
    "zoom_factors",
]
