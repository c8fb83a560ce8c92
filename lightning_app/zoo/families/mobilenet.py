"""Keras MobileNet (v1), alpha 0.25 / 0.5 / 0.75 / 1.0 at 128 / 160 / 192 / 224: timm's MobileNet-V1
(``mobilenetv1_100``: ``EfficientNet`` with depthwise-separable blocks) with Keras's padding, widths and
BatchNorm.

Checked layer by layer against ``keras/src/applications/mobilenet.py``:

* Stem ``conv1``: 3x3 stride 2 ``same``, TF padding (the extra pixel at the bottom / right): timm's
  ``Conv2dSame`` (``pad_type='same'``) computes it per input, so it is exact at every size.
* Strided depthwise convs (blocks 2, 4, 6, 12): Keras pads a FIXED ``ZeroPadding2D(((0, 1), (0, 1)))``
  and then runs a ``valid`` 3x3 stride-2 conv. That equals TF-same only on even maps. On an odd map
  (25x25 at input 100, say) TF-same pads one pixel on every side, which shifts every window, so timm's
  ``pad_type='same'`` would differ from Keras there. We pad as Keras does (``ZeroPadConv2d``), so ours
  equals Keras at every input size, not only at the four shipped ones (whose maps are all even).
* Stride-1 depthwise 3x3 ``same`` is symmetric padding 1. Pointwise 1x1 convs. Every conv is bias-free,
  and every activation is ReLU6.
* Widths are ``int(filters * alpha)``. For the four shipped alphas these are multiples of 8, so timm's
  ``round_channels`` would agree, but we use Keras's formula anyway.
* BatchNorm: eps 1e-3, momentum 0.99 (PyTorch 0.01).
* Top: GlobalAveragePooling2D(keepdims) -> Dropout -> ``conv_preds`` (1x1 conv with bias) -> Reshape ->
  softmax. A 1x1 conv on a 1x1 map is a Dense layer, so it becomes timm's Linear ``classifier``.
  ``num_classes=0`` gives the pooled ``conv_pw_13_relu`` features (1024 * alpha), which is Keras's
  ``include_top=False, pooling="avg"``.

Files: ``mobilenet/mobilenet_{1_0,7_5,5_0,2_5}_{128,160,192,224}_tf[_no_top].h5``. Keras publishes no hash
for them, so each file is proven by its conversion instead (``lightning_app.zoo.weights``). Top-1 / top-5
at 224 are the Keras-measured figures of every alpha (keras-applications README, 05ff470: 100 minus the
errors). The top-1 of 1.0 at 128 / 160 / 192 is from the keras-applications ``mobilenet.py`` docstring
(the paper); the other sizes are unpublished.

Mapping: ``conv1`` / ``conv1_bn`` -> ``conv_stem`` / ``bn1``. Keras block k (1..13) is the k-th timm
block (stages of 1, 2, 2, 6, 2 blocks), where ``conv_dw_k``, ``conv_dw_k_bn``, ``conv_pw_k`` and
``conv_pw_k_bn`` map to ``conv_dw``, ``bn1``, ``conv_pw`` and ``bn2``. ``conv_preds`` maps to ``classifier``.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from timm.models._efficientnet_builder import decode_arch_def, resolve_bn_args
from timm.models.efficientnet import EfficientNet

from converters.builder import StateDictBuilder
from converters.spec import KerasLayers
from lightning_app.zoo.registry import KerasFiles, SizeVariant, WeightFile, keras_application

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)
#: timm block string per stage; Keras blocks 1..13 in order (stride 2 first in stages 2-5)
ARCH_DEF = [["dsa_r1_k3_s1_c64"], ["dsa_r2_k3_s2_c128"], ["dsa_r2_k3_s2_c256"], ["dsa_r6_k3_s2_c512"],
            ["dsa_r2_k3_s2_c1024"]]
STAGE_DEPTHS = (1, 2, 2, 6, 2)
SIZES = (128, 160, 192, 224)


class ZeroPadConv2d(nn.Conv2d):
    """``ZeroPadding2D(pad)`` followed by a ``'valid'`` conv: Keras MobileNet's strided depthwise convs.

    ``pad`` is (left, right, top, bottom), as ``F.pad`` takes it: Keras's ``((0, 1), (0, 1))`` is (0, 1, 0, 1).
    Input ``[B, C, H, W]`` -> ``[B, out, (H + 1 - k) // s + 1, (W + 1 - k) // s + 1]`` for the default pad.
    """

    def __init__(self, *args, pad: Tuple[int, int, int, int] = (0, 1, 0, 1), **kwargs):
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, self.pad), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pad={self.pad}"


class KerasMobileNet(EfficientNet):
    """timm's MobileNet-V1 with Keras's fixed bottom / right zero padding before its strided depthwise convs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.blocks.modules():
            if isinstance(block, DepthwiseSeparableConv) and block.conv_dw.stride != (1, 1):
                dw = block.conv_dw
                block.conv_dw = ZeroPadConv2d(dw.in_channels, dw.out_channels, dw.kernel_size, stride=dw.stride,
                                              groups=dw.groups, bias=dw.bias is not None,
                                              device=dw.weight.device, dtype=dw.weight.dtype)


def keras_width(channels: int, alpha: float) -> int:
    """Keras MobileNet's layer width: ``int(filters * alpha)``."""
    return int(channels * alpha)


def _bn_args(kwargs: dict) -> dict:
    """Keras's BatchNorm eps and momentum, unless ``bn_eps`` / ``bn_momentum`` (timm's arguments) say otherwise:
    Keras's momentum suits long ImageNet runs; training from scratch for a few hundred steps needs a faster one."""
    return {"eps": KERAS_BN_EPS, "momentum": KERAS_BN_MOMENTUM, **resolve_bn_args(kwargs)}


def _create(variant: str, alpha: float, pretrained: bool = False, **kwargs) -> KerasMobileNet:
    model_kwargs = dict(
        block_args=decode_arch_def(ARCH_DEF), num_features=0, stem_size=32,
        round_chs_fn=partial(keras_width, alpha=alpha), pad_type="same", act_layer=nn.ReLU6,
        norm_layer=partial(nn.BatchNorm2d, **_bn_args(kwargs)),
    )
    model_kwargs.update(kwargs)
    return build_model_with_cfg(KerasMobileNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True),
                                **model_kwargs)


def _timm_blocks() -> List[str]:
    """timm prefixes of Keras blocks 1..13, in order."""
    return [f"blocks.{stage}.{i}" for stage, depth in enumerate(STAGE_DEPTHS) for i in range(depth)]


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras MobileNet layers -> timm ``KerasMobileNet`` state dict."""
    b = StateDictBuilder(layers, "MobileNet")
    b.conv("conv1", "conv_stem")
    b.bn("conv1_bn", "bn1")
    for k, prefix in enumerate(_timm_blocks(), start=1):
        b.depthwise(f"conv_dw_{k}", f"{prefix}.conv_dw")
        b.bn(f"conv_dw_{k}_bn", f"{prefix}.bn1")
        b.conv(f"conv_pw_{k}", f"{prefix}.conv_pw")
        b.bn(f"conv_pw_{k}_bn", f"{prefix}.bn2")
    if include_top:
        b.conv_1x1_as_dense("conv_preds", "classifier")
    return b.finish()


def files(alpha_text: str, size: int) -> KerasFiles:
    """The official files of one alpha (``"1_0"``, ``"7_5"``, ``"5_0"``, ``"2_5"``) and size (no hash published)."""
    stem = f"mobilenet/mobilenet_{alpha_text}_{size}_tf"
    return KerasFiles(WeightFile(f"{stem}.h5", None), WeightFile(f"{stem}_no_top.h5", None))


def _sizes(alpha_text: str, top1: Optional[dict] = None, parity: Tuple[int, ...] = ()) -> List[SizeVariant]:
    return [SizeVariant(size, files(alpha_text, size), (top1 or {}).get(size), size in parity)
            for size in SIZES if size != 224]


_KERAS = dict(size=224, mode="tf", mapping=to_timm, first_conv="conv_stem", classifier="classifier",
              application="MobileNet")


@register_model
@keras_application("MobileNet", top1=70.424, top5=89.504, files=files("1_0", 224), keras_kwargs=dict(alpha=1.0),
                   sizes=_sizes("1_0", {192: 69.1, 160: 67.2, 128: 64.4}), **_KERAS)
def keras_mobilenet_100(pretrained: bool = False, **kwargs) -> KerasMobileNet:
    """Keras ``MobileNet(alpha=1.0)``."""
    return _create("keras_mobilenet_100", 1.0, pretrained, **kwargs)


@register_model
@keras_application("MobileNet_075", top1=68.412, top5=88.242, files=files("7_5", 224), keras_kwargs=dict(alpha=0.75),
                   sizes=_sizes("7_5", parity=(128,)), **_KERAS)
def keras_mobilenet_075(pretrained: bool = False, **kwargs) -> KerasMobileNet:
    """Keras ``MobileNet(alpha=0.75)``."""
    return _create("keras_mobilenet_075", 0.75, pretrained, **kwargs)


@register_model
@keras_application("MobileNet_050", top1=64.292, top5=85.624, files=files("5_0", 224), keras_kwargs=dict(alpha=0.5),
                   sizes=_sizes("5_0"), **_KERAS)
def keras_mobilenet_050(pretrained: bool = False, **kwargs) -> KerasMobileNet:
    """Keras ``MobileNet(alpha=0.5)``."""
    return _create("keras_mobilenet_050", 0.5, pretrained, **kwargs)


@register_model
@keras_application("MobileNet_025", top1=51.582, top5=75.792, files=files("2_5", 224), keras_kwargs=dict(alpha=0.25),
                   sizes=_sizes("2_5"), parity=True, **_KERAS)
def keras_mobilenet_025(pretrained: bool = False, **kwargs) -> KerasMobileNet:
    """Keras ``MobileNet(alpha=0.25)``."""
    return _create("keras_mobilenet_025", 0.25, pretrained, **kwargs)
