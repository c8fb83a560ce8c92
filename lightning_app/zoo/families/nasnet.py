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
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, create_classifier, to_2tuple
from timm.layers.padding import pad_same
from timm.models import build_model_with_cfg, register_model
from timm.models.nasnet import (CellStem0, CellStem1, FirstCell, NASNetALarge, NormalCell, ReductionCell0,
                                ReductionCell1)

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


def _keras_pools_and_norms(model: nn.Module) -> None:
    """Keras's zero-padded stride-2 max pools in the stem and reduction cells; Keras BatchNorm eps / momentum."""
    for cell_name in _REDUCTION_CELLS:
        cell = getattr(model, cell_name)
        for pool_name in _STRIDED_MAX_POOLS:
            pool = getattr(cell, pool_name)
            setattr(cell, pool_name, ZeroPadMaxPool2d(pool.kernel_size, pool.stride))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = KERAS_BN_EPS
            module.momentum = KERAS_BN_MOMENTUM


class KerasNASNetALarge(NASNetALarge):
    """timm ``NASNetALarge`` with Keras's zero-padded stride-2 max pools and BatchNorm momentum."""

    def __init__(self, **kwargs):
        kwargs.setdefault("pad_type", "same")
        super().__init__(**kwargs)
        _keras_pools_and_norms(self)


class KerasNASNetA(nn.Module):
    """Keras ``nasnet.NASNet`` with ``num_blocks`` normal cells per stage, built from timm's NASNet-A cells.

    timm's ``NASNetALarge`` hardcodes 6 cells per stage and Keras's ``skip_reduction=True`` (the
    cell after a reduction cell takes the input of the cell before it as its previous input);
    Keras NASNetMobile has 4 cells per stage and ``skip_reduction=False`` (that previous input
    is the reduction cell's own input). Same cells, same module names as ``NASNetALarge``
    (``conv0``, ``cell_stem_0/1``, ``cell_<i>``, ``reduction_cell_0/1``, ``last_linear``), so one
    weight mapping serves both. Channels: ``num_features // 24`` filters in the first stage,
    doubled per stage (Keras ``filter_multiplier=2``).

    Shapes: ``(N, in_chans, H, W)`` -> features ``(N, num_features, H/32, W/32)`` -> logits ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, stem_size: int = 32, num_blocks: int = 4,
                 num_features: int = 1056, skip_reduction: bool = False, drop_rate: float = 0.0,
                 global_pool: str = "avg", pad_type: str = "same", output_stride: int = 32, device=None, dtype=None):
        super().__init__()
        if output_stride != 32:
            raise ValueError(f"KerasNASNetA supports output_stride=32 only, got {output_stride}")
        dd = {"device": device, "dtype": dtype}
        self.num_classes, self.num_features, self.skip_reduction = num_classes, num_features, skip_reduction
        filters = num_features // 24
        self.conv0 = ConvNormAct(in_chans, stem_size, kernel_size=3, padding=0, stride=2, apply_act=False,
                                 norm_layer=partial(nn.BatchNorm2d, eps=KERAS_BN_EPS), **dd)
        self.cell_stem_0 = CellStem0(stem_size, num_channels=filters // 4, pad_type=pad_type, **dd)
        self.cell_stem_1 = CellStem1(stem_size, num_channels=filters // 2, pad_type=pad_type, **dd)
        self.feature_info = [dict(num_chs=stem_size, reduction=2, module="conv0"),
                             dict(num_chs=filters, reduction=4, module="cell_stem_1.conv_1x1.act")]
        self.cell_names = []  # after the stems, in forward order
        prev_chs, chs, index = filters, 2 * filters, 0  # outputs of cell_stem_0 and cell_stem_1
        for stage, reduction_cls in enumerate((ReductionCell0, ReductionCell1, None)):
            width = filters * 2 ** stage
            for block in range(num_blocks):
                cell = (FirstCell(prev_chs, width // 2, chs, width, pad_type=pad_type, **dd) if block == 0
                        else NormalCell(prev_chs, width, chs, width, pad_type=pad_type, **dd))
                self._add_cell(f"cell_{index}", cell)
                prev_chs, chs, index = chs, 6 * width, index + 1
            if reduction_cls is not None:
                self._add_cell(f"reduction_cell_{stage}",
                               reduction_cls(prev_chs, 2 * width, chs, 2 * width, pad_type=pad_type, **dd))
                self.feature_info.append(dict(num_chs=chs, reduction=8 * 2 ** stage,
                                              module=f"reduction_cell_{stage}.conv_1x1.act"))
                prev_chs, chs = (prev_chs if skip_reduction else chs), 8 * width
        self.act = nn.ReLU(inplace=True)
        self.feature_info.append(dict(num_chs=num_features, reduction=32, module="act"))
        self.global_pool, self.head_drop, self.last_linear = create_classifier(
            num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()
        _keras_pools_and_norms(self)

    def _add_cell(self, name: str, cell: nn.Module) -> None:
        self.add_module(name, cell)
        self.cell_names.append(name)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        blocks = [(r"^cell_(\d+)", None)]
        blocks += [(rf"^reduction_cell_{i}", ((i + 1) * (len(self.cell_names) - 2) // 3,)) for i in (0, 1)]
        return dict(stem=r"^conv0|cell_stem_[01]", blocks=blocks)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.last_linear

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        device = self.conv0.conv.weight.device
        dtype = self.conv0.conv.weight.dtype
        self.global_pool, self.last_linear = create_classifier(
            self.num_features, num_classes, pool_type=global_pool or self.global_pool.pool_type,
            device=device, dtype=dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_conv0 = self.conv0(x)
        x_prev = self.cell_stem_0(x_conv0)
        x = self.cell_stem_1(x_conv0, x_prev)
        for name in self.cell_names:
            cell = getattr(self, name)
            if isinstance(cell, (ReductionCell0, ReductionCell1)):
                x_prev, x = (x_prev if self.skip_reduction else x), cell(x, x_prev)
            else:
                x_prev, x = x, cell(x, x_prev)
        return self.act(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
@keras_application("NASNetLarge", size=331, mode="tf", top1=82.498, top5=96.004, mapping=to_timm,
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


@register_model
@keras_application("NASNetMobile", size=224, mode="tf", top1=74.366, top5=91.854, mapping=to_timm,
                   files=KerasFiles(WeightFile("nasnet/NASNet-mobile.h5", "020fb642bf7360b370c678b08e0adf61"),
                                    WeightFile("nasnet/NASNet-mobile-no-top.h5", "1ed92395b5b598bdda52abe5c0dbfd63")),
                   first_conv="conv0.conv", classifier="last_linear", cfg=dict(pool_size=(7, 7)))
def keras_nasnetamobile(pretrained: bool = False, **kwargs) -> KerasNASNetA:
    """Keras ``NASNetMobile`` (NASNet-A 4 @ 1056, ``skip_reduction=False``); no timm counterpart."""
    kwargs = dict(stem_size=32, num_blocks=4, num_features=1056, skip_reduction=False, **kwargs)
    return build_model_with_cfg(KerasNASNetA, "keras_nasnetamobile", pretrained,
                                feature_cfg=dict(feature_cls="hook", no_rewrite=True), **kwargs)
