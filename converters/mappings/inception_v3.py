"""Keras InceptionV3 -> timm ``keras_inception_v3`` (timm's InceptionV3 layout).

Keras names none of InceptionV3's conv / BatchNorm layers, so they are auto-named
``conv2d``, ``conv2d_1``, ... and ``batch_normalization``, ``batch_normalization_1``, ...
in creation order (the manifest's fresh-session names). Keras creates them in exactly the
order timm registers its ``ConvNormAct`` modules (stem, then per block: 1x1 branch, the
longer branches in order, pool branch), so the i-th Keras conv + BN is the i-th timm
``ConvNormAct``. Keras's ``model.layers`` (file) order differs; alignment by the manifest
already undid that, so this mapping works on names only.
"""
from __future__ import annotations

from typing import List

from converters.align import KerasLayers
from converters.errors import LayerMismatchError
from converters.mappings.common import StateDictBuilder, auto_named

_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
      "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
_D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
_BLOCKS = [("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A), ("Mixed_6a", _B), ("Mixed_6b", _C),
           ("Mixed_6c", _C), ("Mixed_6d", _C), ("Mixed_6e", _C), ("Mixed_7a", _D), ("Mixed_7b", _E),
           ("Mixed_7c", _E)]


def timm_conv_blocks() -> List[str]:
    """timm ``ConvNormAct`` prefixes of InceptionV3 in module registration order."""
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    return stem + [f"{block}.{branch}" for block, branches in _BLOCKS for branch in branches]


def pair_auto_named(b: StateDictBuilder, prefixes: List[str], model_name: str) -> None:
    """The i-th auto-named Keras ``conv2d`` / ``batch_normalization`` -> ``prefixes[i].conv`` / ``.bn``."""
    convs, bns = auto_named(b.layers, "conv2d"), auto_named(b.layers, "batch_normalization")
    if not len(convs) == len(bns) == len(prefixes):
        raise LayerMismatchError(f"{model_name}: {len(convs)} unnamed Keras convs and {len(bns)} BatchNorms, "
                                 f"timm has {len(prefixes)} conv blocks")
    for conv, bn, prefix in zip(convs, bns, prefixes):
        b.conv(conv, f"{prefix}.conv")
        b.bn(bn, f"{prefix}.bn")  # scale=False: gamma = 1


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    b = StateDictBuilder(layers, "InceptionV3")
    pair_auto_named(b, timm_conv_blocks(), "InceptionV3")
    if include_top:
        b.dense("predictions", "fc")
    return b.finish()
