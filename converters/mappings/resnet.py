"""Keras ResNet50/101/152 (v1) -> timm ``keras_resnet*`` (timm's ResNet layout).

Keras ``conv{s}_block{b}_{k}_conv`` / ``_{k}_bn`` -> ``layer{s-1}.{b-1}.conv{k}`` / ``bn{k}``;
the projection shortcut ``_0_conv`` / ``_0_bn`` -> ``downsample.0`` / ``downsample.1``.
Every Keras conv has a bias; it folds into the BatchNorm that follows it.
"""
from __future__ import annotations


from converters.align import KerasLayers
from converters.mappings.common import StateDictBuilder, block_count


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
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
