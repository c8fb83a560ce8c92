"""Linear layers (with the activation that alone reads their output) as one oneDNN call, for the inference engine's
float32 CPU path where oneDNN's matrix product beats MKL's.

PyTorch's float32 ``nn.Linear`` on the CPU is an MKL GEMM. On AMD CPUs MKL runs its AVX2 code even where the CPU has
AVX-512, while oneDNN (which PyTorch already uses for its convolutions) runs AVX-512: on this project's 2-core AMD EPYC
(Zen 5) a 2048^3 product takes 80 ms in ``torch.mm`` and 38 ms in ``torch.ops.mkldnn._linear_pointwise`` (the op
inductor's CPU fusion emits), ConvNeXtTiny's engine runs 1.9x faster with its Linear layers and their GELU on oneDNN
(21.8 -> 41.6 img/s at batch 16), and the head's ``32 x 2048 @ 2048 x 256`` product takes 106 instead of 219 us. On CPUs where MKL is the faster library nothing
changes: :func:`onednn_linear_faster` times one product both ways, once per process.

:func:`fuse_linears` replaces every ``nn.Linear`` of a network by :class:`LinearAct`, which also takes the
activation module that alone reads the Linear's output (ConvNeXt's GELU, found by one traced forward as
:mod:`lightning_app.conv_fusion` finds its pairs) as a oneDNN post-op; the activation becomes ``nn.Identity``.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers.activations import GELU as TimmGELU, GELUTanh as TimmGELUTanh
from torch import Tensor

from lightning_app import conv_fusion
from lightning_app.tracing import trace_producer_consumer_pairs

#: oneDNN must be at least this much faster than MKL on the calibration product for Linear layers to move to it
MIN_SPEEDUP = 1.1

#: activation module type -> (oneDNN post-op name, its scalars, its algorithm, the aten op that reads the input):
#: the convolutions' post-ops, and GELU (ConvNeXt's MLP)
POST_OPS: Dict[type, Callable[[nn.Module], Tuple[str, List[Any], Optional[str], str]]] = {
    **conv_fusion.POST_OPS,
    nn.GELU: lambda m: ("gelu", [], m.approximate, "aten.gelu"),
    TimmGELU: lambda m: ("gelu", [], "none", "aten.gelu"),
    TimmGELUTanh: lambda m: ("gelu", [], "tanh", "aten.gelu"),
}


def available() -> bool:
    """Whether this PyTorch build has oneDNN's fused linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def onednn_linear_faster(repeats: int = 5) -> bool:
    """Whether oneDNN's float32 matrix product is at least ``MIN_SPEEDUP`` times faster than MKL's (``torch.mm``)
    on this CPU with the current threads: best of ``repeats`` ``512 x 1024 @ 1024 x 1024`` products each way
    (about 10-30 ms in all; random operands from a generator of its own). Cached for the process."""
    if not available():
        return False
    gen = torch.Generator().manual_seed(0)  # the global stream (dropout masks) is not touched
    with torch.no_grad():
        x, w = torch.randn(512, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
        wt = w.t()
        mkl = _best_seconds(lambda: torch.mm(x, wt), repeats)
        dnn = _best_seconds(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), repeats)
    return mkl >= MIN_SPEEDUP * dnn


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], attr: str = "none", scalars: Optional[List[Any]] = None,
           algorithm: Optional[str] = None) -> Tensor:
    """``act(x @ weight^T + bias)`` in one oneDNN call: ``x [*, in]``, ``weight [out, in]`` -> ``[*, out]``; float32
    CPU tensors, no autograd. ``attr`` names the post-op (``"none"``, ``"relu"``, ``"gelu"`` ...)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, scalars or [], algorithm)


class LinearAct(nn.Module):
    """``act(linear(x))`` as one oneDNN call: ``x [*, in]`` float32 on the CPU -> ``[*, out]``.

    Args:
        lin: the ``nn.Linear``; kept as a submodule with its own parameters (an in-place refresh of a copy works).
        act: the activation module (a key of the post-op table) whose work moves into the call, or ``None``.

    Runs ``act(lin(x))`` unfused wherever the op does not apply: another device or dtype, autocast, an input or
    weight that requires grad.
    """

    def __init__(self, lin: nn.Linear, act: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.lin, self.act = lin, act
        self.attr, self.scalars, self.algorithm, _ = POST_OPS[type(act)](act) if act is not None else \
            ("none", [], None, "")

    def forward(self, x: Tensor) -> Tensor:
        lin = self.lin
        if (x.device.type != "cpu" or x.dtype != torch.float32 or lin.weight.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or lin.weight.requires_grad))
                or torch.is_autocast_enabled("cpu")):
            y = lin(x)
            return self.act(y) if self.act is not None else y
        return linear(x.contiguous(), lin.weight, lin.bias, self.attr, self.scalars, self.algorithm)

    def extra_repr(self) -> str:
        return f"post_op={self.attr!r}"


def find_linear_act_pairs(net: nn.Module, example: Tensor) -> List[Tuple[str, str]]:
    """``(linear name, activation name)`` pairs of ``net`` where the activation is the sole reader of the Linear's
    output (each runs once; checked at the aten level by one forward of ``example``)."""
    acts = {m: POST_OPS[type(m)](m)[3] for m in net.modules() if type(m) in POST_OPS}
    return trace_producer_consumer_pairs(net, example, producer=lambda m: type(m) is nn.Linear,
                                         consumer=lambda m: m in acts, op=lambda m: acts[m])[0]


@torch.no_grad()
def fuse_linears(net: nn.Module, example: Tensor) -> int:
    """Replace, in ``net`` (in place; in eval mode), every ``nn.Linear`` by :class:`LinearAct`, taking the
    activation of its :func:`find_linear_act_pairs` pair (which becomes ``nn.Identity``); returns the number of
    Linear layers replaced."""
    names = [n for n, m in net.named_modules() if type(m) is nn.Linear]
    if not names:
        return 0
    pairs = dict(find_linear_act_pairs(net, example))
    for name in names:
        act_name = pairs.get(name)
        act = net.get_submodule(act_name) if act_name else None
        net.set_submodule(name, LinearAct(net.get_submodule(name), act))
        if act_name:
            net.set_submodule(act_name, nn.Identity())
    return len(names)


__all__ = ["LinearAct", "MIN_SPEEDUP", "POST_OPS", "available", "find_linear_act_pairs", "fuse_linears", "linear",
           "onednn_linear_faster"]
