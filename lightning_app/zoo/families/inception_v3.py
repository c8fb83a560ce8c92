"""Keras InceptionV3: timm's InceptionV3 with Keras's branch average pooling and BatchNorm.
Differences from timm's ``inception_v3`` (everything else, including the layer order, is the same):
* The 3x3 stride-1 "same" average pools of the A, C and E blocks (``mixed0-2``, ``mixed4-7``,
  ``mixed9-10``) exclude the zero padding from the average in Keras (TensorFlow semantics);
  timm counts it (``F.avg_pool2d`` default ``count_include_pad=True``), which changes every
  border pixel of the pool branch (0.22 relative logit error, the top class changes).
* Keras BatchNorm: ``scale=False`` (the converter sets gamma = 1), eps 1e-3, momentum 0.99
  (PyTorch momentum 0.01).
* No auxiliary classifier (Keras has none).
Mapping: Keras names none of InceptionV3's conv / BatchNorm layers, so they are auto-named
``conv2d``, ``conv2d_1``, ... and ``batch_normalization``, ``batch_normalization_1``, ... in
creation order (the manifest's fresh-session names). Keras creates them in exactly the order timm
registers its ``ConvNormAct`` modules (stem, then per block: 1x1 branch, the longer branches in
order, pool branch), so the i-th Keras conv + BN is the i-th timm ``ConvNormAct``. Keras's
``model.layers`` (file) order differs; alignment by the manifest already undid that.
"""
from __future__ import annotations

from functools import partial
from typing import List

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models import build_model_with_cfg, register_model
from timm.models.inception_v3 import InceptionA, InceptionC, InceptionE, InceptionV3

from converters.builder import StateDictBuilder, pair_auto_named
from converters.spec import KerasLayers
from lightning_app.zoo.registry import keras_application, tf_kernels

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)


def _keras_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Keras ``AveragePooling2D((3, 3), strides=(1, 1), padding="same")``: padding not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class KerasInceptionA(InceptionA):
    """timm's InceptionA (Keras ``mixed0-2``) with the Keras branch average pool."""

    def _forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_keras_avg_pool(x))
        return [branch1x1, branch5x5, branch3x3dbl, branch_pool]


class KerasInceptionC(InceptionC):
    """timm's InceptionC (Keras ``mixed4-7``) with the Keras branch average pool."""

    def _forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
        branch_pool = self.branch_pool(_keras_avg_pool(x))
        return [branch1x1, branch7x7, branch7x7dbl, branch_pool]


class KerasInceptionE(InceptionE):
    """timm's InceptionE (Keras ``mixed9-10``) with the Keras branch average pool."""

    def _forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = self.branch_pool(_keras_avg_pool(x))
        return [branch1x1, branch3x3, branch3x3dbl, branch_pool]


_KERAS_BLOCKS = {InceptionA: KerasInceptionA, InceptionC: KerasInceptionC, InceptionE: KerasInceptionE}


class KerasInceptionV3(InceptionV3):
    """timm's InceptionV3 with the Keras pooling blocks, Keras BatchNorm and no auxiliary head."""

    def __init__(self, *args, aux_logits: bool = False, **kwargs):
        if aux_logits:
            raise ValueError("Keras InceptionV3 has no auxiliary classifier (aux_logits=False)")
        kwargs.setdefault("norm_eps", KERAS_BN_EPS)
        kwargs.setdefault("norm_layer", partial(BatchNormAct2d, momentum=KERAS_BN_MOMENTUM))
        super().__init__(*args, aux_logits=False, **kwargs)
        # The Keras blocks add no parameters, only a different pooling in ``_forward``: re-type the
        # blocks timm built (and initialised) in place rather than building them a second time.
        for module in self.modules():
            keras_block = _KERAS_BLOCKS.get(type(module))
            if keras_block is not None:
                module.__class__ = keras_block


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


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras InceptionV3 layers -> timm ``KerasInceptionV3`` state dict."""
    b = StateDictBuilder(layers, "InceptionV3")
    pair_auto_named(b, timm_conv_blocks())  # scale=False BatchNorms: gamma = 1
    if include_top:
        b.dense("predictions", "fc")
    return b.finish()


@register_model
@keras_application("InceptionV3", size=299, mode="tf", top1=77.898, top5=93.720,
                   mapping=to_timm,
                   files=tf_kernels("inception_v3/inception_v3",
                                    "9a0d58056eeedaa3f26cb7ebd46da564", "bcbd6486424b2319ff4ef7d526e38f63"),
                   first_conv="Conv2d_1a_3x3.conv", classifier="fc", cfg=dict(pool_size=(8, 8)),
                   parity_float64=True)
def keras_inception_v3(pretrained: bool = False, **kwargs) -> KerasInceptionV3:
    """Keras ``InceptionV3``."""
    return build_model_with_cfg(KerasInceptionV3, "keras_inception_v3", pretrained, **kwargs)
