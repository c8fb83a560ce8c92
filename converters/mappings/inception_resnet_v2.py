"""Keras InceptionResNetV2 -> timm ``keras_inception_resnet_v2`` (timm's InceptionResnetV2 layout).

Keras names only the residual "up" convs (``block35_i_conv``, ``block17_i_conv``,
``block8_i_conv``: 1x1 with bias, no BatchNorm) and the last conv (``conv_7b`` +
``conv_7b_bn``). All other conv / BatchNorm layers are auto-named ``conv2d_N`` /
``batch_normalization_N`` in creation order, which is timm's module registration order
of its ``ConvNormAct`` blocks (named layers do not advance the auto-name counters).
"""
from __future__ import annotations

from typing import List

from converters.align import KerasLayers
from converters.mappings.common import StateDictBuilder
from converters.mappings.inception_v3 import pair_auto_named

_BLOCK35 = ["branch0", "branch1.0", "branch1.1", "branch2.0", "branch2.1", "branch2.2"]
_BLOCK17 = ["branch0", "branch1.0", "branch1.1", "branch1.2"]
_BLOCK8 = _BLOCK17
#: (timm prefix of the residual block, Keras block name), in network order
_RESIDUAL = ([(f"repeat.{i}", f"block35_{i + 1}") for i in range(10)]
             + [(f"repeat_1.{i}", f"block17_{i + 1}") for i in range(20)]
             + [(f"repeat_2.{i}", f"block8_{i + 1}") for i in range(9)]
             + [("block8", "block8_10")])


def _branches(timm_block: str) -> List[str]:
    kind = timm_block.split(".")[0]
    return {"repeat": _BLOCK35, "repeat_1": _BLOCK17, "repeat_2": _BLOCK8, "block8": _BLOCK8}[kind]


def timm_conv_blocks() -> List[str]:
    """timm ``ConvNormAct`` prefixes of InceptionResnetV2 in module registration order (``conv2d_7b`` excluded)."""
    prefixes = ["conv2d_1a", "conv2d_2a", "conv2d_2b", "conv2d_3b", "conv2d_4a"]
    prefixes += [f"mixed_5b.{b}" for b in ("branch0", "branch1.0", "branch1.1", "branch2.0", "branch2.1",
                                           "branch2.2", "branch3.1")]
    for timm_block, _ in _RESIDUAL[:10]:
        prefixes += [f"{timm_block}.{b}" for b in _branches(timm_block)]
    prefixes += [f"mixed_6a.{b}" for b in ("branch0", "branch1.0", "branch1.1", "branch1.2")]
    for timm_block, _ in _RESIDUAL[10:30]:
        prefixes += [f"{timm_block}.{b}" for b in _branches(timm_block)]
    prefixes += [f"mixed_7a.{b}" for b in ("branch0.0", "branch0.1", "branch1.0", "branch1.1", "branch2.0",
                                           "branch2.1", "branch2.2")]
    for timm_block, _ in _RESIDUAL[30:]:
        prefixes += [f"{timm_block}.{b}" for b in _branches(timm_block)]
    return prefixes


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    b = StateDictBuilder(layers, "InceptionResNetV2")
    pair_auto_named(b, timm_conv_blocks(), "InceptionResNetV2")
    for timm_block, keras_block in _RESIDUAL:
        b.conv(f"{keras_block}_conv", f"{timm_block}.conv2d")  # 1x1 "up" conv with bias, no BN
    b.conv("conv_7b", "conv2d_7b.conv")
    b.bn("conv_7b_bn", "conv2d_7b.bn")
    if include_top:
        b.dense("predictions", "classif")
    return b.finish()
