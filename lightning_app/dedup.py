"""Identical stateless operations on the same tensor computed once, for the inference engine's eager CPU path.

Keras's NASNet recomputes: every separable branch of a cell starts with its own ``ReLU`` of the cell's input (a
normal cell applies it three times to one input and twice to the other), the next cell's 1x1 convolution applies
``ReLU`` again to the tensor the previous one already rectified, and a normal cell adds two identical 3x3 average
pools of the same input. timm's NASNet, module for module Keras's, does the same. Compiled graphs drop such
repeats (common-subexpression elimination); eager PyTorch cannot see them.

:func:`deduplicate` finds them by running the network once: a stateless module (non-inplace ``ReLU`` / ``ReLU6``,
``AvgPool2d``, ``MaxPool2d`` without indices) whose configuration and input tensor equal those of another call.
Those modules are wrapped in :class:`ReuseResult`, which returns the result already computed for the same input
tensor object (same version: not modified in place since) while that tensor is alive, instead of computing it again.
The result is bit-identical. Outside inference (gradients wanted, training mode, ``torch.compile``) the wrapped
module simply runs.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from lightning_app.module_swap import Replaced, replace_modules
from lightning_app.tracing import run_hooked


def signature(module: nn.Module) -> Optional[Tuple[Hashable, ...]]:
    """What determines a stateless module's output besides its input, or ``None`` when it is not one this module
    handles (an in-place activation changes its input: never)."""
    t = type(module)
    if t in (nn.ReLU, nn.ReLU6) and not module.inplace:
        return (t.__name__,)
    if t is nn.AvgPool2d:
        return (t.__name__, str(module.kernel_size), str(module.stride), str(module.padding), module.ceil_mode,
                module.count_include_pad, module.divisor_override)
    if t is nn.MaxPool2d and not module.return_indices:
        return (t.__name__, str(module.kernel_size), str(module.stride), str(module.padding), str(module.dilation),
                module.ceil_mode)
    return None


def _version(t: Tensor) -> int:
    """``t``'s version counter; 0 for an inference tensor, which has none (:func:`find_repeats` then vouches that
    nothing in the network modifies these tensors in place)."""
    return 0 if t.is_inference() else t._version


class ResultTable:
    """Results by ``(signature, input tensor)``; an entry lives as long as its input tensor does."""

    def __init__(self) -> None:
        self.entries: Dict[Tuple[Hashable, int], Tuple[Any, int, Tensor, int]] = {}
        self.hits = 0

    def get(self, sig: Hashable, x: Tensor, compute: Callable[[], Tensor]) -> Tensor:
        key = (sig, id(x))
        entry = self.entries.get(key)
        if entry is not None:
            ref, version, out, out_version = entry
            if ref() is x and _version(x) == version and _version(out) == out_version:
                self.hits += 1
                return out
        out = compute()
        if key not in self.entries:
            weakref.finalize(x, self.entries.pop, key, None)  # the entry goes with its input
        self.entries[key] = (weakref.ref(x), _version(x), out, _version(out))
        return out


class ReuseResult(nn.Module):
    """``module`` (kept as a submodule) whose result for an input tensor it has already seen is reused."""

    def __init__(self, module: nn.Module, table: ResultTable) -> None:
        super().__init__()
        self.module = module
        self.sig = signature(module)
        self.__dict__["table"] = table  # shared, not a submodule
        self.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            return self.module(x)
        return self.table.get(self.sig, x, lambda: self.module(x))


def find_repeats(net: nn.Module, example: Tensor) -> List[List[str]]:
    """Groups of module names (two or more each) that one forward of ``example`` (a tensor with a version counter,
    not an inference tensor) calls with the same signature on the same input tensor, where neither that input nor
    any of the results is modified in place later in the forward (the networks' structure is static: what holds
    for one forward holds for all, which lets :class:`ResultTable` work on inference tensors)."""
    calls: List[List[Any]] = []  # [name, sig, input, its version, output, its version]; all kept alive
    hooks = []
    for name, module in net.named_modules():
        sig = signature(module)
        if sig is not None and name:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name, sig=sig: calls.append([name, sig, args[0], args[0]._version])))
            hooks.append(module.register_forward_hook(
                lambda m, args, out: calls[-1].extend([out, out._version])))
    run_hooked(net, example, hooks)
    groups: Dict[Tuple[Hashable, int], List[List[Any]]] = {}
    for call in calls:
        groups.setdefault((call[1], id(call[2])), []).append(call)
    return [[c[0] for c in group] for group in groups.values()
            if len(group) > 1 and all(c[2]._version == c[3] and c[4]._version == c[5] for c in group)]


@torch.no_grad()
def deduplicate(net: nn.Module, example: Tensor) -> Replaced:
    """Wrap (in place) every module of :func:`find_repeats`'s groups in :class:`ReuseResult`, one table for the
    network. Returns what was replaced (:func:`~lightning_app.module_swap.restore_modules` puts it back)."""
    names = {name for group in find_repeats(net, example) for name in group}
    table = ResultTable()
    return replace_modules(net, lambda name, module: ReuseResult(module, table) if name in names else None)


__all__ = ["ResultTable", "ReuseResult", "deduplicate", "find_repeats", "signature"]
