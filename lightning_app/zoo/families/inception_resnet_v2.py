"""Keras InceptionResNetV2: timm's InceptionResnetV2 given Keras's BatchNorm.

timm's ``inception_resnet_v2`` is the same network as Keras's (same TF-slim origin): the
``mixed_5b`` average pool already excludes padding (``count_include_pad=False``), the
residual scales (0.17, 0.1, 0.2, final block8 1.0 without ReLU) and the biased "up"
convs (Keras ``block*_conv``, timm ``*.conv2d``) agree. Only the BatchNorm needs Keras's
settings: ``scale=False`` (the converter sets gamma = 1), eps 1e-3, momentum 0.99 (PyTorch 0.01).

Mapping: Keras names only the residual "up" convs (``block35_i_conv``, ``block17_i_conv``,
``block8_i_conv``: 1x1 with bias, no BatchNorm) and the last conv (``conv_7b`` + ``conv_7b_bn``).
All other conv / BatchNorm layers are auto-named ``conv2d_N`` / ``batch_normalization_N`` in
creation order, which is timm's module registration order of its ``ConvNormAct`` blocks (named
layers do not advance the auto-name counters).
"""
from __future__ import annotations

from functools import partial
from typing import List

from timm.layers import BatchNormAct2d
from timm.models import build_model_with_cfg, register_model
from timm.models.inception_resnet_v2 import InceptionResnetV2

from converters.builder import StateDictBuilder, pair_auto_named
from converters.spec import KerasLayers
from lightning_app.zoo.registry import keras_application, tf_kernels

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)

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
    """Keras InceptionResNetV2 layers -> timm ``InceptionResnetV2`` state dict."""
    b = StateDictBuilder(layers, "InceptionResNetV2")
    pair_auto_named(b, timm_conv_blocks())  # scale=False BatchNorms: gamma = 1
    for timm_block, keras_block in _RESIDUAL:
        b.conv(f"{keras_block}_conv", f"{timm_block}.conv2d")  # 1x1 "up" conv with bias, no BN
    b.conv("conv_7b", "conv2d_7b.conv")
    b.bn("conv_7b_bn", "conv2d_7b.bn")
    if include_top:
        b.dense("predictions", "classif")
    return b.finish()


@register_model
@keras_application("InceptionResNetV2", size=299, mode="tf", top1=80.256, top5=95.252,
                   mapping=to_timm,
                   files=tf_kernels("inception_resnet_v2/inception_resnet_v2",
                                    "e693bd0210a403b3192acc6073ad2e96", "d19885ff4a710c122648d3b5c3b684e4"),
                   first_conv="conv2d_1a.conv", classifier="classif", cfg=dict(pool_size=(8, 8)))
def keras_inception_resnet_v2(pretrained: bool = False, **kwargs) -> InceptionResnetV2:
    """Keras ``InceptionResNetV2``."""
    kwargs.setdefault("norm_eps", KERAS_BN_EPS)
    kwargs.setdefault("norm_layer", partial(BatchNormAct2d, momentum=KERAS_BN_MOMENTUM))
    return build_model_with_cfg(InceptionResnetV2, "keras_inception_resnet_v2", pretrained, **kwargs)
