"""Batched building blocks shared by the corruptions (NCHW float tensors, any device).

Border modes follow the reference libraries:
``replicate`` (scipy ``nearest``, ImageMagick edge pixels), ``reflect101`` (OpenCV's default
``BORDER_REFLECT_101``, scipy ``mirror``: ``d c b | a b c d``) and ``symmetric`` (scipy
``reflect``: ``c b a | a b c d``). Padding is done by index folding, so any pad width works.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_MODES = ("replicate", "reflect101", "symmetric")
#: 1-D kernels up to this many taps are applied as shifted adds, longer ones as an n x n matrix.
_MAX_SHIFT_TAPS = 31
#: CPU chunk size for multi-pass filtering (a few images: measured best on a 2-core EPYC).
_CPU_CHUNK_BYTES = 4 << 20


def fold_index(idx: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map (possibly out-of-range) indices into ``[0, n)`` by the border rule ``mode``."""
    idx = np.asarray(idx, dtype=np.int64)
    if mode == "replicate" or n == 1:
        return np.clip(idx, 0, n - 1)
    if mode == "reflect101":
        period = 2 * n - 2
        i = np.mod(idx, period)
        return np.where(i >= n, period - i, i)
    if mode == "symmetric":
        period = 2 * n
        i = np.mod(idx, period)
        return np.where(i >= n, period - 1 - i, i)
    raise ValueError(f"unknown border mode {mode!r}; known: {_MODES}")


_TORCH_PAD = {"replicate": "replicate", "reflect101": "reflect"}


def pad_dim(x: Tensor, dim: int, before: int, after: int, mode: str) -> Tensor:
    """Pad one dimension by ``before``/``after`` elements with the border rule ``mode``."""
    n = x.shape[dim]
    dim = dim % x.dim()
    if dim >= x.dim() - 2:
        pad = (before, after, 0, 0) if dim == x.dim() - 2 else (0, 0, before, after)  # (top, bottom, left, right)
        if _torch_pad_ok(x, pad, mode):
            return F.pad(x, (pad[2], pad[3], pad[0], pad[1]), mode=_TORCH_PAD[mode])
    idx = fold_index(np.arange(-before, n + after), n, mode)
    return x.index_select(dim, torch.as_tensor(idx, device=x.device))


def _torch_pad_ok(x: Tensor, pad: Tuple[int, int, int, int], mode: str) -> bool:
    """Whether ``F.pad`` (a copy kernel, much faster than a gather) computes the same padding."""
    if mode not in _TORCH_PAD or x.dim() not in (3, 4):
        return False
    h, w = x.shape[-2:]
    return mode == "replicate" or (max(pad[0], pad[1]) < h and max(pad[2], pad[3]) < w)


def pad2d(x: Tensor, pad: Tuple[int, int, int, int], mode: str) -> Tensor:
    """Pad the last two dims by (top, bottom, left, right)."""
    top, bottom, left, right = pad
    if _torch_pad_ok(x, pad, mode):
        return F.pad(x, (left, right, top, bottom), mode=_TORCH_PAD[mode])
    return pad_dim(pad_dim(x, -2, top, bottom, mode), -1, left, right, mode)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    if sigma <= 0:
        return np.ones(1)
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x**2)
    return phi / phi.sum()


@lru_cache(maxsize=64)
def _filter_matrix(n: int, kernel: Tuple[float, ...], mode: str) -> np.ndarray:
    """Dense ``[n, n]`` matrix of a 1-D correlation with border folding (any kernel length)."""
    k = np.asarray(kernel)
    r = len(k) // 2
    rows = np.repeat(np.arange(n), len(k))
    taps = np.tile(np.arange(-r, r + 1), n)
    cols = fold_index(rows + taps, n, mode)
    m = np.zeros((n, n))
    np.add.at(m, (rows, cols), np.tile(k, n))
    return m


def correlate1d(x: Tensor, kernel: np.ndarray, dim: int, mode: str) -> Tensor:
    """1-D correlation along ``dim`` with an odd-length centred kernel and border rule ``mode``."""
    k = np.asarray(kernel, dtype=np.float64)
    r = len(k) // 2
    n = x.shape[dim]
    if r == 0:
        return x * float(k[0])
    if len(k) > _MAX_SHIFT_TAPS:
        # float64 on CUDA: immune to a global TF32 matmul setting
        dt = torch.float64 if x.device.type == "cuda" else x.dtype
        m = torch.as_tensor(_filter_matrix(n, tuple(k.tolist()), mode), dtype=dt, device=x.device)
        xt = x.movedim(dim, -1).to(dt)
        return torch.matmul(xt, m.T).movedim(-1, dim).to(x.dtype)
    xp = pad_dim(x, dim, r, r, mode)
    out = xp.narrow(dim, r, n) * float(k[r])
    for j in range(-r, r + 1):
        if j != 0 and k[r + j] != 0:
            out.add_(xp.narrow(dim, r + j, n), alpha=float(k[r + j]))
    return out


def cpu_chunked(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` for a shape-preserving per-sample ``fn``; on the CPU a few samples at a time,
    so multi-pass work stays in cache (2x faster on a 2-core EPYC), elsewhere in one go."""
    if x.device.type != "cpu" or x.dim() < 2 or x.shape[0] == 0:
        return fn(x)
    step = max(1, _CPU_CHUNK_BYTES // max(1, x[0].numel() * x.element_size()))
    if step >= x.shape[0]:
        return fn(x)
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], step):
        out[i : i + step] = fn(x[i : i + step])
    return out


def separable(x: Tensor, ky: np.ndarray, kx: np.ndarray, mode: str) -> Tensor:
    """Correlate the last two dims with ``ky`` (rows) then ``kx`` (columns)."""
    return cpu_chunked(lambda t: correlate1d(correlate1d(t, ky, -2, mode), kx, -1, mode), x)


def gaussian_filter(x: Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> Tensor:
    """``scipy.ndimage.gaussian_filter`` over the last two dims (skimage ``gaussian`` defaults)."""
    k = gaussian_kernel1d(sigma, truncate)
    return separable(x, k, k, mode)


def next_fast_len(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_correlate2d(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """2-D correlation ``out[y, x] = sum K[dy + r, dx + r] * x[y + dy, x + dx]`` via FFT.

    ``kernel`` is ``[K, K]`` (shared) or ``[B, K, K]`` (one per sample), K = 2r + 1 odd;
    borders follow ``mode``.
    """
    kh = kernel.shape[-1]
    r = kh // 2
    h, w = x.shape[-2:]
    xp = pad2d(x, (r, r, r, r), mode)
    fh, fw = next_fast_len(h + 2 * r), next_fast_len(w + 2 * r)
    kimg = torch.zeros(kernel.shape[:-2] + (fh, fw), dtype=x.dtype, device=x.device)
    kimg[..., :kh, :kh] = kernel.flip(-1, -2).to(x.dtype)
    kimg = kimg.roll((-r, -r), (-2, -1))
    spec = torch.fft.rfft2(xp, s=(fh, fw)) * torch.fft.rfft2(kimg).unsqueeze(-3)
    out = torch.fft.irfft2(spec, s=(fh, fw))
    return out[..., r : r + h, r : r + w].contiguous()


def clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    """ImageNet-C ``clipped_zoom``: centre crop of size ``ceil(n / zoom)``, bilinear zoom as
    ``scipy.ndimage.zoom(order=1)`` (output ``round(n_crop * zoom)``, corner-aligned grid), then
    centre trim back to the input size. Per axis, so non-square images work too."""
    h, w = x.shape[-2:]
    if zoom == 1:
        return x

    def axis(n: int) -> Tuple[int, int, int, int]:
        crop = int(math.ceil(n / zoom))
        top = (n - crop) // 2
        out = int(round(crop * zoom))
        return top, crop, out, (out - n) // 2

    top, ch, oh, th = axis(h)
    left, cw, ow, tw = axis(w)
    crop = x[..., top : top + ch, left : left + cw]
    lead = crop.shape[:-2]
    up = F.interpolate(crop.reshape((-1, 1, ch, cw)), size=(oh, ow), mode="bilinear", align_corners=True)
    return up[..., th : th + h, tw : tw + w].reshape(lead + (h, w))


@lru_cache(maxsize=64)
def pil_box_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pillow's BOX resampling coefficients (``precompute_coeffs`` in Resample.c) as taps.

    Returns ``(index [out, K], weight [out, K])``; unused taps have weight 0.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        idx = np.arange(xmin, xmax)
        arg = (idx - center + 0.5) / filterscale
        wts = ((arg > -0.5) & (arg <= 0.5)).astype(np.float64)
        if wts.sum() != 0:
            wts = wts / wts.sum()
        rows.append((idx, wts))
    k = max(1, max(len(i) for i, _ in rows))
    index = np.zeros((out_size, k), dtype=np.int64)
    weight = np.zeros((out_size, k))
    for j, (idx, wts) in enumerate(rows):
        index[j, : len(idx)] = idx
        weight[j, : len(idx)] = wts
    return index, weight


@lru_cache(maxsize=64)
def pil_box_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``pil_box_taps`` as a dense ``[in, out]`` matrix (``out = x @ M`` along the last dim)."""
    index, weight = pil_box_taps(in_size, out_size)
    m = np.zeros((in_size, out_size))
    for k in range(index.shape[1]):
        np.add.at(m, (index[:, k], np.arange(out_size)), weight[:, k])
    return m


def resample_taps(x: Tensor, index: np.ndarray, weight: np.ndarray, dim: int) -> Tensor:
    """Resample along ``dim``: ``out[j] = sum_k weight[j, k] * x[index[j, k]]``."""
    out = None
    shape = [1] * x.dim()
    shape[dim] = index.shape[0]
    for k in range(index.shape[1]):
        wk = weight[:, k]
        if not wk.any():
            continue
        taken = x.index_select(dim, torch.as_tensor(index[:, k], device=x.device))
        wt = torch.as_tensor(wk, dtype=x.dtype, device=x.device).view(shape)
        out = taken * wt if out is None else out.addcmul_(taken, wt)
    if out is None:
        new_shape = list(x.shape)
        new_shape[dim] = index.shape[0]
        return x.new_zeros(new_shape)
    return out


def rgb_to_gray(x: Tensor) -> Tensor:
    """OpenCV ``COLOR_RGB2GRAY`` (ITU-R BT.601 luma), ``[B, 1, H, W]``."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
