"""TensorFlow "same" convolution padding without a zero-filled copy of the input, for the engine's CPU float32 path.

timm's ``Conv2dSame`` (Keras's strided "same" convolutions: the EfficientNets', MobileNets' and NASNets' stride-2
layers) pads explicitly: ``F.pad`` fills a whole new tensor with zeros, then copies the input into it. TF splits the
padding as ``before = total // 2``, ``after = total - before``, so ``after`` is ``before`` or ``before + 1``.
:func:`same_conv_input` leaves the symmetric part to the convolution's implicit padding and adds explicitly only
the one extra bottom row / right column of an uneven split, zeroing just that row and column: no copy at all where
the split is even (odd sizes at stride 2), no full fill where it is not. Zero padding is zero padding: the result is
the explicitly padded convolution's up to the kernels' summation order.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import Tensor

from lightning_app.module_swap import Replaced, replace_modules
from lightning_app.same_pooling import same_pads


def same_conv_input(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int] = (1, 1)) -> Tuple[Tensor, Tuple[int, int]]:
    """``x [..., H, W]`` for a convolution with TF "same" padding: ``(input, symmetric padding)``, the input being
    ``x`` itself, or ``x`` with one zero row (column) appended at the bottom (right) where TF pads one more there."""
    h, w = x.shape[-2:]
    (top, bottom), (left, right) = (same_pads(h, kernel_size[0], stride[0], dilation[0]),
                                    same_pads(w, kernel_size[1], stride[1], dilation[1]))
    extra_h, extra_w = bottom - top, right - left
    if extra_h or extra_w:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        padded = torch.empty((*x.shape[:-2], h + extra_h, w + extra_w), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        padded[..., :h, :w].copy_(x)
        padded[..., h:, :].zero_()
        padded[..., :h, w:].zero_()
        x = padded
    return x, (top, left)


class SameConv2d(nn.Module):
    """timm's ``Conv2dSame`` computed through :func:`same_conv_input`: ``x [B, C, H, W]`` ->
    ``[B, C', ceil(H / sh), ceil(W / sw)]``. Keeps the module (and its parameters) as ``conv``."""

    def __init__(self, conv: Conv2dSame) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        x, padding = same_conv_input(x, c.weight.shape[-2:], c.stride, c.dilation)
        return F.conv2d(x, c.weight, c.bias, c.stride, padding, c.dilation, c.groups)


def replace_same_convs(net: nn.Module, skip_inside: Tuple[type, ...] = ()) -> Replaced:
    """Replace, in ``net`` (in place), every timm ``Conv2dSame`` by :class:`SameConv2d`, except the children of
    modules of the types ``skip_inside`` (e.g. :class:`~lightning_app.conv_fusion.ConvAct2d`, which pads through
    :func:`same_conv_input` itself); returns what was replaced (undo:
    :func:`lightning_app.module_swap.restore_modules`)."""
    skip = {name for name, m in net.named_modules() if isinstance(m, skip_inside)}
    return replace_modules(net, lambda name, m: SameConv2d(m) if type(m) is Conv2dSame
                           and name.rpartition(".")[0] not in skip else None)


__all__ = ["SameConv2d", "replace_same_convs", "same_conv_input"]
