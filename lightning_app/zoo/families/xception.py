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

Mapping (timm's legacy Xception layout): Keras block k (2..13) is timm ``block{k-1}``. Inside a
timm ``Block`` the ``rep`` sequence is ``[ReLU,] SeparableConv2d, BatchNorm2d, ReLU, SeparableConv2d,
BatchNorm2d, ...[, pool]``, with the first ReLU absent in block1 (Keras block2 starts right after
the stem's ReLU). The residual 1x1 convs are the unnamed ``conv2d``, ``conv2d_1``, ... and
``batch_normalization``, ... layers; they are paired with the strided blocks in creation order
(Keras blocks 2, 3, 4, 13).
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import create_pool2d
from timm.models import build_model_with_cfg, register_model
from timm.models.xception import Xception

from converters.builder import StateDictBuilder, auto_named
from converters.errors import LayerMismatchError
from converters.spec import KerasLayers
from lightning_app.zoo.registry import keras_application, tf_kernels

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


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras Xception layers -> timm ``KerasXception`` state dict."""
    b = StateDictBuilder(layers, "Xception")
    b.conv("block1_conv1", "conv1")
    b.bn("block1_conv1_bn", "bn1")
    b.conv("block1_conv2", "conv2")
    b.bn("block1_conv2_bn", "bn2")

    residual_convs = auto_named(layers, "conv2d")
    residual_bns = auto_named(layers, "batch_normalization")
    strided_blocks = [k for k in range(2, 14) if f"block{k}_sepconv1" in layers and f"block{k}_sepconv3" not in layers]
    if not (len(residual_convs) == len(residual_bns) == len(strided_blocks)):
        raise LayerMismatchError(f"Xception: {len(residual_convs)} residual convs, {len(residual_bns)} residual BNs "
                                 f"for {len(strided_blocks)} strided blocks")
    residual = {k: (c, bn) for k, c, bn in zip(strided_blocks, residual_convs, residual_bns)}

    for k in range(2, 14):
        timm_block = f"block{k - 1}"
        offset = 0 if k == 2 else 1  # timm's block1 has no leading ReLU
        j = 1
        while f"block{k}_sepconv{j}" in layers:
            sep = offset + 3 * (j - 1)
            b.separable(f"block{k}_sepconv{j}", f"{timm_block}.rep.{sep}.conv1", f"{timm_block}.rep.{sep}.pointwise")
            b.bn(f"block{k}_sepconv{j}_bn", f"{timm_block}.rep.{sep + 1}")
            j += 1
        if k in residual:
            conv, bn = residual[k]
            b.conv(conv, f"{timm_block}.skip")
            b.bn(bn, f"{timm_block}.skipbn")

    b.separable("block14_sepconv1", "conv3.conv1", "conv3.pointwise")
    b.bn("block14_sepconv1_bn", "bn3")
    b.separable("block14_sepconv2", "conv4.conv1", "conv4.pointwise")
    b.bn("block14_sepconv2_bn", "bn4")
    if include_top:
        b.dense("predictions", "fc")
    return b.finish()


@register_model
@keras_application("Xception", size=299, mode="tf", top1=79.006, top5=94.452, mapping=to_timm,
                   files=tf_kernels("xception/xception",
                                    "0a58e3b7378bc2990ea3b43d5981f1f6", "b0042744bf5b25fce3cb969f33bebb97"),
                   first_conv="conv1", classifier="fc", cfg=dict(pool_size=(10, 10)))
def keras_xception(pretrained: bool = False, **kwargs) -> KerasXception:
    """Keras ``Xception``."""
    return build_model_with_cfg(KerasXception, "keras_xception", pretrained, feature_cfg=dict(feature_cls="hook"),
                                **kwargs)
