"""Keras DenseNet121/169/201: timm's DenseNet is Keras's, given Keras's BatchNorm eps (1.001e-5).

Keras zero-pads before the stem max pool; the pool follows a ReLU, so zero padding and
timm's -inf padding give the same maximum.

Mapping: Keras ``conv{s}_block{i}_{0_bn,1_conv,1_bn,2_conv}`` -> timm
``features.denseblock{s-1}.denselayer{i}.{norm1,conv1,norm2,conv2}``; ``pool{s}_{bn,conv}`` ->
``features.transition{s-1}.{norm,conv}``; stem ``conv1_{conv,bn}`` -> ``features.{conv0,norm0}``;
final ``bn`` -> ``features.norm5``; ``predictions`` -> ``classifier``.
"""
from __future__ import annotations

import re
from functools import partial

from timm.layers import BatchNormAct2d
from timm.models import build_model_with_cfg, register_model
from timm.models.densenet import DenseNet

from converters.builder import StateDictBuilder, block_count
from converters.spec import KerasLayers
from lightning_app.zoo.registry import keras_application, tf_kernels

KERAS_BN_EPS = 1.001e-5
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)


def _create(variant: str, block_config, pretrained: bool = False, **kwargs) -> DenseNet:
    kwargs.setdefault("norm_layer", partial(BatchNormAct2d, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM))
    return build_model_with_cfg(
        DenseNet, variant, pretrained, growth_rate=32, block_config=block_config,
        feature_cfg=dict(flatten_sequential=True), **kwargs,
    )


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras DenseNet layers -> timm ``DenseNet`` state dict."""
    b = StateDictBuilder(layers, "DenseNet")
    b.conv("conv1_conv", "features.conv0")
    b.bn("conv1_bn", "features.norm0")
    blocks = sorted({int(m.group(1)) for n in layers if (m := re.match(r"conv(\d+)_block\d+_1_conv$", n))})
    for stage_index, stage in enumerate(blocks, start=1):
        for i in range(1, block_count(layers, stage) + 1):
            keras, timm = f"conv{stage}_block{i}", f"features.denseblock{stage_index}.denselayer{i}"
            b.bn(f"{keras}_0_bn", f"{timm}.norm1")
            b.conv(f"{keras}_1_conv", f"{timm}.conv1")
            b.bn(f"{keras}_1_bn", f"{timm}.norm2")
            b.conv(f"{keras}_2_conv", f"{timm}.conv2")
        if f"pool{stage}_bn" in layers:  # transition after every block but the last
            b.bn(f"pool{stage}_bn", f"features.transition{stage_index}.norm")
            b.conv(f"pool{stage}_conv", f"features.transition{stage_index}.conv")
    b.bn("bn", "features.norm5")
    if include_top:
        b.dense("predictions", "classifier")
    return b.finish()


_KERAS = dict(mode="torch", mapping=to_timm, first_conv="features.conv0", classifier="classifier")


@register_model
@keras_application("DenseNet121", size=224, top1=74.972, top5=92.258, **_KERAS,
                   files=tf_kernels("densenet/densenet121",
                                    "9d60b8095a5708f2dcce2bca79d332c7", "30ee3e1110167f948a6b9946edeeb738"))
def keras_densenet121(pretrained: bool = False, **kwargs) -> DenseNet:
    """Keras ``DenseNet121``."""
    return _create("keras_densenet121", (6, 12, 24, 16), pretrained, **kwargs)


@register_model
@keras_application("DenseNet169", size=224, top1=76.176, top5=93.176, **_KERAS,
                   files=tf_kernels("densenet/densenet169",
                                    "d699b8f76981ab1b30698df4c175e90b", "b8c4d4c20dd625c148057b9ff1c1176b"))
def keras_densenet169(pretrained: bool = False, **kwargs) -> DenseNet:
    """Keras ``DenseNet169``."""
    return _create("keras_densenet169", (6, 12, 32, 32), pretrained, **kwargs)


@register_model
@keras_application("DenseNet201", size=224, top1=77.320, top5=93.620, **_KERAS,
                   files=tf_kernels("densenet/densenet201",
                                    "1ceb130c1ea1b78c3bf6114dbdfd8807", "c13680b51ded0fb44dff2d8f86ac8bb1"))
def keras_densenet201(pretrained: bool = False, **kwargs) -> DenseNet:
    """Keras ``DenseNet201``."""
    return _create("keras_densenet201", (6, 12, 48, 32), pretrained, **kwargs)
