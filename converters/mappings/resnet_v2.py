"""Keras ResNet50V2/101V2/152V2 -> timm ``keras_resnet*v2`` (``KerasResNetV2`` layout).

Keras ``conv{s}_block{b}_*`` -> ``stages.{s-2}.blocks.{b-1}.*``: ``preact_bn`` -> ``norm1``,
``1_conv`` -> ``conv1``, ``1_bn`` -> ``norm2``, ``2_conv`` -> ``conv2``, ``2_bn`` -> ``norm3``,
``3_conv`` -> ``conv3`` (with bias), ``0_conv`` -> ``downsample.conv`` (with bias). The stem
``conv1_conv`` (with bias) -> ``stem.conv``, ``post_bn`` -> ``norm``, and the ``predictions``
Dense -> timm's 1x1 conv classifier ``head.fc``.
"""
from __future__ import annotations


import numpy as np
import torch

from converters import layouts
from converters.align import KerasLayers
from converters.mappings.common import StateDictBuilder, block_count


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    b = StateDictBuilder(layers, "ResNetV2")
    b.conv("conv1_conv", "stem.conv")
    for stage in (2, 3, 4, 5):
        for i in range(1, block_count(layers, stage) + 1):
            keras, timm = f"conv{stage}_block{i}", f"stages.{stage - 2}.blocks.{i - 1}"
            b.bn(f"{keras}_preact_bn", f"{timm}.norm1")
            if f"{keras}_0_conv" in layers:
                b.conv(f"{keras}_0_conv", f"{timm}.downsample.conv")
            b.conv(f"{keras}_1_conv", f"{timm}.conv1")
            b.bn(f"{keras}_1_bn", f"{timm}.norm2")
            b.conv(f"{keras}_2_conv", f"{timm}.conv2")
            b.bn(f"{keras}_2_bn", f"{timm}.norm3")
            b.conv(f"{keras}_3_conv", f"{timm}.conv3")
    b.bn("post_bn", "norm")
    if include_top:
        w = b.take("predictions")
        b.raw("head.fc.weight", layouts.dense(w["kernel"])[:, :, None, None].contiguous())
        b.raw("head.fc.bias", torch.from_numpy(np.ascontiguousarray(w["bias"], dtype=np.float32)))
    return b.finish()
