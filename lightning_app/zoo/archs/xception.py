"""Keras Xception: timm's ``legacy_xception`` (ported from Keras), given Keras's pooling and BatchNorm.

Checked layer by layer against ``keras/src/applications/xception.py``:

* Stem convs (``block1_conv1`` 3x3/2, ``block1_conv2`` 3x3) are ``valid`` and bias-free: timm's
  ``conv1`` / ``conv2`` (padding 0, no bias) match.
* Every ``SeparableConv2D`` is 3x3 stride 1 ``same`` and bias-free: timm's depthwise + pointwise
  with padding 1, no bias, match.
* The residual ``Conv2D(1x1, stride 2, 'same')`` never pads (a 1x1 kernel needs no padding), so
  timm's padding-0 ``skip`` conv matches; Keras takes the residual from the block input before
  its first ReLU, as timm's ``Block`` does (``rep[0]`` is a non-inplace ReLU).
* The one real difference: Keras's ``MaxPooling2D(3, 2, padding='same')`` pads TF-style, i.e. only
  at the bottom / right when the map is even (74x74 before ``block3_pool`` at 299), while timm's
  ``MaxPool2d(3, 2, padding=1)`` pads both sides, shifting every window by one pixel. We use timm's
  TF-"same" max pool (``MaxPool2dSame``, -inf padding: TF max pooling ignores padded cells).
* BatchNorm: Keras eps 1e-3 (timm uses PyTorch's 1e-5) and momentum 0.99 (PyTorch 0.01).
* Top: ``GlobalAveragePooling2D`` + ``Dense`` (``predictions``) = timm's ``global_pool`` + ``fc``;
  ``num_classes=0`` gives Keras's ``include_top=False, pooling='avg'`` features (2048).
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import create_pool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.xception import Xception

from lightning_app.zoo.archs._cfg import keras_cfg

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)


class KerasXception(Xception):
    """timm's legacy Xception with Keras's TF-"same" max pooling and BatchNorm eps / momentum."""

    def __init__(self, *args, bn_eps: float = KERAS_BN_EPS, bn_momentum: float = KERAS_BN_MOMENTUM, **kwargs):
        super().__init__(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = bn_eps
                module.momentum = bn_momentum
        for i in range(1, 13):
            rep = getattr(self, f"block{i}").rep
            for j, layer in enumerate(rep):
                if type(layer) is nn.MaxPool2d:  # Block's strided MaxPool2d(3, stride, padding=1)
                    rep[j] = create_pool2d("max", layer.kernel_size, stride=layer.stride, padding="same")


def _create(variant: str, pretrained: bool = False, **kwargs) -> KerasXception:
    return build_model_with_cfg(KerasXception, variant, pretrained, feature_cfg=dict(feature_cls="hook"), **kwargs)


default_cfgs = generate_default_cfgs({
    "keras_xception.keras_in1k": keras_cfg("Xception", classifier="fc", pool_size=(10, 10)),
})


@register_model
def keras_xception(pretrained: bool = False, **kwargs) -> KerasXception:
    """Keras ``Xception``."""
    return _create("keras_xception", pretrained, **kwargs)
