"""Keras MobileNetV2, alpha 0.35 / 0.5 / 0.75 / 1.0 at 96 / 128 / 160 / 192 / 224, and 1.3 / 1.4 at 224:
timm's MobileNet-V2 (``mobilenetv2_100``: ``EfficientNet`` with inverted-residual blocks) with TF
padding and Keras's BatchNorm.

Checked layer by layer against ``keras/src/applications/mobilenet_v2.py``:

* Stem ``Conv1``: 3x3 stride 2 ``same`` (TF padding). Strided depthwise convs: ``ZeroPadding2D(
  correct_pad(x, 3))`` + ``valid``. With a static input shape, ``correct_pad`` is exactly TF-same,
  including odd maps. timm's ``pad_type='same'`` (``Conv2dSame``) is TF-same for every input, so it is exact
  at every size. timm's default symmetric padding is not: it is 0.31 off at 224 (ZOO_FACTS).
* Blocks: block 0 is depthwise -> BN -> ReLU6 -> project -> BN with no expansion (timm's ``ds`` block).
  Blocks 1..16 are expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN, plus
  the input when the shapes allow (timm's ``ir`` block, the same skip rule). Every conv is bias-free.
* Widths: stem ``_make_divisible(32 * alpha, 8)``. Block outputs ``_make_divisible(int(filters * alpha), 8)``.
  Expansion ``6 * in_channels``. Last conv 1280, or ``_make_divisible(1280 * alpha, 8)`` for alpha > 1.
  We use these formulas. timm's ``round_channels`` gives the same widths for the six shipped alphas.
* BatchNorm: eps 1e-3, momentum 0.999 (PyTorch 0.001).
* Top: GlobalAveragePooling2D -> Dense ``predictions``, which is timm's ``classifier``. ``num_classes=0``
  gives the pooled ``out_relu`` features (1280, or more for alpha > 1), which is Keras's
  ``include_top=False, pooling="avg"``.

Files: ``mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}[_no_top].h5``.
Keras publishes no hash for them. Alphas 1.3 and 1.4 exist only at 224: the TF-slim release has no
other sizes for them (``..._1.4_96_no_top.h5`` is a 404, keras-team/keras#16452), and Keras's docstring counts
22 models. The files were written by keras-applications' MobileNetV2, whose classifier was named
``Logits`` (Keras 3: ``predictions``): ``legacy_layer_name`` tells the name check. Top-1 / top-5
at 224 are the Keras-measured figures of every alpha (keras-applications README, 05ff470: 100 minus the
errors). The top-1 at the other sizes is from the keras-applications ``mobilenet_v2.py`` docstring
(TF-slim checkpoints).

Mapping: ``Conv1`` / ``bn_Conv1`` -> ``conv_stem`` / ``bn1``. ``expanded_conv_{depthwise,project}[_BN]``
-> ``blocks.0.0.{conv_dw,bn1,conv_pw,bn2}``. Keras ``block_k`` (1..16) is the k-th timm block, where
``expand``, ``depthwise`` and ``project`` (each followed by its ``_BN``) map to ``conv_pw``/``bn1``,
``conv_dw``/``bn2`` and ``conv_pwl``/``bn3``. ``Conv_1`` / ``Conv_1_bn`` map to ``conv_head`` / ``bn2``,
and ``predictions`` to ``classifier``.
"""
from __future__ import annotations

from functools import partial
from typing import List, Tuple

import torch.nn as nn
from timm.layers import make_divisible
from timm.models import build_model_with_cfg, register_model
from timm.models._efficientnet_builder import decode_arch_def, resolve_bn_args
from timm.models.efficientnet import EfficientNet

from converters.builder import StateDictBuilder
from converters.spec import KerasLayers
from lightning_app.zoo.registry import KerasFiles, SizeVariant, WeightFile, keras_application

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.001  # PyTorch momentum = 1 - Keras momentum (0.999)
#: timm block strings per stage; Keras blocks 0..16 in order
ARCH_DEF = [["ds_r1_k3_s1_c16"], ["ir_r2_k3_s2_e6_c24"], ["ir_r3_k3_s2_e6_c32"], ["ir_r4_k3_s2_e6_c64"],
            ["ir_r3_k3_s1_e6_c96"], ["ir_r3_k3_s2_e6_c160"], ["ir_r1_k3_s1_e6_c320"]]
STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)
SIZES = (96, 128, 160, 192, 224)
#: the official files were saved by keras-applications, whose classifier layer was named Logits
LEGACY_NAMES = {"Logits": "predictions"}


def legacy_layer_name(name: str) -> str:
    """Keras 3 name of a layer of the official files (keras-applications named the classifier ``Logits``)."""
    return LEGACY_NAMES.get(name, name)


def keras_width(channels: int, alpha: float) -> int:
    """Keras MobileNetV2's block width: ``_make_divisible(int(filters * alpha), 8)``."""
    return make_divisible(int(channels * alpha), 8)


def _bn_args(kwargs: dict) -> dict:
    """Keras's BatchNorm eps and momentum, unless ``bn_eps`` / ``bn_momentum`` (timm's arguments) say otherwise:
    Keras's momentum suits long ImageNet runs; training from scratch for a few hundred steps needs a faster one."""
    return {"eps": KERAS_BN_EPS, "momentum": KERAS_BN_MOMENTUM, **resolve_bn_args(kwargs)}


def _create(variant: str, alpha: float, pretrained: bool = False, **kwargs) -> EfficientNet:
    model_kwargs = dict(
        block_args=decode_arch_def(ARCH_DEF),
        num_features=make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280,
        stem_size=make_divisible(32 * alpha, 8), fix_stem=True,
        round_chs_fn=partial(keras_width, alpha=alpha), pad_type="same", act_layer=nn.ReLU6,
        norm_layer=partial(nn.BatchNorm2d, **_bn_args(kwargs)),
    )
    model_kwargs.update(kwargs)
    return build_model_with_cfg(EfficientNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True),
                                **model_kwargs)


def _timm_blocks() -> List[str]:
    """timm prefixes of Keras blocks 0..16, in order."""
    return [f"blocks.{stage}.{i}" for stage, depth in enumerate(STAGE_DEPTHS) for i in range(depth)]


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras MobileNetV2 layers -> timm ``EfficientNet`` (MobileNet-V2 blocks) state dict."""
    b = StateDictBuilder(layers, "MobileNetV2")
    b.conv("Conv1", "conv_stem")
    b.bn("bn_Conv1", "bn1")
    first, *rest = _timm_blocks()
    b.depthwise("expanded_conv_depthwise", f"{first}.conv_dw")
    b.bn("expanded_conv_depthwise_BN", f"{first}.bn1")
    b.conv("expanded_conv_project", f"{first}.conv_pw")
    b.bn("expanded_conv_project_BN", f"{first}.bn2")
    for k, prefix in enumerate(rest, start=1):
        b.conv(f"block_{k}_expand", f"{prefix}.conv_pw")
        b.bn(f"block_{k}_expand_BN", f"{prefix}.bn1")
        b.depthwise(f"block_{k}_depthwise", f"{prefix}.conv_dw")
        b.bn(f"block_{k}_depthwise_BN", f"{prefix}.bn2")
        b.conv(f"block_{k}_project", f"{prefix}.conv_pwl")
        b.bn(f"block_{k}_project_BN", f"{prefix}.bn3")
    b.conv("Conv_1", "conv_head")
    b.bn("Conv_1_bn", "bn2")
    if include_top:
        b.dense("predictions", "classifier")
    return b.finish()


def files(alpha: float, size: int) -> KerasFiles:
    """The official files of one alpha and size (no hash published)."""
    stem = f"mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{size}"
    return KerasFiles(WeightFile(f"{stem}.h5", None), WeightFile(f"{stem}_no_top.h5", None))


#: top-1 by (alpha, size): at 224 measured with Keras (keras-applications README), at the other sizes the TF-slim
#: checkpoints' (keras-applications mobilenet_v2.py docstring)
TOP1 = {(1.4, 224): 75.230, (1.3, 224): 74.680, (1.0, 224): 71.336,
        (1.0, 192): 70.7, (1.0, 160): 68.8, (1.0, 128): 65.3, (1.0, 96): 60.3,
        (0.75, 224): 69.532, (0.75, 192): 68.7, (0.75, 160): 66.4, (0.75, 128): 63.2, (0.75, 96): 58.8,
        (0.5, 224): 65.194, (0.5, 192): 63.9, (0.5, 160): 61.0, (0.5, 128): 57.7, (0.5, 96): 51.2,
        (0.35, 224): 60.086, (0.35, 192): 58.2, (0.35, 160): 55.7, (0.35, 128): 50.8, (0.35, 96): 45.5}
#: top-5 at 224 by alpha (keras-applications README); unpublished at the other sizes
TOP5 = {1.4: 92.422, 1.3: 92.122, 1.0: 90.142, 0.75: 89.176, 0.5: 86.062, 0.35: 82.432}


def _sizes(alpha: float, parity: Tuple[int, ...] = ()) -> List[SizeVariant]:
    return [SizeVariant(size, files(alpha, size), TOP1.get((alpha, size)), size in parity)
            for size in SIZES if size != 224]


def _keras(alpha: float, **kwargs) -> dict:
    return dict(size=224, mode="tf", mapping=to_timm, first_conv="conv_stem", classifier="classifier",
                application="MobileNetV2", files=files(alpha, 224), keras_kwargs=dict(alpha=alpha),
                top1=TOP1[(alpha, 224)], top5=TOP5[alpha], legacy_layer_name=legacy_layer_name,
                **kwargs)


@register_model
@keras_application("MobileNetV2", **_keras(1.0, sizes=_sizes(1.0)))
def keras_mobilenetv2_100(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``MobileNetV2(alpha=1.0)``."""
    return _create("keras_mobilenetv2_100", 1.0, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV2_140", **_keras(1.4, parity=True))
def keras_mobilenetv2_140(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``MobileNetV2(alpha=1.4)`` (224 only)."""
    return _create("keras_mobilenetv2_140", 1.4, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV2_130", **_keras(1.3))
def keras_mobilenetv2_130(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``MobileNetV2(alpha=1.3)`` (224 only)."""
    return _create("keras_mobilenetv2_130", 1.3, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV2_075", **_keras(0.75, sizes=_sizes(0.75)))
def keras_mobilenetv2_075(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``MobileNetV2(alpha=0.75)``."""
    return _create("keras_mobilenetv2_075", 0.75, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV2_050", **_keras(0.5, sizes=_sizes(0.5)))
def keras_mobilenetv2_050(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``MobileNetV2(alpha=0.5)``."""
    return _create("keras_mobilenetv2_050", 0.5, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV2_035", **_keras(0.35, sizes=_sizes(0.35, parity=(96,))))
def keras_mobilenetv2_035(pretrained: bool = False, **kwargs) -> EfficientNet:
    """Keras ``MobileNetV2(alpha=0.35)``."""
    return _create("keras_mobilenetv2_035", 0.35, pretrained, **kwargs)
