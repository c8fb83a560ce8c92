"""The OpenCV operations of ImageNet-C's ``spatter``, batched in torch on any device.

Each works on ``[B, H, W]`` single-channel images and follows OpenCV's integer semantics (checked
against ``cv2`` in ``tests/test_perturb_reference.py`` where OpenCV is installed):

* :func:`canny`: ``cv2.Canny(img, low, high)`` (3x3 Sobel with replicated borders, L1 gradient
  magnitude, OpenCV's fixed-point 22.5 / 67.5 degree sectors for non-maximum suppression,
  8-connected hysteresis);
* :func:`chamfer_distance`: ``cv2.distanceTransform(img, cv2.DIST_L2, 5)`` (the 5x5 chamfer
  mask 1 / 1.4 / 2.1969 in float32), capped;
* :func:`box3`: ``cv2.blur(img, (3, 3))`` (``BORDER_REFLECT_101``), float or 8-bit rounding;
* :func:`filter3_u8`: ``cv2.filter2D(img, cv2.CV_8U, kernel)`` for a 3x3 integer kernel;
* :func:`equalize_hist`: ``cv2.equalizeHist``.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import pad2d

#: OpenCV's ``tan(22.5 deg)`` in 15-bit fixed point (canny.cpp: ``TG22``).
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)
#: ``cv2.getDistanceTransformMask(DIST_L2, 5)``: horizontal / vertical, diagonal and knight-move steps.
_CHAMFER_5X5 = (1.0, 1.4, 2.1969)
#: CPU chunk of the chamfer relaxation (float32 bytes of the images; measured best on a 2-core EPYC)
_CPU_CHAMFER_BYTES = 1 << 20


def _shift(p: Tensor, r: int, dy: int, dx: int, h: int, w: int) -> Tensor:
    """Window of a tensor padded by ``r``: ``out[y, x] = img[y + dy, x + dx]``."""
    return p[..., r + dy : r + dy + h, r + dx : r + dx + w]


def sobel3(img: Tensor) -> Tuple[Tensor, Tensor]:
    """3x3 Sobel ``(dx, dy)`` of ``[B, H, W]`` integers, replicated borders (``cv2.Sobel(..., BORDER_REPLICATE)``)."""
    h, w = img.shape[-2:]
    p = pad2d(img.to(torch.int32), (1, 1, 1, 1), "replicate")
    s = lambda dy, dx: _shift(p, 1, dy, dx, h, w)  # noqa: E731
    dx = (s(-1, 1) - s(-1, -1)) + 2 * (s(0, 1) - s(0, -1)) + (s(1, 1) - s(1, -1))
    dy = (s(1, -1) - s(-1, -1)) + 2 * (s(1, 0) - s(-1, 0)) + (s(1, 1) - s(-1, 1))
    return dx, dy


def _dilate3(mask: Tensor) -> Tensor:
    return F.max_pool2d(mask[:, None].to(torch.float32), 3, stride=1, padding=1)[:, 0] > 0


def canny(img: Tensor, low: float, high: float) -> Tensor:
    """Edges (bool ``[B, H, W]``) of 8-bit images ``[B, H, W]`` as ``cv2.Canny(img, low, high)``
    (aperture 3, ``L2gradient=False``)."""
    low, high = min(low, high), max(low, high)
    lo, hi = math.floor(low), math.floor(high)
    dx, dy = sobel3(img)
    h, w = img.shape[-2:]
    mag = dx.abs() + dy.abs()
    p = F.pad(mag, (1, 1, 1, 1))  # magnitudes outside the image are 0
    m = mag
    ax = dx.abs()
    ay = dy.abs() << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    n = lambda dy_, dx_: _shift(p, 1, dy_, dx_, h, w)  # noqa: E731
    keep_h = (m > n(0, -1)) & (m >= n(0, 1))
    keep_v = (m > n(-1, 0)) & (m >= n(1, 0))
    same_sign = (dx ^ dy) >= 0  # s = 1: up-left / down-right neighbours, else up-right / down-left
    keep_d = torch.where(same_sign, (m > n(-1, -1)) & (m > n(1, 1)), (m > n(-1, 1)) & (m > n(1, -1)))
    candidate = (m > lo) & torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    edges = candidate & (m > hi)
    while True:  # hysteresis: grow strong edges through 8-connected candidates
        grown = edges | (candidate & _dilate3(edges))
        if torch.equal(grown, edges):
            return edges
        edges = grown


def _chamfer_relax(d: Tensor, big: float) -> Tensor:
    """One round of ``min(d, d[neighbour] + step cost)`` over the 16 steps of the 5x5 chamfer mask.

    Factored through row minima (``min(u + c, v + c) == min(u, v) + c`` exactly in floating point):
    about 10 tensor ops instead of 32."""
    a, b, c = _CHAMFER_5X5
    h, w = d.shape[-2:]
    p = F.pad(d, (2, 2, 0, 0), value=big)
    m1 = torch.minimum(p[..., 1 : w + 1], p[..., 3 : w + 3])  # left / right neighbour
    m2 = torch.minimum(p[..., 0:w], p[..., 4 : w + 4])  # two to the left / right
    one_row = torch.minimum(torch.minimum(d + a, m1 + b), m2 + c)  # reached from a row above / below
    two_rows = m1 + c  # knight moves from two rows above / below
    t = F.pad(one_row, (0, 0, 1, 1), value=big)
    u = F.pad(two_rows, (0, 0, 2, 2), value=big)
    out = torch.minimum(d, m1 + a)
    out = torch.minimum(out, torch.minimum(t[..., 0:h, :], t[..., 2 : h + 2, :]))
    return torch.minimum(out, torch.minimum(u[..., 0:h, :], u[..., 4 : h + 4, :]))


def chamfer_distance(zero: Tensor, cap: float) -> Tensor:
    """``min(cv2.distanceTransform(img, cv2.DIST_L2, 5), cap)`` where ``zero`` (bool ``[B, H, W]``)
    marks the pixels of ``img`` that are 0; float32. Pixels with no zero pixel in the image get ``cap``.

    Every step of the 5x5 chamfer mask costs at least 1, so ``ceil(cap) + 1`` rounds of parallel
    relaxation settle every distance up to ``cap``."""
    big = float(cap) + 2 * _CHAMFER_5X5[2]  # anything above cap is as good as infinity

    d = torch.where(zero, 0.0, big).to(torch.float32)
    if d.device.type == "cpu":  # a few images at a time stay in cache: 2-3x faster on the CPU
        step = max(1, _CPU_CHAMFER_BYTES // (4 * d[0].numel()))
        return torch.cat([_settle(d[i : i + step], cap, big) for i in range(0, d.shape[0], step)]) if len(d) else d
    return _settle(d, cap, big)


def _settle(d: Tensor, cap: float, big: float) -> Tensor:
    for _ in range(int(math.ceil(cap)) + 1):
        new = _chamfer_relax(d, big)
        if torch.equal(new, d):
            break
        d = new
    return d.clamp_(max=float(cap))


def box3(x: Tensor) -> Tensor:
    """``cv2.blur(x, (3, 3))`` (``BORDER_REFLECT_101``) of float images: sums in float64 times 1/9, as
    OpenCV's float box filter, returned as float32."""
    h, w = x.shape[-2:]
    p = pad2d(x.to(torch.float64), (1, 1, 1, 1), "reflect101")
    total = sum(_shift(p, 1, dy, dx, h, w) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return (total * (1.0 / 9.0)).to(torch.float32)


def box3_u8(x: Tensor) -> Tensor:
    """``cv2.blur(x, (3, 3))`` of 8-bit images (integer sums, rounded mean); int32 values 0..255."""
    h, w = x.shape[-2:]
    p = pad2d(x.to(torch.int32), (1, 1, 1, 1), "reflect101")
    total = sum(_shift(p, 1, dy, dx, h, w) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return torch.div(2 * total + 9, 18, rounding_mode="floor")  # round(total / 9): never a tie


def filter3_u8(x: Tensor, kernel: Sequence[Sequence[int]]) -> Tensor:
    """``cv2.filter2D(x, cv2.CV_8U, kernel)`` (correlation, ``BORDER_REFLECT_101``, saturated to 0..255)
    for 8-bit images and a 3x3 integer kernel; int32."""
    h, w = x.shape[-2:]
    p = pad2d(x.to(torch.int32), (1, 1, 1, 1), "reflect101")
    out = torch.zeros_like(x, dtype=torch.int32)
    for i, row in enumerate(kernel):
        for j, k in enumerate(row):
            if k:
                out += int(k) * _shift(p, 1, i - 1, j - 1, h, w)
    return out.clamp_(0, 255)


def equalize_hist(x: Tensor) -> Tensor:
    """``cv2.equalizeHist`` of each 8-bit image ``[B, H, W]`` (int values 0..255); int32.

    OpenCV: with ``i0`` the lowest value present, ``lut[i0] = 0`` and ``lut[i] = round(cum(i) * scale)``
    for ``i > i0``, ``cum(i)`` the count of pixels in ``(i0, i]``, ``scale = 255 / (N - count(i0))`` in
    float32; an image of one value keeps it."""
    b = x.shape[0]
    flat = x.reshape(b, -1).to(torch.int64)
    total = flat.shape[1]
    hist = torch.zeros(b, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    present = hist > 0
    i0 = torch.argmax(present.to(torch.int8), dim=1, keepdim=True)  # first value present
    count0 = hist.gather(1, i0)
    bins = torch.arange(256, device=x.device).view(1, 256)
    cum = torch.cumsum(torch.where(bins > i0, hist, 0), dim=1)
    scale = torch.tensor(255.0, dtype=torch.float32, device=x.device) / (total - count0).clamp_min(1).to(torch.float32)
    lut = torch.round(cum.to(torch.float32) * scale).clamp_(0, 255).to(torch.int32)
    lut = torch.where(bins > i0, lut, 0)
    lut = torch.where(count0 == total, i0.to(torch.int32).expand(b, 256), lut)
    return lut.gather(1, flat).reshape(x.shape)


__all__ = ["box3", "box3_u8", "canny", "chamfer_distance", "equalize_hist", "filter3_u8", "sobel3"]
