"""A ResNet bottleneck's last convolution, residual add and activation as one oneDNN call, for the inference
engine's float32 CPU path.

timm's :class:`~timm.models.resnet.Bottleneck` ends ``x = bn3(conv3(x)); x += shortcut; x = act3(x)``: with the
BatchNorm folded, the convolution writes its output, the add reads it and the shortcut and writes the sum, and the
ReLU reads and writes it once more. oneDNN accumulates the convolution into the shortcut's buffer (its "sum"
post-op: ``torch.ops.mkldnn._convolution_pointwise_.binary``, the in-place op inductor's CPU fusion emits for this
pattern) and applies the ReLU on the way out, so the block's output is written once, where the shortcut was. These
are a ResNet's largest tensors (256 channels at 56 px in the first stage). On a 2-core Zen 5 EPYC, with the
product's memory setting (:mod:`lightning_app.host_memory`), the engine alone gains 1.01x (ResNet50) and 1.02x
(ResNet50V2), bit-identical output; in a process with glibc's default ``malloc`` (every add's output page-faulted
in) it was 1.18-1.29x / 1.19x, and 1.13x on ResNet101. (The out-of-place form, ``conv(x) + other`` into a new
tensor, was 0.96x there: slower than not fusing.) Keras's ResNetV2 blocks end ``conv3(x) + shortcut`` (the
next block pre-activates): the same call without the activation.

Writing into the shortcut is safe where nothing reads it afterwards: a projection shortcut's output always
qualifies; a block's own input (the identity shortcut) only where one traced forward shows no read of its storage
after the block returns (:func:`fuse_residual_blocks`; otherwise that block is left as it is).

:func:`fuse_residual_blocks` replaces such blocks of a folded, activation-fused copy (:mod:`lightning_app.engine`)
by :class:`FusedBottleneck`, which runs the block's own modules for everything before ``conv3`` and falls back to
the block's own forward wherever the op does not apply (another device or dtype, autocast, gradients, training
mode).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.resnet import Bottleneck
from torch import Tensor

from lightning_app.conv_fusion import ReorderedWeight
from lightning_app.module_swap import Replaced, replace_modules
from lightning_app.tracing import inputs_free_after
from lightning_app.zoo.families.resnet_v2 import KerasPreActBottleneck


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or type(m) is nn.Identity


def _plain_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _bottleneck_parts(b: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    y = b.act1(b.bn1(b.conv1(x)))
    y = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(y)))))
    return y, x if b.downsample is None else b.downsample(x)


def _preact_parts(b: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    x_preact = b.norm1(x)
    shortcut = b.downsample(x_preact) if b.downsample is not None else b.shortcut_pool(x)
    return b.norm3(b.conv2(b.norm2(b.conv1(x_preact)))), shortcut


class _Kind(NamedTuple):
    """A residual block's layout: ``parts(block, x)`` -> (the last convolution's input, the shortcut), that
    convolution's name, what must be folded away after it, the activation after the add (``"relu"`` or ``None``)."""

    parts: Callable[[nn.Module, Tensor], Tuple[Tensor, Tensor]]
    conv: str
    after: Tuple[str, ...]
    attr: Optional[str]


#: by the block's forward: timm ``Bottleneck`` (``act3(bn3(conv3(.)) + shortcut)``) and Keras ResNetV2
#: (``conv3(.) + shortcut``, the next block pre-activates). timm's ``InvertedResidual`` / ``EdgeResidual`` skips
#: (EfficientNets, MobileNetV2) fused the same way measured even (EfficientNetB0 0.97x, EfficientNetV2B0 1.00x on the
#: Zen 5 machine: their projections are narrow), so they are left out
_KINDS: Dict[Callable, _Kind] = {
    Bottleneck.forward: _Kind(_bottleneck_parts, "conv3", ("bn3", "se", "drop_path"), "relu"),
    KerasPreActBottleneck.forward: _Kind(_preact_parts, "conv3", ("drop_path",), None),
}


def _kind(m: nn.Module) -> Optional[_Kind]:
    return _KINDS.get(getattr(type(m), "forward", None))


def fusable_bottleneck(m: nn.Module) -> bool:
    """A residual block of a known layout (``_KINDS``: timm ``Bottleneck`` with a ReLU after the add, Keras
    ResNetV2) whose last convolution is a plain ``nn.Conv2d`` with nothing left after it but the add (its BatchNorm
    folded away, no squeeze-excitation or drop-path)."""
    kind = _kind(m)
    if kind is None or not _plain_conv(getattr(m, kind.conv)):
        return False
    if any(not _is_identity(getattr(m, name, None)) for name in kind.after):
        return False
    return kind.attr != "relu" or type(m.act3) is nn.ReLU  # oneDNN takes only a ReLU after the add


def _identity_shortcut(m: nn.Module) -> bool:
    """Whether the block's shortcut is its input itself."""
    return m.downsample is None and _is_identity(getattr(m, "shortcut_pool", None))


class FusedBottleneck(nn.Module):
    """``act(conv(...) + shortcut)`` of a :func:`fusable_bottleneck` block with the add (and the activation, if
    any) as post-ops of its last convolution: ``x [B, C, H, W]`` float32 on the CPU -> ``[B, C', H', W']``.

    With an identity shortcut the output is written over the input (:func:`fuse_residual_blocks` checks that
    nothing reads it afterwards); over the shortcut branch's own output otherwise.

    Args:
        block: the block; kept as a submodule (its parameters, and its forward for the fallback).
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.kind = _kind(block)
        self.training = block.training
        self.reordered = ReorderedWeight(getattr(block, self.kind.conv))

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        conv = getattr(b, self.kind.conv)
        if (self.training or x.device.type != "cpu" or x.dtype != torch.float32 or conv.weight.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
                or torch.is_autocast_enabled("cpu")):
            return b(x)
        y, shortcut = self.kind.parts(b, x)
        if y.is_contiguous(memory_format=torch.channels_last) and y.dim() == 4:
            shortcut = shortcut.contiguous(memory_format=torch.channels_last)
        else:
            y, shortcut = y.contiguous(), shortcut.contiguous()
        return conv_add_act_(shortcut, y, conv, self.kind.attr, self.reordered(conv.weight, y, conv.padding))


def conv_add_act_(other: Tensor, x: Tensor, conv: nn.Conv2d, attr: Optional[str] = None,
                  weight: Optional[Tensor] = None) -> Tensor:
    """``other = act(conv(x) + other)`` in place, one oneDNN call: ``x [B, C, H, W]``, ``other [B, C', H', W']`` (the
    output's shape and memory format); ``attr``: ``"relu"`` or ``None`` (the only activations oneDNN's PyTorch op
    takes after the add); ``weight``: ``conv``'s weight in oneDNN's layout (:class:`~lightning_app.conv_fusion.
    ReorderedWeight`), default ``conv.weight``. Returns ``other``. Float32 CPU tensors, no autograd."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        other, x, conv.weight if weight is None else weight, conv.bias, list(conv.padding), list(conv.stride),
        list(conv.dilation), conv.groups, "add", 1.0, attr, [], None)


def fuse_residual_blocks(net: nn.Module, example: Tensor) -> Replaced:
    """Replace every :func:`fusable_bottleneck` block of ``net`` (in place) by :class:`FusedBottleneck`, those with
    an identity shortcut only where a forward of ``example`` shows that nothing reads their input after them (module
    docstring); returns what was replaced (:func:`lightning_app.module_swap.restore_modules` puts it back)."""
    candidates = {m: n for n, m in net.named_modules() if fusable_bottleneck(m)}
    identity = {m: n for m, n in candidates.items() if _identity_shortcut(m)}
    free = inputs_free_after(net, example, identity) if identity else set()
    chosen = {m for m, n in candidates.items() if m not in identity or n in free}
    return replace_modules(net, lambda name, m: FusedBottleneck(m) if m in chosen else None)


__all__ = ["FusedBottleneck", "conv_add_act_", "fuse_residual_blocks", "fusable_bottleneck"]
