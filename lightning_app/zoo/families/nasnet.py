"""Keras NASNetLarge: timm's ``nasnetalarge`` (NASNet-A 6 @ 4032) with Keras's zero-padded max pools.

timm's NASNet-A cells are Keras's cells, module for module (TF "same" padding everywhere,
BatchNorm eps 1e-3, average pools excluding padding at stride 1 and counting the explicit
zero padding at stride 2, the two-path factorized reduction with its one-pixel shift).
One difference: in the stem and reduction cells Keras builds the stride-2 max pools as
``ZeroPadding2D(correct_pad)`` + ``MaxPooling2D(3, 2, "valid")``, so the padded zeros take
part in the maximum (the pooled tensor is a BatchNorm output and can be negative), whereas
timm's ``MaxPool2dSame`` pads with -inf. We swap those pools for :class:`ZeroPadMaxPool2d`.
``correct_pad`` is TF "same" padding for a 3x3 / stride-2 window at either parity.
BatchNorm momentum: PyTorch 0.0003 = 1 - Keras 0.9997.

Mapping to timm's NASNet-A cell layout. Keras cells, in order, and their timm modules::

    stem_conv1 / stem_bn1            conv0.conv / conv0.bn
    reduction cell  stem_1           cell_stem_0       (no previous input: p = ip)
    reduction cell  stem_2           cell_stem_1       (p factorized-reduced: path_1 / path_2)
    normal cells    0 .. 5           cell_0 .. cell_5  (first one factorized, others projected)
    reduction cell  reduce_6         reduction_cell_0
    normal cells    7 .. 12          cell_6 .. cell_11
    reduction cell  reduce_12        reduction_cell_1
    normal cells    13 .. 18         cell_12 .. cell_17
    predictions                      last_linear

Inside a cell, Keras's ``_adjust_block`` for the previous input ``p`` is either a factorized
reduction (``adjust_conv_1/2`` + ``adjust_bn`` -> ``path_1.conv``, ``path_2.conv``,
``final_path_bn``), a projection (``adjust_conv_projection`` + ``adjust_bn`` ->
``conv_prev_1x1``) or nothing; the 1x1 conv on the cell input is ``conv_1x1``; every
``_separable_conv_block`` (relu, sep conv, bn, relu, sep conv, bn) is a timm
``BranchSeparables``, named after its Keras position as in the tables below.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.layers.padding import pad_same
from timm.models import build_model_with_cfg, register_model
from timm.models.nasnet import NASNetALarge

from converters.builder import StateDictBuilder
from converters.spec import KerasLayers
from lightning_app.zoo.registry import KerasFiles, WeightFile, keras_application

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.0003  # PyTorch momentum = 1 - Keras momentum (0.9997)

#: cells whose stride-2 max pools Keras pads with zeros, and the attributes of those pools
_REDUCTION_CELLS = ("cell_stem_0", "cell_stem_1", "reduction_cell_0", "reduction_cell_1")
_STRIDED_MAX_POOLS = ("comb_iter_1_left", "comb_iter_4_right")


class ZeroPadMaxPool2d(nn.Module):
    """Max pooling over a TF-"same" ZERO-padded input (Keras ``ZeroPadding2D`` + ``MaxPooling2D(valid)``)."""

    def __init__(self, kernel_size: Union[int, Sequence[int]] = 3, stride: Union[int, Sequence[int]] = 2):
        super().__init__()
        self.kernel_size = to_2tuple(kernel_size)
        self.stride = to_2tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=0.0)
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=same(zeros)"


class KerasNASNetALarge(NASNetALarge):
    """timm ``NASNetALarge`` with Keras's zero-padded stride-2 max pools and BatchNorm momentum."""

    def __init__(self, **kwargs):
        kwargs.setdefault("pad_type", "same")
        super().__init__(**kwargs)
        for cell_name in _REDUCTION_CELLS:
            cell = getattr(self, cell_name)
            for pool_name in _STRIDED_MAX_POOLS:
                pool = getattr(cell, pool_name)
                setattr(cell, pool_name, ZeroPadMaxPool2d(pool.kernel_size, pool.stride))
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = KERAS_BN_EPS
                module.momentum = KERAS_BN_MOMENTUM


#: Keras separable-block name (``separable_conv_1_<name>_<block>``) -> timm branch, per cell type
NORMAL_BRANCHES = {
    "normal_left1": "comb_iter_0_left",  # 5x5 sep on h (conv_1x1 output)
    "normal_right1": "comb_iter_0_right",  # 3x3 sep on p
    "normal_left2": "comb_iter_1_left",  # 5x5 sep on p
    "normal_right2": "comb_iter_1_right",  # 3x3 sep on p
    "normal_left5": "comb_iter_4_left",  # 3x3 sep on h
}
REDUCTION_BRANCHES = {
    "reduction_left1": "comb_iter_0_left",  # 5x5 stride-2 sep on h
    "reduction_right1": "comb_iter_0_right",  # 7x7 stride-2 sep on p
    "reduction_right2": "comb_iter_1_right",  # 7x7 stride-2 sep on p
    "reduction_right3": "comb_iter_2_right",  # 5x5 stride-2 sep on p
    "reduction_left4": "comb_iter_4_left",  # 3x3 sep on block 1's sum (Keras reuses the pool's name)
}


def _separable_block(b: StateDictBuilder, keras: str, timm: str) -> None:
    """Keras ``_separable_conv_block`` -> timm ``BranchSeparables``."""
    for i in (1, 2):
        b.separable(f"separable_conv_{i}_{keras}", f"{timm}.separable_{i}.depthwise_conv2d",
                    f"{timm}.separable_{i}.pointwise_conv2d")
        b.bn(f"separable_conv_{i}_bn_{keras}", f"{timm}.bn_sep_{i}")


def _adjust_block(b: StateDictBuilder, layers: KerasLayers, block: str, timm: str) -> None:
    """Keras ``_adjust_block`` on the previous input ``p``: factorized reduction, projection or nothing."""
    if f"adjust_conv_1_{block}" in layers:
        b.conv(f"adjust_conv_1_{block}", f"{timm}.path_1.conv")
        b.conv(f"adjust_conv_2_{block}", f"{timm}.path_2.conv")
        b.bn(f"adjust_bn_{block}", f"{timm}.final_path_bn")
    elif f"adjust_conv_projection_{block}" in layers:
        b.conv(f"adjust_conv_projection_{block}", f"{timm}.conv_prev_1x1.conv")
        b.bn(f"adjust_bn_{block}", f"{timm}.conv_prev_1x1.bn")


def _cell(b: StateDictBuilder, layers: KerasLayers, kind: str, block: str, timm: str) -> None:
    """One Keras ``_normal_a_cell`` / ``_reduction_a_cell`` -> one timm cell."""
    _adjust_block(b, layers, block, timm)
    b.conv(f"{kind}_conv_1_{block}", f"{timm}.conv_1x1.conv")
    b.bn(f"{kind}_bn_1_{block}", f"{timm}.conv_1x1.bn")
    branches = NORMAL_BRANCHES if kind == "normal" else REDUCTION_BRANCHES
    for keras_branch, timm_branch in branches.items():
        _separable_block(b, f"{keras_branch}_{block}", f"{timm}.{timm_branch}")


def keras_cells(layers: KerasLayers) -> list[tuple[str, str, str]]:
    """``(kind, Keras block id, timm module)`` for every cell, in network order."""
    reductions, normals = [], []
    for name in layers:
        if m := re.fullmatch(r"reduction_conv_1_(stem_\d+|reduce_(\d+))", name):
            # stems come first; reduce_N follows normal cell N (if any) and precedes N + 1
            reductions.append((-1 if m.group(2) is None else int(m.group(2)) + 0.5, m.group(1)))
        elif m := re.fullmatch(r"normal_conv_1_(\d+)", name):
            normals.append(int(m.group(1)))
    cells = sorted([(pos, "reduction", block) for pos, block in reductions]
                   + [(n, "normal", str(n)) for n in normals])
    out, stems, reduce_index, normal_index = [], 0, 0, 0
    for _, kind, block in cells:
        if block.startswith("stem_"):
            timm, stems = f"cell_stem_{stems}", stems + 1
        elif kind == "reduction":
            timm, reduce_index = f"reduction_cell_{reduce_index}", reduce_index + 1
        else:
            timm, normal_index = f"cell_{normal_index}", normal_index + 1
        out.append((kind, block, timm))
    return out


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras NASNet layers -> timm NASNet-A state dict."""
    b = StateDictBuilder(layers, "NASNet")
    b.conv("stem_conv1", "conv0.conv")
    b.bn("stem_bn1", "conv0.bn")
    for kind, block, timm in keras_cells(layers):
        _cell(b, layers, kind, block, timm)
    if include_top:
        b.dense("predictions", "last_linear")
    return b.finish()


@register_model
@keras_application("NASNetLarge", size=331, mode="tf", top1=82.5, mapping=to_timm,
                   files=KerasFiles(WeightFile("nasnet/NASNet-large.h5", "11577c9a518f0070763c2b964a382f17"),
                                    WeightFile("nasnet/NASNet-large-no-top.h5", "d81d89dc07e6e56530c4e77faddd61b5")),
                   first_conv="conv0.conv", classifier="last_linear", cfg=dict(pool_size=(11, 11)))
def keras_nasnetalarge(pretrained: bool = False, **kwargs) -> KerasNASNetALarge:
    """Keras ``NASNetLarge``."""
    return build_model_with_cfg(
        KerasNASNetALarge, "keras_nasnetalarge", pretrained,
        feature_cfg=dict(feature_cls="hook", no_rewrite=True),  # cells take two inputs: hook features
        **kwargs,
    )
