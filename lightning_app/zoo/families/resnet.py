"""Keras ResNet50/101/152 (v1): timm's ResNet with the stride moved to the block's first 1x1 conv.

Differences from timm's ``resnet50/101/152`` and how they are handled:

* Keras strides the FIRST 1x1 conv of a downsampling bottleneck (``*_1_conv``); timm strides
  the 3x3. :class:`KerasBottleneck` moves the stride (a strided 1x1 conv with no padding is
  the same subsampling Keras's ``valid`` 1x1 conv does).
* Every Keras conv has a bias and is followed by a BatchNorm; the converter folds the bias
  into that BN's moving mean, so the timm convs stay bias-free.
* BatchNorm eps 1.001e-5 (Keras) and momentum 0.01 (= 1 - Keras's 0.99).

The stem (zero-pad 3 + 7x7/2 valid conv, BN, ReLU, zero-pad 1 + 3x3/2 max pool) is timm's: the
pool follows a ReLU, so Keras's zero padding and PyTorch's -inf padding give the same maximum.

Mapping (timm's ResNet layout): Keras ``conv{s}_block{b}_{k}_conv`` / ``_{k}_bn`` -> ``layer{s-1}.{b-1}.conv{k}`` / ``bn{k}``;
the projection shortcut ``_0_conv`` / ``_0_bn`` -> ``downsample.0`` / ``downsample.1``.
Every Keras conv has a bias; it folds into the BatchNorm that follows it.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import Bottleneck, ResNet

from converters.builder import StateDictBuilder, block_count
from converters.spec import KerasLayers
from lightning_app.zoo.registry import keras_application, tf_kernels

KERAS_BN_EPS = 1.001e-5
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)


class KerasBottleneck(Bottleneck):
    """timm's Bottleneck with the stride on ``conv1`` (1x1), as in Keras ``residual_block_v1``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *args, device=None, dtype=None, **kwargs):
        if kwargs.get("aa_layer") is not None:
            raise ValueError("KerasBottleneck does not support anti-aliasing (aa_layer)")
        super().__init__(inplanes, planes, 1, *args, device=device, dtype=dtype, **kwargs)
        if stride != 1:
            self.conv1 = nn.Conv2d(inplanes, self.conv1.out_channels, kernel_size=1, stride=stride, bias=False,
                                   device=device, dtype=dtype)
        self.stride = stride


def _create(variant: str, layers, pretrained: bool = False, **kwargs) -> ResNet:
    kwargs.setdefault("norm_layer", partial(nn.BatchNorm2d, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM))
    return build_model_with_cfg(ResNet, variant, pretrained, block=KerasBottleneck, layers=layers, **kwargs)


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras ResNet (v1) layers -> timm ``ResNet`` state dict (conv biases folded into the BatchNorms)."""
    b = StateDictBuilder(layers, "ResNet")
    b.conv_bias_into_bn("conv1_conv", "conv1", "conv1_bn", "bn1")
    for stage in (2, 3, 4, 5):
        for i in range(1, block_count(layers, stage) + 1):
            keras, timm = f"conv{stage}_block{i}", f"layer{stage - 1}.{i - 1}"
            if f"{keras}_0_conv" in layers:
                b.conv_bias_into_bn(f"{keras}_0_conv", f"{timm}.downsample.0", f"{keras}_0_bn", f"{timm}.downsample.1")
            for k in (1, 2, 3):
                b.conv_bias_into_bn(f"{keras}_{k}_conv", f"{timm}.conv{k}", f"{keras}_{k}_bn", f"{timm}.bn{k}")
    if include_top:
        b.dense("predictions", "fc")
    return b.finish()


_KERAS = dict(mode="caffe", mapping=to_timm, first_conv="conv1", classifier="fc")


@register_model
@keras_application("ResNet50", size=224, top1=74.928, top5=92.060, **_KERAS,
                   files=tf_kernels("resnet/resnet50", "2cb95161c43110f7111970584f804107",
                                    "4d473c1dd8becc155b73f8504c6f6626"))
def keras_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """Keras ``ResNet50``."""
    return _create("keras_resnet50", (3, 4, 6, 3), pretrained, **kwargs)


#: ResNet101 / ResNet152: float32 parity in CI (float64 on demand: ``python -m converters verify --float64``).
#: Before the harness scaled residual branches (``converters.parity.RESIDUAL_BRANCH_SCALE``), float32 itself was
#: farther than 1e-4 from the exact result at the notop output (Keras float32 vs float64 1.36e-4 / 3.17e-4,
#: growing smoothly block by block; both in float64 agreed to 3.2e-13 / 6.0e-13).


@register_model
@keras_application("ResNet101", size=224, top1=76.420, top5=92.786, **_KERAS,
                   files=tf_kernels("resnet/resnet101", "f1aeb4b969a6efcfb50fad2f0c20cfc5",
                                    "88cf7a10940856eca736dc7b7e228a21"))
def keras_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """Keras ``ResNet101``."""
    return _create("keras_resnet101", (3, 4, 23, 3), pretrained, **kwargs)


@register_model
@keras_application("ResNet152", size=224, top1=76.604, top5=93.118, **_KERAS,
                   files=tf_kernels("resnet/resnet152", "100835be76be38e30d865e96f2aaae62",
                                    "ee4c566cf9a93f14d82f913c2dc6dd0c"))
def keras_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """Keras ``ResNet152``."""
    return _create("keras_resnet152", (3, 8, 36, 3), pretrained, **kwargs)
