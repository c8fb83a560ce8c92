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
"""
from functools import partial

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from lightning_app.zoo.archs._cfg import keras_cfg

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


def _cfg(keras_name: str) -> dict:
    # ResNet101/152 are not zoo rows (yet): same input size, preprocessing and first conv as ResNet50.
    return keras_cfg("ResNet50", classifier="fc", notes=(f"Keras {keras_name}, preprocessing mode 'caffe'",))


default_cfgs = generate_default_cfgs({
    "keras_resnet50.keras_in1k": _cfg("ResNet50"),
    "keras_resnet101.keras_in1k": _cfg("ResNet101"),
    "keras_resnet152.keras_in1k": _cfg("ResNet152"),
})


@register_model
def keras_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """Keras ``ResNet50``."""
    return _create("keras_resnet50", (3, 4, 6, 3), pretrained, **kwargs)


@register_model
def keras_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """Keras ``ResNet101``."""
    return _create("keras_resnet101", (3, 4, 23, 3), pretrained, **kwargs)


@register_model
def keras_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """Keras ``ResNet152``."""
    return _create("keras_resnet152", (3, 8, 36, 3), pretrained, **kwargs)
