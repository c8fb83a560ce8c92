"""Convolution + activation as one oneDNN call on the CPU, for the inference engine's float32 and bf16 paths.

PyTorch's eager CPU convolution (oneDNN) writes its output to memory, and the activation that follows reads it back
and writes it again. TensorFlow's CPU graphs fuse the two (oneDNN post-ops), and so does inductor's CPU backend
(``torch.ops.mkldnn._convolution_pointwise``, the op its fusion pass emits). :func:`fuse_conv_activations` does the
same in eager mode, without compiling: where an activation module is the sole reader of a convolution's output
(found by running the network once, as the BatchNorm fold finds its pairs), the convolution is replaced by
:class:`ConvAct2d`, which runs ``act(conv(x))`` as one call, and the activation by ``nn.Identity``. The memory-bound
networks gain most (MobileNets, EfficientNets: their activations are as large as their convolutions' work).

:class:`ConvAct2d` keeps the convolution module (and so its parameters: refreshing a folded copy in place still
works) and the activation, and runs them unfused wherever the fused op does not apply: another device or dtype,
autocast to another dtype than bf16, ``torch.compile`` under bf16 autocast (inductor fuses itself), or an input that
requires grad (the attacks differentiate through the engine). Under CPU bf16 autocast (the engine's default on a
CPU with native bf16) it runs the fused op in bf16 with the weight and bias cast once (:class:`Bf16Operands`)
instead of at every call, as autocast does, and the weight reordered once too: the engine with and without
``fuse_activations`` on a 2-core Zen 5 EPYC at batch 16, ResNet50 1.04x, Xception 1.05x, DenseNet121 1.02x,
EfficientNetB0 1.05-1.13x, MobileNetV2 1.22-1.30x.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from lightning_app.layout import is_channels_last
from lightning_app.same_conv import conv_operands, explicit_pads, pads_explicitly
from lightning_app.tracing import trace_producer_consumer_pairs

#: activation module type -> (oneDNN post-op name, its scalars, its algorithm, the aten op that reads the input)
POST_OPS: Dict[type, Callable[[nn.Module], Tuple[str, List[Any], Optional[str], str]]] = {
    nn.ReLU: lambda m: ("relu", [], None, "aten.relu"),
    nn.ReLU6: lambda m: ("hardtanh", [0.0, 6.0], None, "aten.hardtanh"),
    nn.Hardtanh: lambda m: ("hardtanh", [float(m.min_val), float(m.max_val)], None, "aten.hardtanh"),
    nn.SiLU: lambda m: ("swish", [], None, "aten.silu"),
    nn.Hardswish: lambda m: ("hardswish", [], None, "aten.hardswish"),
    nn.Sigmoid: lambda m: ("sigmoid", [], None, "aten.sigmoid"),
}


def fusable_conv(m: nn.Module) -> bool:
    """A 2-d convolution :class:`ConvAct2d` can run: ``nn.Conv2d`` with zero padding given as numbers, or one that
    pads its input explicitly (:func:`lightning_app.same_conv.pads_explicitly`: timm's ``Conv2dSame``, TensorFlow's
    ``"same"`` padding computed per input as timm does, or a ``ZeroPadding2D`` + ``"valid"`` convolution)."""
    if pads_explicitly(m):
        return True
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def available() -> bool:
    """Whether this PyTorch build has the fused oneDNN op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


#: input shapes per convolution whose reordered weight is kept, the oldest dropped first: a run's full batch and its
#: last one (each a copy of the weight; oneDNN's layout can depend on the batch size: MobileNet ran 0.73x with the
#: weights reordered for one image and used for 16)
PACKED_SHAPES = 2


class ReorderedWeight:
    """A convolution's weight in oneDNN's blocked layout (``mkldnn._reorder_convolution_weight``, what inductor's CPU
    freezing does), kept per input shape and made again after the weight changes (its version and storage: the
    engine refreshes its copy in place). PyTorch's eager oneDNN convolution reorders the plain weight at every call;
    skipping that is worth most where the weight is large and the map small: on a 2-core Zen 5 EPYC (batch 16) a
    3x3 512 -> 512 convolution at 7 px 7.47 -> 6.67 ms, a 1x1 1024 -> 1024 at 7 px 4.27 -> 3.46 ms; at batch 1
    1.54 -> 0.60 ms. Bit-identical. Depthwise weights are tiny and measured no faster reordered: they are left as
    they are.

    Args:
        conv: the convolution whose stride, dilation and groups the layout is for.
    """

    def __init__(self, conv: nn.Module) -> None:
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        self.depthwise = conv.groups > 1 and conv.weight.shape[1] == 1
        self._packed: Dict[torch.Size, Tensor] = {}  # input shape -> reordered weight
        self._key: Optional[Tuple[int, int]] = None

    def __getstate__(self) -> Dict[str, Any]:  # a cache: dropped on copies (oneDNN tensors do not copy)
        return {**self.__dict__, "_packed": {}, "_key": None}

    def __call__(self, weight: Tensor, x: Tensor, padding: Sequence[int]) -> Tensor:
        """``weight`` reordered for a channels_last input of ``x``'s shape, or ``weight`` itself for other inputs, a
        depthwise convolution, an inference tensor (no version to follow) or under ``torch.compile``."""
        if torch.compiler.is_compiling() or self.depthwise or weight.is_inference() or not is_channels_last(x):
            return weight
        key = (weight._version, weight.data_ptr())
        if key != self._key:
            self._packed.clear()
            self._key = key
        size = x.shape
        packed = self._packed.get(size)
        if packed is None:
            if len(self._packed) >= PACKED_SHAPES:
                self._packed.pop(next(iter(self._packed)))
            packed = self._packed[size] = torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach(), list(padding), self.stride, self.dilation, self.groups, list(x.shape))
        return packed


class Bf16Operands:
    """A convolution's weight and bias cast to bfloat16 once (as bf16 autocast casts them at every call), made again
    after either changes (version and storage: the engine refreshes its copy in place). The casts are ordinary
    tensors even when first needed under ``torch.inference_mode`` (:class:`ReorderedWeight` reorders them once)."""

    def __init__(self) -> None:
        self._key: Optional[Tuple[int, ...]] = None
        self._cast: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None)

    def __getstate__(self) -> Dict[str, Any]:  # a cache: dropped on copies
        return {"_key": None, "_cast": (None, None)}

    def __call__(self, conv: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
        """``(weight, bias)`` of ``conv`` in bfloat16."""
        w, b = conv.weight, conv.bias
        key = (w._version, w.data_ptr()) + ((b._version, b.data_ptr()) if b is not None else ())
        if key != self._key:
            with torch.inference_mode(False), torch.no_grad():
                self._cast = (w.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16) if b is not None else None)
            self._key = key
        return self._cast  # type: ignore[return-value]


class ConvAct2d(nn.Module):
    """``act(conv(x))`` in one oneDNN call: ``x [B, C, H, W]`` float32 on the CPU -> ``[B, C', H', W']``; under CPU
    bf16 autocast ``x`` float32 or bf16 -> bf16, as autocast's convolution returns (module docstring).

    The weight is reordered into oneDNN's layout once per input shape, not at every call (:class:`ReorderedWeight`).

    Args:
        conv: the convolution (:func:`fusable_conv`); kept as a submodule with its own parameters.
        act: the activation module (a key of the post-op table; kept for the unfused path), or ``None``: the
            convolution alone, for its reordered weight.
    """

    def __init__(self, conv: nn.Module, act: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv, self.act = conv, act
        self.attr, self.scalars, self.algorithm, _ = POST_OPS[type(act)](act) if act is not None else \
            ("none", [], None, "")
        self.padded, self.pads = pads_explicitly(conv), explicit_pads(conv)  # pads None: TF "same"
        self.reordered = ReorderedWeight(conv)
        self.bf16 = Bf16Operands()
        self.reordered_bf16 = ReorderedWeight(conv)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if (x.device.type != "cpu" or conv.weight.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))):
            return self._unfused(x)
        if torch.is_autocast_enabled("cpu"):
            if (torch.get_autocast_dtype("cpu") != torch.bfloat16 or x.dtype not in (torch.float32, torch.bfloat16)
                    or torch.compiler.is_compiling()):
                return self._unfused(x)
            weight, bias = self.bf16(conv)
            return self._fused(x.to(torch.bfloat16), weight, bias, self.reordered_bf16)
        if x.dtype != torch.float32:
            return self._unfused(x)
        return self._fused(x, conv.weight, conv.bias, self.reordered)

    def _unfused(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.act is None else self.act(self.conv(x))

    def _fused(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], reordered: ReorderedWeight) -> Tensor:
        conv, padding, plain = self.conv, self.conv.padding, weight
        if self.padded:
            x, weight, padding = conv_operands(conv, x, self.pads, weight)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        if weight is plain:
            weight = reordered(weight, x, padding)
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(padding), list(conv.stride),
                                                       list(conv.dilation), conv.groups, self.attr, self.scalars,
                                                       self.algorithm)

    def extra_repr(self) -> str:
        return f"post_op={self.attr!r}"


def find_conv_act_pairs(net: nn.Module, example: Tensor) -> List[Tuple[str, str]]:
    """``(conv name, activation name)`` pairs of ``net`` where the activation is the sole reader of the
    convolution's output (each runs once; checked at the aten level by one forward of ``example``)."""
    acts = {m: POST_OPS[type(m)](m)[3] for m in net.modules() if type(m) in POST_OPS}
    return trace_producer_consumer_pairs(net, example, producer=fusable_conv, consumer=lambda m: m in acts,
                                         op=lambda m: acts[m])[0]


@torch.no_grad()
def wrap_convolutions(net: nn.Module, skip_inside: Tuple[type, ...] = ()) -> int:
    """Every :func:`fusable_conv` of ``net`` (in place) not yet in a :class:`ConvAct2d`, nor inside a module of the
    types ``skip_inside`` (e.g. a residual block that calls its convolution itself), becomes ``ConvAct2d(conv)``:
    one oneDNN call with a reordered weight. Returns the number wrapped."""
    skip = tuple(skip_inside) + (ConvAct2d,)
    inside = {name for name, m in net.named_modules() if isinstance(m, skip)}
    names = [name for name, m in net.named_modules() if name and fusable_conv(m)
             and not any(name.startswith(p + ".") for p in inside)]
    for name in names:
        net.set_submodule(name, ConvAct2d(net.get_submodule(name)))
    return len(names)


@torch.no_grad()
def fuse_conv_activations(net: nn.Module, example: Tensor) -> int:
    """Replace, in ``net`` (in place; in eval mode), every convolution -> activation pair of
    :func:`find_conv_act_pairs` by :class:`ConvAct2d` and an ``nn.Identity``; returns the number fused."""
    pairs = find_conv_act_pairs(net, example)
    for conv_name, act_name in pairs:
        act = net.get_submodule(act_name)
        net.set_submodule(conv_name, ConvAct2d(net.get_submodule(conv_name), act))
        net.set_submodule(act_name, nn.Identity())
    return len(pairs)


__all__ = ["Bf16Operands", "ConvAct2d", "POST_OPS", "ReorderedWeight", "available", "find_conv_act_pairs",
           "fusable_conv", "fuse_conv_activations", "wrap_convolutions"]
