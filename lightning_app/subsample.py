"""1x1 average pools (strided subsampling), and the zero padding before them, as strided copies.

NASNet's factorized reductions (Keras ``_adjust_block``; timm's ``path_1`` / ``path_2``) halve a map with
``AvgPool2d(1, stride=2)``, the second path after shifting it by one pixel (``ZeroPadding2D(((0, 1), (0, 1)))`` +
``Cropping2D(((1, 0), (1, 0)))``, timm's ``ZeroPad2d((-1, 1, -1, 1))``). Eagerly the shift fills a zero tensor as
large as the map and copies the map into it, and the pool reads every pixel to keep a quarter of them: on NASNetMobile
(batch 16) the stem's 32 x 111 x 111 map alone cost 3.5 ms of fill, 1.1 ms of copy and 2.7 ms of pooling. An average
over one pixel is that pixel (``x / 1``), so :class:`Subsample` copies the kept pixels out of a strided view instead,
zeroing only the rows and columns that fall in the padding. Bit-identical, NaN included.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from lightning_app.layout import empty_in_layout_of
from lightning_app.module_swap import Replaced, replace_modules

#: ``(left, right, top, bottom)``, as ``F.pad`` / ``nn.ZeroPad2d`` take them (negative: crop)
Pads = Tuple[int, int, int, int]


def _kept(size: int, before: int, after: int, stride: int) -> Tuple[int, int, int, int]:
    """One dimension: the output size, and the output range ``[a, b)`` whose pixels come from the input, the first
    at input index ``stride * a - before``."""
    n_out = (size + before + after - 1) // stride + 1
    a = -(-before // stride) if before > 0 else 0  # ceil(before / stride): the first output inside the input
    b = min(n_out, (size - 1 + before) // stride + 1)
    return n_out, a, max(b, a), stride * a - before


def subsample(x: Tensor, stride: int, pads: Optional[Pads] = None) -> Tensor:
    """``avg_pool2d(pad(x, pads), 1, stride)``, ``x [B, C, H, W]`` -> ``[B, C, H', W']`` in ``x``'s memory format,
    copied from a strided view of ``x`` (no padded tensor is built)."""
    left, right, top, bottom = pads or (0, 0, 0, 0)
    (h_out, ha, hb, h0), (w_out, wa, wb, w0) = (_kept(x.shape[-2], top, bottom, stride),
                                                _kept(x.shape[-1], left, right, stride))
    out = empty_in_layout_of(x, (*x.shape[:-2], h_out, w_out))
    out[..., ha:hb, wa:wb].copy_(x[..., h0::stride, w0::stride][..., :hb - ha, :wb - wa])
    for rows, cols in ((slice(0, ha), slice(None)), (slice(hb, None), slice(None)),
                       (slice(ha, hb), slice(0, wa)), (slice(ha, hb), slice(wb, None))):
        border = out[..., rows, cols]
        if border.numel():
            border.zero_()
    return out


class Subsample(nn.Module):
    """:func:`subsample` as a module: a 1x1 average pool of stride ``stride``, after zero padding ``pads``."""

    def __init__(self, stride: int, pads: Optional[Pads] = None) -> None:
        super().__init__()
        self.stride, self.pads = stride, pads

    def forward(self, x: Tensor) -> Tensor:
        return subsample(x, self.stride, self.pads)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pads={self.pads}"


def _pool_stride(m: nn.Module) -> Optional[int]:
    """The stride of a 1x1 ``nn.AvgPool2d`` without padding (a strided subsample), else ``None``."""
    two = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    if (type(m) is not nn.AvgPool2d or two(m.kernel_size) != (1, 1) or two(m.padding) != (0, 0) or m.ceil_mode
            or m.divisor_override not in (None, 1)):
        return None
    sh, sw = two(m.stride if m.stride is not None else m.kernel_size)
    return sh if sh == sw else None


@torch.no_grad()
def replace_subsamples(net: nn.Module) -> Replaced:
    """In ``net`` (in place): every 1x1 ``nn.AvgPool2d`` becomes a :class:`Subsample`, and a ``nn.ZeroPad2d``
    right before one in an ``nn.Sequential`` becomes part of it (the pad module is replaced by ``nn.Identity``).
    Returns what was replaced (:func:`~lightning_app.module_swap.restore_modules` puts it back)."""
    merged = {}  # pool module -> pads of the ZeroPad2d before it
    pads_before = set()
    uses = Counter(id(m) for _, m in net.named_modules(remove_duplicate=False))
    for seq in net.modules():
        if type(seq) is nn.Sequential:
            kids = list(seq.children())
            for pad, pool in zip(kids, kids[1:]):
                if (type(pad) is nn.ZeroPad2d and _pool_stride(pool) is not None and uses[id(pad)] == 1
                        and uses[id(pool)] == 1):
                    merged[pool] = tuple(int(p) for p in pad.padding)
                    pads_before.add(pad)

    def replacement(name: str, m: nn.Module) -> Optional[nn.Module]:
        if m in pads_before:
            return nn.Identity()
        stride = _pool_stride(m)
        return Subsample(stride, merged.get(m)) if stride is not None else None

    return replace_modules(net, replacement)


__all__ = ["Subsample", "replace_subsamples", "subsample"]
