"""Keras InceptionV3: timm's InceptionV3 with Keras's branch average pooling and BatchNorm.

Differences from timm's ``inception_v3`` (everything else, including the layer order, is the same):

* The 3x3 stride-1 "same" average pools of the A, C and E blocks (``mixed0-2``, ``mixed4-7``,
  ``mixed9-10``) exclude the zero padding from the average in Keras (TensorFlow semantics);
  timm counts it (``F.avg_pool2d`` default ``count_include_pad=True``), which changes every
  border pixel of the pool branch (0.22 relative logit error, the top class changes).
* Keras BatchNorm: ``scale=False`` (the converter sets gamma = 1), eps 1e-3, momentum 0.99
  (PyTorch momentum 0.01).
* No auxiliary classifier (Keras has none).
"""
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.inception_v3 import InceptionA, InceptionC, InceptionE, InceptionV3

from lightning_app.zoo.archs._cfg import keras_cfg

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


def _create(variant: str, pretrained: bool = False, **kwargs) -> KerasInceptionV3:
    return build_model_with_cfg(KerasInceptionV3, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "keras_inception_v3.keras_in1k": keras_cfg("InceptionV3", classifier="fc", pool_size=(8, 8)),
})


@register_model
def keras_inception_v3(pretrained: bool = False, **kwargs) -> KerasInceptionV3:
    """Keras ``InceptionV3``."""
    return _create("keras_inception_v3", pretrained, **kwargs)
