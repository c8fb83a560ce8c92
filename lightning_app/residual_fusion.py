"""A ResNet bottleneck's last convolution, residual add and activation as one oneDNN call, for the inference
engine's float32 CPU path.

timm's :class:`~timm.models.resnet.Bottleneck` ends ``x = bn3(conv3(x)); x += shortcut; x = act3(x)``: with the
BatchNorm folded, the convolution writes its output, the add reads it and the shortcut and writes the sum, and the
ReLU reads and writes it once more. oneDNN accumulates the convolution into the shortcut's buffer (its "sum"
post-op: ``torch.ops.mkldnn._convolution_pointwise_.binary``, the in-place op inductor's CPU fusion emits for this
pattern) and applies the ReLU on the way out, so the block's output is written once, where the shortcut was. These
are a ResNet's largest tensors (256 channels at 56 px in the first stage): ResNet50's engine 1.18x faster on a
2-core Zen 5 EPYC, bit-identical output. (The out-of-place form, ``conv(x) + other`` into a new tensor, was 0.96x:
slower than not fusing.)

Writing into the shortcut is safe where nothing reads it afterwards: a projection shortcut's output always
qualifies; a block's own input (the identity shortcut) only where one traced forward shows no read of its storage
after the block returns (:func:`fuse_residual_blocks`; otherwise that block is left as it is).

:func:`fuse_residual_blocks` replaces such blocks of a folded, activation-fused copy (:mod:`lightning_app.engine`)
by :class:`FusedBottleneck`, which runs the block's own modules for everything before ``conv3`` and falls back to
the block's own forward wherever the op does not apply (another device or dtype, autocast, gradients).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set

import torch
import torch.nn as nn
from timm.models.resnet import Bottleneck
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_app.conv_fusion import _POST_OPS
from lightning_app.module_swap import Replaced, replace_modules
from lightning_app.tracing import run_hooked


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or type(m) is nn.Identity


def fusable_bottleneck(m: nn.Module) -> bool:
    """A timm ``Bottleneck`` (or subclass keeping its forward) whose ``bn3`` is folded away (``nn.Identity``),
    with no squeeze-excitation or drop-path, a plain ``conv3`` and a post-op activation."""
    return (isinstance(m, Bottleneck) and type(m).forward is Bottleneck.forward and _is_identity(m.bn3)
            and m.se is None and _is_identity(m.drop_path) and type(m.conv3) is nn.Conv2d
            and m.conv3.padding_mode == "zeros" and not isinstance(m.conv3.padding, str)
            and type(m.act3) in _POST_OPS)


class FusedBottleneck(nn.Module):
    """``act3(bn3(conv3(...)) + shortcut)`` of a :func:`fusable_bottleneck` block with the add and the activation as
    post-ops of ``conv3``: ``x [B, C, H, W]`` float32 on the CPU -> ``[B, C', H', W']``.

    With an identity shortcut the output is written over the input (:func:`fuse_residual_blocks` checks that
    nothing reads it afterwards); a projection shortcut's own output is overwritten otherwise.

    Args:
        block: the bottleneck; kept as a submodule (its parameters, and its forward for the fallback).
    """

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.block = block
        self.attr, self.scalars, self.algorithm, _ = _POST_OPS[type(block.act3)](block.act3)

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        conv = b.conv3
        if (x.device.type != "cpu" or x.dtype != torch.float32 or conv.weight.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
                or torch.is_autocast_enabled("cpu")):
            return b(x)
        y = b.act1(b.bn1(b.conv1(x)))
        y = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(y)))))
        shortcut = x if b.downsample is None else b.downsample(x)
        if y.is_contiguous(memory_format=torch.channels_last) and y.dim() == 4:
            shortcut = shortcut.contiguous(memory_format=torch.channels_last)
        else:
            y, shortcut = y.contiguous(), shortcut.contiguous()
        return conv_add_act_(shortcut, y, conv, self.attr, self.scalars, self.algorithm)


def conv_add_act_(other: Tensor, x: Tensor, conv: nn.Conv2d, attr: str = "none",
                  scalars: Optional[List[Any]] = None, algorithm: Optional[str] = None) -> Tensor:
    """``other = act(conv(x) + other)`` in place, one oneDNN call: ``x [B, C, H, W]``, ``other [B, C', H', W']`` (the
    output's shape and memory format); returns ``other``. Float32 CPU tensors, no autograd."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        other, x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "add", 1.0, attr, scalars or [], algorithm)


class _ReadsAfter(TorchDispatchMode):
    """Records which watched storages (data pointer -> block name) aten operations read once marked closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: Dict[int, str] = {}
        self.read_after: Set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        for t in tree_leaves((args, kwargs or {})):
            if isinstance(t, Tensor) and self.closed and t.untyped_storage().data_ptr() in self.closed:
                self.read_after.add(self.closed[t.untyped_storage().data_ptr()])
        return func(*args, **(kwargs or {}))


def _inputs_free_after_block(net: nn.Module, example: Tensor, blocks: Dict[nn.Module, str]) -> Set[str]:
    """Names of ``blocks`` whose input storage nothing reads after the block returns (one forward of ``example``;
    the network's input never qualifies). Inputs are kept alive during the trace so no storage is reused."""
    log, keep, free = _ReadsAfter(), [], set(blocks.values())
    example_ptr = example.untyped_storage().data_ptr()

    def before(mod: nn.Module, args: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.untyped_storage().data_ptr() == example_ptr:
            free.discard(blocks[mod])
        else:
            keep.append(x)

    def after(mod: nn.Module, args: Any, out: Any) -> None:
        if args and isinstance(args[0], Tensor):
            log.closed[args[0].untyped_storage().data_ptr()] = blocks[mod]

    handles = [m.register_forward_pre_hook(before) for m in blocks]
    handles += [m.register_forward_hook(after) for m in blocks]
    with log:
        run_hooked(net, example, handles)
    return free - log.read_after


def fuse_residual_blocks(net: nn.Module, example: Tensor) -> Replaced:
    """Replace every :func:`fusable_bottleneck` block of ``net`` (in place) by :class:`FusedBottleneck`, those with
    an identity shortcut only where a forward of ``example`` shows that nothing reads their input after them (module
    docstring); returns what was replaced (:func:`lightning_app.module_swap.restore_modules` puts it back)."""
    candidates = {m: n for n, m in net.named_modules() if fusable_bottleneck(m)}
    identity = {m: n for m, n in candidates.items() if m.downsample is None}
    free = _inputs_free_after_block(net, example, identity) if identity else set()
    chosen = {m for m, n in candidates.items() if m.downsample is not None or n in free}
    return replace_modules(net, lambda name, m: FusedBottleneck(m) if m in chosen else None)


__all__ = ["FusedBottleneck", "conv_add_act_", "fuse_residual_blocks", "fusable_bottleneck"]
