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
"""
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.layers.padding import pad_same
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.nasnet import NASNetALarge

from lightning_app.zoo.archs._cfg import keras_cfg

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


def _create(variant: str, pretrained: bool = False, **kwargs) -> KerasNASNetALarge:
    return build_model_with_cfg(
        KerasNASNetALarge, variant, pretrained,
        feature_cfg=dict(feature_cls="hook", no_rewrite=True),  # cells take two inputs: hook features
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "keras_nasnetalarge.keras_in1k": keras_cfg("NASNetLarge", pool_size=(11, 11), classifier="last_linear"),
})


@register_model
def keras_nasnetalarge(pretrained: bool = False, **kwargs) -> KerasNASNetALarge:
    """Keras ``NASNetLarge``."""
    return _create("keras_nasnetalarge", pretrained, **kwargs)
