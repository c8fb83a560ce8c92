"""Keras Xception -> timm ``keras_xception`` (timm's legacy Xception layout).

Keras block k (2..13) is timm ``block{k-1}``. Inside a timm ``Block`` the ``rep`` sequence is
``[ReLU,] SeparableConv2d, BatchNorm2d, ReLU, SeparableConv2d, BatchNorm2d, ...[, pool]``, with the
first ReLU absent in block1 (Keras block2 starts right after the stem's ReLU). The residual 1x1 convs
are the unnamed ``conv2d``, ``conv2d_1``, ... and ``batch_normalization``, ... layers; they are
paired with the strided blocks in creation order (Keras blocks 2, 3, 4, 13).
"""
from __future__ import annotations


from converters.align import KerasLayers
from converters.errors import LayerMismatchError
from converters.mappings.common import StateDictBuilder, auto_named


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
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
