"""3x3 convolutions through NNPACK's Winograd kernels, for the inference engine's eager float32 CPU path.

oneDNN computes a 3x3 convolution directly: 9 multiply-adds per input channel and output value. NNPACK (built into
PyTorch's CPU wheels: ``torch._nnpack_spatial_convolution``) computes a batch with Winograd's F(6x6, 3x3)
transform: about a quarter of the multiplications, plus a transform of the input and output tiles. On large feature
maps with many channels that wins; on small maps the tiles' overhead loses. Batch 16, 2-core AVX2 EPYC, ms per call
(oneDNN channels_last with its fused ReLU -> NNPACK on NCHW, ReLU after):

=====================  ========  =======  =====================  ========  =======
layer                   oneDNN   NNPACK   layer                   oneDNN   NNPACK
=====================  ========  =======  =====================  ========  =======
64 -> 64 at 224          385      337     512 -> 512 at 14          75       84
128 -> 128 at 112        345      242     256 -> 256 at 14          19       26
256 -> 256 at 56         373      217     64 -> 64 at 56            19       22
512 -> 512 at 28         322      201     128 -> 128 at 28          19       20
256 -> 512 at 28         148      105     512 -> 512 at 7           23       45
128 -> 256 at 56         170      122     384 -> 384 at 8           13       28
=====================  ========  =======  =====================  ========  =======

NNPACK reads and writes NCHW. In a channels_last network the two layout conversions around each such layer cost
more than it saves at 56 px and above, so a whole network changes or nothing: where the layers it wins on (3x3,
stride 1, outputs of at least ``MIN_SIZE`` px) carry at least ``MIN_SHARE`` of the network's convolution
multiply-adds (:func:`winograd_plan`; the VGGs: VGG16 1.25x, VGG19 1.31x for the whole network at 224 px),
:func:`apply_winograd` replaces them by :class:`WinogradConv2d` and puts the network's weights in NCHW (the engine
then feeds it NCHW). The ResNets, Inceptions and DenseNets stay below the share and keep oneDNN.

Only on AVX2 CPUs: NNPACK's x86 kernels are AVX2, while on AVX-512 CPUs oneDNN's direct convolution has twice the
peak. Measured on a 2-core AMD EPYC with AVX-512 (Zen 5), batch 16: oneDNN channels_last reaches 330-550 GFLOP/s and
NNPACK runs the VGG layers above at 0.82-0.91x its speed (64 -> 64 at 224 px: 216 against 178 ms; 512 -> 512 at
28 px: 127 against 111 ms), the small maps at 0.24-0.61x. Results differ from the direct convolution by rounding (relative ~1e-6 per layer; the engine checks the
network's output, like the BatchNorm fold).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from lightning_app.conv_fusion import ConvAct2d
from lightning_app.module_swap import Replaced, replace_modules, restore_modules
from lightning_app.tracing import run_hooked

#: smallest output height and width of a layer run through NNPACK (its 8x8 tiles lose on smaller maps)
MIN_SIZE = 28
#: smallest batch run through NNPACK: on smaller ones its batched path loses (512 -> 512 at 28 px: 0.49x at 2 images,
#: 0.68x at 4, 1.12x at 8, 1.54x at 16); they run the direct convolution
MIN_BATCH = 8
#: fewest input channels (the first RGB layer stays direct)
MIN_CHANNELS = 16
#: the layers NNPACK would run must carry at least this share of the network's convolution multiply-adds
MIN_SHARE = 0.5


def available() -> bool:
    """Whether this process can run NNPACK's Winograd convolution and it pays: PyTorch built with NNPACK (this call
    initialises it) on an AVX2 (not AVX-512) CPU."""
    try:
        return bool(torch.backends.nnpack.is_available()) and torch.backends.cpu.get_cpu_capability() == "AVX2"
    except Exception:  # an unusual build
        return False


def _plain_conv(m: nn.Module) -> nn.Module:
    """The convolution of ``m``: itself, or a :class:`ConvAct2d`'s."""
    return m.conv if isinstance(m, ConvAct2d) else m


def _eligible(m: nn.Module) -> bool:
    """A 3x3, stride-1, dense, undilated convolution with symmetric numeric zero padding (optionally with a fused
    ReLU): what NNPACK computes."""
    if isinstance(m, ConvAct2d) and (m.padded or not (m.act is None or isinstance(m.act, nn.ReLU))):
        return False
    conv = _plain_conv(m)
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and conv.in_channels >= MIN_CHANNELS)


class WinogradConv2d(nn.Module):
    """``conv(x)`` (and its fused ReLU) by NNPACK's Winograd kernels: ``x [B, C, H, W]`` float32 on the CPU ->
    ``[B, C', H', W']`` NCHW.

    Args:
        inner: the convolution it replaces (``nn.Conv2d``, or a :class:`ConvAct2d` with a ReLU); kept, with its
            parameters, and run instead wherever NNPACK does not apply: another device or dtype, autocast,
            batches below ``MIN_BATCH``, weights that require grad, ``torch.compile``. An input that requires
            grad (the attacks differentiate through the engine) still runs NNPACK: autograd differentiates it as
            the convolution it is (PyTorch's convolution backward).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.conv = _plain_conv(inner)
        self.relu = isinstance(inner, ConvAct2d) and inner.act is not None

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if (x.device.type != "cpu" or x.dtype != torch.float32 or conv.weight.dtype != torch.float32
                or x.shape[0] < MIN_BATCH or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled() and conv.weight.requires_grad)):
            return self.inner(x)
        y = torch._nnpack_spatial_convolution(x.contiguous(), conv.weight, conv.bias, list(conv.padding))
        return y.relu_() if self.relu else y


def winograd_layers(net: nn.Module, example: Tensor) -> Tuple[List[str], float]:
    """The layers of ``net`` NNPACK would run for an input like ``example [B, C, H, W]`` (eligible convolutions
    whose outputs are at least ``MIN_SIZE`` px each way), and their share of its convolution multiply-adds
    (one forward of ``example``, in ``net``'s current mode)."""
    macs: Dict[str, Tuple[bool, int]] = {}

    def hook(name: str, mod: nn.Module, out: Tensor) -> None:
        c = _plain_conv(mod)
        h, w = out.shape[-2:]
        n = h * w * c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0] * c.kernel_size[1]
        macs[name] = (_eligible(mod) and min(h, w) >= MIN_SIZE, n)

    run_hooked(net, example, [m.register_forward_hook(lambda mod, args, out, name=name: hook(name, mod, out))
                              for name, m in net.named_modules() if isinstance(_plain_conv(m), nn.Conv2d)])
    # a ConvAct2d and its inner conv both hooked: count the outer one only
    names = [n for n in macs if not any(n.startswith(o + ".") for o in macs)]
    total = sum(macs[n][1] for n in names)
    chosen = [n for n in names if macs[n][0]]
    return chosen, (sum(macs[n][1] for n in chosen) / total if total else 0.0)


def winograd_plan(net: nn.Module, example: Tensor) -> List[str]:
    """The layers to run through NNPACK for inputs like ``example`` (one sample suffices): :func:`winograd_layers`
    where they carry at least ``MIN_SHARE`` of the multiply-adds, else none."""
    chosen, share = winograd_layers(net, example)
    return chosen if share >= MIN_SHARE else []


@torch.no_grad()
def apply_winograd(net: nn.Module, names: List[str]) -> Replaced:
    """Replace the layers ``names`` (:func:`winograd_plan`) of ``net`` by :class:`WinogradConv2d` and convert its
    convolution weights to NCHW (in place; feed it NCHW). Returns what was replaced (undo: :func:`undo_winograd`)."""
    if not names:
        return []
    chosen = set(names)
    replaced = replace_modules(net, lambda name, m: WinogradConv2d(m) if name in chosen else None)
    _set_weight_format(net, torch.contiguous_format)
    return replaced


def _set_weight_format(net: nn.Module, memory_format: torch.memory_format) -> None:
    """Every 4-d parameter of ``net`` in ``memory_format``, in place (the same ``Parameter`` objects: whoever holds
    them, e.g. the engine's refresh, keeps working)."""
    for p in net.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=memory_format)


def undo_winograd(net: nn.Module, replaced: Replaced, channels_last: bool) -> None:
    """Put back what :func:`apply_winograd` replaced, and ``net``'s memory format (``channels_last`` or NCHW)."""
    if replaced:
        restore_modules(net, replaced)
        _set_weight_format(net, torch.channels_last if channels_last else torch.contiguous_format)


__all__ = ["MIN_BATCH", "MIN_SHARE", "MIN_SIZE", "WinogradConv2d", "apply_winograd", "available", "undo_winograd",
           "winograd_layers", "winograd_plan"]
