"""Keras DenseNet121/169/201 -> timm ``keras_densenet*`` (timm's DenseNet layout)."""
from __future__ import annotations

import re

from converters.align import KerasLayers
from converters.mappings.common import StateDictBuilder, block_count


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
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
