"""Keras VGG16 / VGG19 -> timm ``keras_vgg16`` / ``keras_vgg19`` (timm's VGG layout).

``blockB_convK`` -> ``features.i``, where ``i`` counts timm's ``Sequential``: each conv is followed by
a ReLU (2 modules) and each block ends with a max pool (1 module). With the top, ``fc1`` (a Dense on
Keras's channels-last Flatten of the 7x7x512 ``block5_pool``) becomes timm's 7x7 conv
``pre_logits.fc1`` (reshaped in channels-last order: a naive NCHW reshape scrambles it), ``fc2`` the
1x1 conv ``pre_logits.fc2`` and ``predictions`` the Linear ``head.fc``. The notop files have no
fc1/fc2, and neither has the notop model.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from converters import layouts
from converters.align import KerasLayers
from converters.errors import LayerMismatchError
from converters.mappings.common import StateDictBuilder


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    b = StateDictBuilder(layers, "VGG")
    convs = [(int(m.group(1)), n) for n in layers if (m := re.fullmatch(r"block(\d+)_conv\d+", n))]
    index, block = 0, convs[0][0] if convs else 1
    channels = None
    for conv_block, name in convs:
        if conv_block != block:
            index += 1  # the previous block's max pool
            block = conv_block
        b.conv(name, f"features.{index}")
        channels = layers[name]["kernel"].shape[-1]
        index += 2  # conv + ReLU
    if include_top:
        fc1 = b.take("fc1")
        size = int(round((fc1["kernel"].shape[0] / channels) ** 0.5))
        if size * size * channels != fc1["kernel"].shape[0]:
            raise LayerMismatchError(f"VGG: fc1 kernel {fc1['kernel'].shape} is not a flattened square map "
                                     f"of {channels} channels")
        b.raw("pre_logits.fc1.weight", layouts.flatten_dense_to_conv(fc1["kernel"], size, size, channels))
        b.raw("pre_logits.fc1.bias", _tensor(fc1["bias"]))
        fc2 = b.take("fc2")
        b.raw("pre_logits.fc2.weight", layouts.dense(fc2["kernel"])[:, :, None, None].contiguous())
        b.raw("pre_logits.fc2.bias", _tensor(fc2["bias"]))
        b.dense("predictions", "head.fc")
    return b.finish()
