"""TensorFlow "same" convolution padding without a zero-filled copy of the input, for the engine's CPU float32 path.

timm's ``Conv2dSame`` (Keras's strided "same" convolutions: the EfficientNets', MobileNets' and NASNets' stride-2
layers) pads explicitly: ``F.pad`` fills a whole new tensor with zeros, then copies the input into it. TF splits the
padding as ``before = total // 2``, ``after = total - before``, so ``after`` is ``before`` or ``before + 1``.
:func:`same_conv_operands` leaves the symmetric part to the convolution's implicit padding and adds explicitly only
the one extra bottom row / right column of an uneven split, zeroing just that row and column: no copy at all where
the split is even (odd sizes at stride 2), no full fill where it is not. Zero padding is zero padding: the result is
the explicitly padded convolution's up to the kernels' summation order.

A depthwise convolution (one input channel per group) does not copy its input at all: it gets one leading zero tap
in the uneven dimension and pads symmetrically by ``after``, which puts every window where TF's is (tap ``t + 1`` of
the new kernel meets the input TF's tap ``t`` meets). Appending the row moved as many bytes as the convolution reads,
and the extra tap is cheap where each output reads so little:
(16, 96, 112, 112) channels_last 3x3 stride 2 with its SiLU 6.55 -> 3.47 ms, (16, 144, 56, 56) 2.32 -> 1.32 ms, 5x5 at
28 / 14 px 1.41x / 1.24x, bit-identical on this machine (Zen 5, alternating in one process). A dense
convolution's extra tap costs more than the copy (0.68-0.84x), so those keep the appended row. The one
difference: the zero tap multiplies a real input value beside each window, so an infinite activation (``0 * inf``)
also turns that neighbouring output NaN.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import Tensor

from lightning_app.layout import empty_in_layout_of
from lightning_app.module_swap import Replaced, replace_modules
from lightning_app.same_pooling import same_pads


def _append_zeros(x: Tensor, rows: int, cols: int) -> Tensor:
    """``x [..., H, W]`` with ``rows`` zero rows and ``cols`` zero columns appended (``x`` itself if none), in
    ``x``'s memory format; only the new rows and columns are zero-filled."""
    if not rows and not cols:
        return x
    h, w = x.shape[-2:]
    padded = empty_in_layout_of(x, (*x.shape[:-2], h + rows, w + cols))
    padded[..., :h, :w].copy_(x)
    padded[..., h:, :].zero_()
    padded[..., :h, w:].zero_()
    return padded


def padded_conv_operands(x: Tensor, weight: Tensor, pads: Tuple[Tuple[int, int], Tuple[int, int]],
                         dilation: Sequence[int] = (1, 1), groups: int = 1) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
    """``(input, weight, symmetric padding)`` of a convolution of ``x [B, C, H, W]`` by ``weight [C', C / groups,
    kh, kw]`` zero-padded by ``pads = ((top, bottom), (left, right))``. A depthwise one (``C / groups == 1``,
    ``groups > 1``, no dilation) whose two sides differ by at most one keeps ``x`` and gets a zero tap on the side
    padded less; any other gets ``x`` with the difference appended as zero rows / columns (or, where the smaller
    side is not first, explicitly padded)."""
    (top, bottom), (left, right) = pads
    if (groups > 1 and weight.shape[1] == 1 and tuple(dilation) == (1, 1)
            and abs(bottom - top) <= 1 and abs(right - left) <= 1):
        taps = (max(right - left, 0), max(left - right, 0), max(bottom - top, 0), max(top - bottom, 0))
        return x, (F.pad(weight, taps) if any(taps) else weight), (max(top, bottom), max(left, right))
    if bottom < top or right < left:
        return F.pad(x, (left, right, top, bottom)), weight, (0, 0)
    return _append_zeros(x, bottom - top, right - left), weight, (top, left)


def same_conv_operands(x: Tensor, weight: Tensor, stride: Sequence[int], dilation: Sequence[int] = (1, 1),
                       groups: int = 1) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
    """:func:`padded_conv_operands` with TF "same" padding for ``x``'s size (``after`` is ``before`` or
    ``before + 1``)."""
    kernel = weight.shape[-2:]
    pads = (same_pads(x.shape[-2], kernel[0], stride[0], dilation[0]),
            same_pads(x.shape[-1], kernel[1], stride[1], dilation[1]))
    return padded_conv_operands(x, weight, pads, dilation, groups)


def explicit_pads(conv: nn.Module) -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """``((top, bottom), (left, right))`` of a ``ZeroPadding2D`` + ``"valid"`` convolution module (the zoo's
    MobileNet ``ZeroPadConv2d``), else ``None``."""
    from lightning_app.zoo.families.mobilenet import ZeroPadConv2d

    if type(conv) is ZeroPadConv2d and tuple(conv.padding) == (0, 0) and conv.padding_mode == "zeros":
        left, right, top, bottom = conv.pad
        return (top, bottom), (left, right)
    return None


def pads_explicitly(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution that pads its input explicitly: timm's ``Conv2dSame`` or
    :func:`explicit_pads`'s."""
    return type(conv) is Conv2dSame or explicit_pads(conv) is not None


def conv_operands(conv: nn.Module, x: Tensor, pads: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None,
                  weight: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
    """``(input, weight, symmetric padding)`` of a convolution that pads explicitly on ``x``: fixed ``pads``
    (:func:`explicit_pads`), or TF "same" padding where ``None``; ``weight``: the convolution's weight in another
    dtype (default: ``conv.weight``)."""
    weight = conv.weight if weight is None else weight
    if pads is None:
        return same_conv_operands(x, weight, conv.stride, conv.dilation, conv.groups)
    return padded_conv_operands(x, weight, pads, conv.dilation, conv.groups)


class SameConv2d(nn.Module):
    """A convolution that pads explicitly (:func:`pads_explicitly`) computed through :func:`padded_conv_operands`:
    ``x [B, C, H, W]`` -> what ``conv(x)`` gives. Keeps the module (and its parameters) as ``conv``."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv, self.pads = conv, explicit_pads(conv)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        x, weight, padding = conv_operands(c, x, self.pads)
        return F.conv2d(x, weight, c.bias, c.stride, padding, c.dilation, c.groups)


def replace_same_convs(net: nn.Module, skip_inside: Tuple[type, ...] = ()) -> Replaced:
    """Replace, in ``net`` (in place), every convolution that pads explicitly (:func:`pads_explicitly`) by
    :class:`SameConv2d`, except the children of modules of the types ``skip_inside`` (e.g.
    :class:`~lightning_app.conv_fusion.ConvAct2d`, which pads through :class:`SameConv2d` itself); returns what was
    replaced (undo: :func:`lightning_app.module_swap.restore_modules`)."""
    skip = {name for name, m in net.named_modules() if isinstance(m, skip_inside)}
    return replace_modules(net, lambda name, m: SameConv2d(m) if pads_explicitly(m)
                           and name.rpartition(".")[0] not in skip else None)


__all__ = ["SameConv2d", "conv_operands", "explicit_pads", "padded_conv_operands", "pads_explicitly",
           "replace_same_convs", "same_conv_operands"]
