"""Keras EfficientNetV2B0-B3, S, M, L: timm's ``EfficientNet`` built as timm's ``tf_efficientnetv2_*`` is.

Keras (``keras/src/applications/efficientnet_v2.py``) and timm build the same network; what makes
them equal here:

1. Padding: every Keras conv is ``'same'`` with TF semantics (extra pixel bottom / right when
   strided); timm's ``pad_type='same'`` is that rule.
2. BatchNorm: Keras eps 1e-3, momentum 0.9 (PyTorch 0.1).
3. Preprocessing is inside the Keras model (``include_preprocessing=True``): B0-B3
   ``Rescaling(1/255)`` -> ``Normalization(ImageNet mean, variance=std**2)`` (constants, no
   weights), torch mode; S / M / L ``Rescaling(1/128, offset=-1)``, i.e. ``x/128 - 1`` (mode
   ``tf128``, not ``x/127.5 - 1``). Our ``Normalize`` applies either.
4. Blocks: Keras's ``FusedMBConvBlock`` with expand ratio 1 is timm's ``ConvBnAct`` (conv, BN,
   swish, identity shortcut when shapes allow), with another expand ratio timm's
   ``EdgeResidual``; ``MBConvBlock`` is timm's ``InvertedResidual`` with squeeze-excite of width
   ``int(input_filters * 0.25)``. Channel rounding (no 10 % floor in Keras V2) is timm's for
   these models (the converter checks every shape).
5. Dropout 0.2 before the classifier and drop-connect (0.2 * block / blocks) act in training only;
   both are set as Keras sets them.

Mapping: ``stem_conv`` / ``stem_bn`` -> ``conv_stem`` / ``bn1``; ``block{s}{r}_`` -> ``blocks.{s-1}.{r}``:
``ConvBnAct`` ``project_conv`` / ``project_bn`` -> ``conv`` / ``bn1``; ``EdgeResidual`` ``expand_conv`` /
``expand_bn`` -> ``conv_exp`` / ``bn1``, ``project_conv`` / ``project_bn`` -> ``conv_pwl`` / ``bn2``;
``InvertedResidual`` ``expand_conv`` / ``expand_bn`` -> ``conv_pw`` / ``bn1``, ``dwconv2`` / ``bn`` ->
``conv_dw`` / ``bn2``, ``se_reduce`` / ``se_expand`` -> ``se.conv_reduce`` / ``se.conv_expand``,
``project_conv`` / ``project_bn`` -> ``conv_pwl`` / ``bn3``; ``top_conv`` / ``top_bn`` -> ``conv_head`` /
``bn2``; ``predictions`` -> ``classifier``.
"""
from __future__ import annotations

from typing import Callable, Dict

from timm.models import register_model
from timm.models.efficientnet import (EfficientNet, _gen_efficientnetv2_base, _gen_efficientnetv2_l,
                                      _gen_efficientnetv2_m, _gen_efficientnetv2_s)

from converters.builder import StateDictBuilder
from converters.spec import KerasLayers
from lightning_app.zoo.families.efficientnet import keras_blocks
from lightning_app.zoo.registry import KerasFiles, WeightFile, keras_application

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.1  # PyTorch momentum = 1 - Keras momentum (0.9)


def to_timm(layers: KerasLayers, include_top: bool) -> Dict:
    """Keras EfficientNetV2 layers -> timm ``EfficientNet`` state dict."""
    b = StateDictBuilder(layers, "EfficientNetV2")
    b.conv("stem_conv", "conv_stem")
    b.bn("stem_bn", "bn1")
    for k, t in keras_blocks(layers):
        if f"{k}dwconv2" in layers:  # MBConv: InvertedResidual
            b.conv(f"{k}expand_conv", f"{t}.conv_pw")
            b.bn(f"{k}expand_bn", f"{t}.bn1")
            b.depthwise(f"{k}dwconv2", f"{t}.conv_dw")
            b.bn(f"{k}bn", f"{t}.bn2")
            if f"{k}se_reduce" in layers:
                b.conv(f"{k}se_reduce", f"{t}.se.conv_reduce")
                b.conv(f"{k}se_expand", f"{t}.se.conv_expand")
            b.conv(f"{k}project_conv", f"{t}.conv_pwl")
            b.bn(f"{k}project_bn", f"{t}.bn3")
        elif f"{k}expand_conv" in layers:  # FusedMBConv: EdgeResidual
            b.conv(f"{k}expand_conv", f"{t}.conv_exp")
            b.bn(f"{k}expand_bn", f"{t}.bn1")
            b.conv(f"{k}project_conv", f"{t}.conv_pwl")
            b.bn(f"{k}project_bn", f"{t}.bn2")
        else:  # FusedMBConv with expand ratio 1: ConvBnAct
            b.conv(f"{k}project_conv", f"{t}.conv")
            b.bn(f"{k}project_bn", f"{t}.bn1")
    b.conv("top_conv", "conv_head")
    b.bn("top_bn", "bn2")
    if include_top:
        b.dense("predictions", "classifier")
    return b.finish()


def _files(name: str, top_hash: str, notop_hash: str) -> KerasFiles:
    return KerasFiles(WeightFile(f"efficientnet_v2/efficientnetv2-{name}.h5", top_hash),
                      WeightFile(f"efficientnet_v2/efficientnetv2-{name}_notop.h5", notop_hash))


def _create(gen: Callable[..., EfficientNet], variant: str, pretrained: bool, **kwargs) -> EfficientNet:
    kwargs.setdefault("bn_eps", KERAS_BN_EPS)
    kwargs.setdefault("bn_momentum", KERAS_BN_MOMENTUM)
    kwargs.setdefault("pad_type", "same")
    kwargs.setdefault("drop_rate", 0.2)
    kwargs.setdefault("drop_path_rate", 0.2)
    return gen(variant, pretrained=pretrained, **kwargs)


#: Parity at the native size in CI: B0, B3, S (float32 and float64); the others, for CI cost, on demand:
#: python -m converters verify --model NAME [--float64] (M / L: float32 and float64 measured, see the README)
_B = dict(mode="torch", builtin_preprocessing=True, mapping=to_timm, first_conv="conv_stem", classifier="classifier")
#: S / M / L: x / 128 - 1; deep: also held to 1e-9 in float64 (S in CI; M / L on demand, --float64)
_SML = dict(_B, mode="tf128")


@register_model
@keras_application("EfficientNetV2B0", size=224, top1=78.7, **_B,
                   files=_files("b0", "21ecbf6da12460d5c40bb2f29ceb2188", "893217f2bb855e2983157299931e43ff"))
def keras_efficientnetv2_b0(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``EfficientNetV2B0``."""
    return _create(_gen_efficientnetv2_base, "keras_efficientnetv2_b0", pretrained, **kwargs)


@register_model
@keras_application("EfficientNetV2B1", parity=False, size=240, top1=79.8, **_B,
                   files=_files("b1", "069f0534ff22adf035c89e2d9547a9dc", "0e80663031ca32d657f9caa404b6ec37"))
def keras_efficientnetv2_b1(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``EfficientNetV2B1``."""
    return _create(_gen_efficientnetv2_base, "keras_efficientnetv2_b1", pretrained, channel_multiplier=1.0,
                   depth_multiplier=1.1, **kwargs)


@register_model
@keras_application("EfficientNetV2B2", parity=False, size=260, top1=80.5, **_B,
                   files=_files("b2", "424e49f28180edbde1e94797771950a7", "1dfe2e7a5d45b6632553a8961ea609eb"))
def keras_efficientnetv2_b2(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``EfficientNetV2B2``."""
    return _create(_gen_efficientnetv2_base, "keras_efficientnetv2_b2", pretrained, channel_multiplier=1.1,
                   depth_multiplier=1.2, **kwargs)


@register_model
@keras_application("EfficientNetV2B3", size=300, top1=82.0, **_B,
                   files=_files("b3", "1f1fc43bd98a6e4fd8fdfd551e02c7a0", "f6abf7b5849ac99a89b50dd3fd532856"))
def keras_efficientnetv2_b3(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``EfficientNetV2B3``."""
    return _create(_gen_efficientnetv2_base, "keras_efficientnetv2_b3", pretrained, channel_multiplier=1.2,
                   depth_multiplier=1.4, **kwargs)


@register_model
@keras_application("EfficientNetV2S", size=384, top1=83.9, **_SML,
                   files=_files("s", "e1d88a8495beba45748fedd0cecbe016", "af0682fb74e8c54910f2d4393339c070"))
def keras_efficientnetv2_s(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``EfficientNetV2S``."""
    return _create(_gen_efficientnetv2_s, "keras_efficientnetv2_s", pretrained, **kwargs)


@register_model
@keras_application("EfficientNetV2M", size=480, top1=85.3, **_SML,
                   files=_files("m", "a3bf6aa3276309f4fc6a34aa114c95cd", "1b8dc055df72dde80d614482840fe342"))
def keras_efficientnetv2_m(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``EfficientNetV2M``."""
    return _create(_gen_efficientnetv2_m, "keras_efficientnetv2_m", pretrained, **kwargs)


@register_model
@keras_application("EfficientNetV2L", size=480, top1=85.7, **_SML,
                   files=_files("l", "27e6d408b53c7ebc868fefa357689935", "b0b66b5c863aef5b46e8608fe1711615"))
def keras_efficientnetv2_l(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``EfficientNetV2L``."""
    return _create(_gen_efficientnetv2_l, "keras_efficientnetv2_l", pretrained, **kwargs)
