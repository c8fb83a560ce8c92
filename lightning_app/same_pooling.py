"""TensorFlow "same" pooling without building the padded input, for the inference engine.

Keras pools with ``padding="same"`` (Xception's stride-2 max pools: timm's ``MaxPool2dSame``, which pads with
``-inf``) or after ``ZeroPadding2D`` (NASNet's stride-2 max and average pools: ``ZeroPadMaxPool2d`` and timm's
``AvgPool2dSame``). Both pad explicitly (``F.pad`` fills a whole new tensor, then copies the input into it) and
pool the result. PyTorch's pooling pads implicitly, symmetrically, plus ``ceil_mode``'s one extra window at the
end, which together cover TF's split (``before = total // 2``, ``after = total - before``):

* max with ``-inf`` padding: the same window maxima;
* max with zero padding: the same, then ``max(., 0)`` on the output rows / columns whose windows reach into the
  padding;
* average counting the zero padding: ``divisor_override = kh * kw`` (every window of the explicitly padded input is
  full-size).

Where that cannot give TF's output size (an even window at stride 1: the padding goes after only, and ``ceil_mode``
adds no window), the input is padded explicitly as before. Max pools over a few channels in channels_last run as
:func:`separable_max_pool2d` (``MAX_SEPARABLE_CHANNELS``) on the explicitly padded input.

Xception at 299 px, batch 16, 2-core CPU: its four stride-2 max pools 75 -> 27 ms per batch (the pads were 4 % of
the network's time). Equal results (max: bit-identical; average: summation order may differ in the last bit).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.padding import get_same_padding
from torch import Tensor

from lightning_app.module_swap import Replaced, replace_modules


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TF "same" padding ``(before, after)`` of one dimension (timm's total, split as TF splits it)."""
    total = get_same_padding(size, kernel, stride, dilation)
    return total // 2, total - total // 2


def _border(n_out: int, size: int, kernel: int, stride: int, before: int) -> Tuple[int, int]:
    """Output positions (first ``a``, last ``b``) whose windows reach into the padding."""
    a = min(math.ceil(before / stride), n_out)
    first_after = math.ceil((size + before - kernel + 1) / stride)
    return a, max(n_out - max(first_after, a), 0)


def _torch_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Output size of torch's pooling (symmetric ``pad``, ``ceil_mode``), as ``pooling_output_shape`` computes it."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def same_pool2d(x: Tensor, kind: str, kernel_size: Sequence[int], stride: Sequence[int],
                pad_value: float = float("-inf")) -> Tensor:
    """``x [..., H, W]`` pooled (``kind``: ``"max"`` or ``"avg"``) over its TF-"same" padding with ``pad_value``
    (max: ``-inf`` or ``0``; avg: zeros, counted) -> ``[..., ceil(H / sh), ceil(W / sw)]``."""
    (kh, kw), (sh, sw) = kernel_size, stride
    h, w = x.shape[-2:]
    (pt, pb), (pl, pr) = same_pads(h, kh, sh), same_pads(w, kw, sw)
    ceil = pb > pt or pr > pl
    implicit = (_torch_size(h, kh, sh, pt, ceil) == -(-h // sh) and _torch_size(w, kw, sw, pl, ceil) == -(-w // sw))
    if kind == "avg":
        if not implicit:
            return F.avg_pool2d(F.pad(x, (pl, pr, pt, pb)), (kh, kw), (sh, sw))
        return F.avg_pool2d(x, (kh, kw), (sh, sw), (pt, pl), ceil, True, kh * kw)
    separable = _few_channels_last(x)
    if not implicit or separable:
        padded = F.pad(x, (pl, pr, pt, pb), value=pad_value)
        if separable:
            return separable_max_pool2d(padded, (kh, kw), (sh, sw))
        return F.max_pool2d(padded, (kh, kw), (sh, sw))
    out = F.max_pool2d(x, (kh, kw), (sh, sw), (pt, pl), 1, ceil)
    if pad_value == 0.0:
        n_h, n_w = out.shape[-2:]
        top, bottom = _border(n_h, h, kh, sh, pt)
        left, right = _border(n_w, w, kw, sw, pl)
        for rows in (slice(0, top), slice(n_h - bottom, n_h)):
            if rows.stop > rows.start:
                out[..., rows, :].clamp_min_(0.0)
        for cols in (slice(0, left), slice(n_w - right, n_w)):
            if cols.stop > cols.start:
                out[..., :, cols].clamp_min_(0.0)
    elif pad_value != float("-inf"):
        raise ValueError(f"max pooling pads with -inf or 0, got {pad_value}")
    return out


#: channels_last CPU max pools with fewer channels than this (and not a multiple of ``VECTOR_CHANNELS``) run as
#: :func:`separable_max_pool2d`: torch's channels_last kernel vectorizes over the channels, and a few channels
#: fill its vectors poorly (3x3 / stride-2, batch 16, 2-core Zen 5 EPYC: 11 channels at 111 px 2.90 -> 0.81 ms,
#: 22 at 56 px 0.68 -> 0.25 ms, 12 / 24 / 8 channels 1.35-1.7x; 16 even, 40 and more slower: 0.4-0.8x)
MAX_SEPARABLE_CHANNELS = 32
VECTOR_CHANNELS = 16


def _few_channels_last(x: Tensor) -> bool:
    c = x.shape[1] if x.dim() == 4 else 0
    return (x.device.type == "cpu" and 0 < c < MAX_SEPARABLE_CHANNELS and c % VECTOR_CHANNELS != 0
            and x.is_contiguous(memory_format=torch.channels_last))


def separable_max_pool2d(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int]) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride)`` (no padding, floor mode) as the maximum over the window's columns,
    then over its rows: ``kw - 1 + kh - 1`` elementwise ``maximum`` of strided views. Bit-identical (a maximum is
    exact; NaN propagates as in ``max_pool2d``). Shape: ``[B, C, H, W]`` -> ``[B, C, (H - kh) // sh + 1,
    (W - kw) // sw + 1]``, in ``x``'s memory format."""
    (kh, kw), (sh, sw) = kernel_size, stride
    n_h, n_w = (x.shape[-2] - kh) // sh + 1, (x.shape[-1] - kw) // sw + 1
    cols = x[..., 0:sw * (n_w - 1) + 1:sw]
    for j in range(1, kw):
        cols = torch.maximum(cols, x[..., j:j + sw * (n_w - 1) + 1:sw])
    out = cols[..., 0:sh * (n_h - 1) + 1:sh, :]
    for i in range(1, kh):
        out = torch.maximum(out, cols[..., i:i + sh * (n_h - 1) + 1:sh, :])
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last) else out.contiguous()


class SamePool2d(nn.Module):
    """:func:`same_pool2d` as a module: ``x [B, C, H, W]`` -> ``[B, C, ceil(H / sh), ceil(W / sw)]``."""

    def __init__(self, kind: str, kernel_size: Sequence[int], stride: Sequence[int],
                 pad_value: float = float("-inf")) -> None:
        super().__init__()
        if kind not in ("max", "avg"):
            raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
        self.kind, self.kernel_size, self.stride, self.pad_value = kind, tuple(kernel_size), tuple(stride), pad_value

    def forward(self, x: Tensor) -> Tensor:
        return same_pool2d(x, self.kind, self.kernel_size, self.stride, self.pad_value)

    def extra_repr(self) -> str:
        pad = "" if self.kind == "avg" else f", pad_value={self.pad_value}"
        return f"{self.kind}, kernel_size={self.kernel_size}, stride={self.stride}{pad}"


def _replacement(name: str, m: nn.Module) -> Optional[SamePool2d]:
    """The :class:`SamePool2d` equal to ``m``, or ``None`` where ``m`` is not such a pool."""
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    from lightning_app.zoo.families.nasnet import ZeroPadMaxPool2d

    two = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    if type(m) is MaxPool2dSame and two(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices:
        return SamePool2d("max", two(m.kernel_size), two(m.stride))
    if type(m) is ZeroPadMaxPool2d:
        return SamePool2d("max", m.kernel_size, m.stride, pad_value=0.0)
    if type(m) is AvgPool2dSame and two(m.padding) == (0, 0) and not m.ceil_mode and m.divisor_override is None:
        return SamePool2d("avg", two(m.kernel_size), two(m.stride))
    return None


@torch.no_grad()
def replace_same_pools(net: nn.Module) -> Replaced:
    """In ``net`` (in place): every explicitly padded "same" pool becomes a :class:`SamePool2d`. Returns what was
    replaced (:func:`~lightning_app.module_swap.restore_modules` puts it back)."""
    return replace_modules(net, _replacement)


__all__ = ["SamePool2d", "replace_same_pools", "same_pads", "same_pool2d"]
