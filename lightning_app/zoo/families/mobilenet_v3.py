"""Keras MobileNetV3Small / MobileNetV3Large (alpha 1.0 and 0.75, and minimalistic), at 224: timm's
``tf_mobilenetv3_*`` (TF padding, BatchNorm eps 1e-3), with Keras's split of the head.

Checked layer by layer against ``keras/src/applications/mobilenet_v3.py``:

* Preprocessing is built into the Keras model: ``Rescaling(1/127.5, offset=-1)`` on 0..255 input. This is
  our ``Normalize`` with mean = std = 0.5 on [0, 1] input (mode ``tf``), and the parity harness feeds
  Keras 0..255 (``builtin_preprocessing``).
* Stem ``conv``: 3x3 stride 2 ``same`` (TF padding), 16 channels for every alpha. Strided depthwise convs:
  ``ZeroPadding2D(correct_pad(x, k))`` + ``valid``. With a static shape this is exactly TF-same, which is
  timm's ``pad_type='same'`` (``Conv2dSame``). BatchNorm eps 1e-3, momentum 0.999 (PyTorch 0.001).
* Blocks: Keras ``_inverted_res_block(expansion, filters, kernel, stride, se_ratio, activation)``
  is, block for block, timm's arch definition (below). The expansion is ``_depth(in * expansion)``,
  which is timm's ``make_divisible(in * exp_ratio)``. Squeeze-excite is ``_depth(expanded / 4)``
  with biases, ReLU and hard sigmoid ``relu6(x + 3) / 6``, which is timm's ``SqueezeExcite``
  (``force_act_layer=ReLU``, ``hard_sigmoid``). Activations are ReLU / hard swish, or ReLU only
  when minimalistic (3x3 kernels, no squeeze-excite). Block 0 has no expand conv: it is timm's ``ds``
  block. The residual is added when stride 1 and in == out, with the same rule as timm.
* ``conv_1`` (1x1, 6x the last block's width: 576 / 960 at alpha 1) + BN + activation ends the
  features: Keras's ``include_top=False`` output, and timm's last ``cn`` stage (``forward_features``).
* Top: GlobalAveragePooling2D(keepdims) -> ``conv_2`` (1x1 conv with bias, 1024 / 1280) -> activation ->
  Dropout -> ``logits`` (1x1 conv) -> Flatten. This is timm's efficient head: ``global_pool`` ->
  ``conv_head`` -> ``act2`` -> ``classifier``. ``conv_2`` belongs to Keras's ImageNet top, so
  ``KerasMobileNetV3`` has a head conv only with the 1000-class top (below).

Files: ``mobilenet_v3/weights_mobilenet_v3_{small,large}[_minimalistic]_224_{alpha}_float.h5`` and
``..._no_top_v2.h5``, with Keras's md5s. TF-era Keras saved them with its layer names then
(``expanded_conv_1/squeeze_excite/Conv``, ``Conv_1/BatchNorm``, ``Logits``). Keras 3 renamed them
(``expanded_conv_1_squeeze_excite_conv``, ``conv_1_bn``, ``logits``), and ``legacy_layer_name`` gives
the name check that renaming. Top-1 is the Keras-measured figure for the alpha 1.0 models
(keras-applications README). The other figures are from the Keras ``mobilenet_v3.py`` docstring.

Mapping: ``conv`` / ``conv_bn`` -> ``conv_stem`` / ``bn1``. Keras block k (``expanded_conv_`` for k = 0,
``expanded_conv_{k}_`` after) is the k-th timm block. In it, ``expand``, ``depthwise`` and ``project``
(each followed by its ``_bn``) map to ``conv_pw``/``bn1``, ``conv_dw``/``bn2`` and ``conv_pwl``/``bn3``;
in block 0 they map to ``conv_dw``/``bn1`` and ``conv_pw``/``bn2``. ``squeeze_excite_conv[_1]`` maps
to ``se.conv_reduce`` / ``se.conv_expand``. ``conv_1`` / ``conv_1_bn`` map to the last stage's
``conv`` / ``bn1``, ``conv_2`` to ``conv_head``, and ``logits`` to ``classifier``.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional

import torch.nn as nn
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, register_model
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import _init_weight_goog, decode_arch_def, resolve_bn_args, round_channels
from timm.models.mobilenetv3 import MobileNetV3

from converters.builder import StateDictBuilder
from converters.spec import KerasLayers
from lightning_app.zoo.registry import KerasFiles, WeightFile, keras_application

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.001  # PyTorch momentum = 1 - Keras momentum (0.999)
IMAGENET_CLASSES = 1000

#: Keras's stack_fn per model, block by block, in timm's notation (the last stage is ``conv_1``)
ARCH_DEFS: Dict[str, List[List[str]]] = {
    "small": [["ds_r1_k3_s2_e1_c16_se0.25_nre"], ["ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"],
              ["ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"], ["ir_r2_k5_s1_e3_c48_se0.25"],
              ["ir_r3_k5_s2_e6_c96_se0.25"], ["cn_r1_k1_s1_c576"]],
    "small_minimal": [["ds_r1_k3_s2_e1_c16"], ["ir_r1_k3_s2_e4.5_c24", "ir_r1_k3_s1_e3.67_c24"],
                      ["ir_r1_k3_s2_e4_c40", "ir_r2_k3_s1_e6_c40"], ["ir_r2_k3_s1_e3_c48"],
                      ["ir_r3_k3_s2_e6_c96"], ["cn_r1_k1_s1_c576"]],
    "large": [["ds_r1_k3_s1_e1_c16_nre"], ["ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"],
              ["ir_r3_k5_s2_e3_c40_se0.25_nre"],
              ["ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"], ["ir_r2_k3_s1_e6_c112_se0.25"],
              ["ir_r3_k5_s2_e6_c160_se0.25"], ["cn_r1_k1_s1_c960"]],
    "large_minimal": [["ds_r1_k3_s1_e1_c16"], ["ir_r1_k3_s2_e4_c24", "ir_r1_k3_s1_e3_c24"], ["ir_r3_k3_s2_e3_c40"],
                      ["ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"], ["ir_r2_k3_s1_e6_c112"],
                      ["ir_r3_k3_s2_e6_c160"], ["cn_r1_k1_s1_c960"]],
}
#: width of ``conv_2`` (Keras ``last_point_ch``; scaled only for alpha > 1, for which Keras ships no weights)
HEAD_WIDTH = {"small": 1024, "large": 1280}


class KerasMobileNetV3(MobileNetV3):
    """timm's MobileNetV3 with Keras's head: the ``conv_2`` head conv is part of the ImageNet top.

    Keras's ``include_top=True`` model runs the ``conv_1`` features through pooling, ``conv_2`` (1x1 conv,
    1024 / 1280 channels), an activation and ``logits``. Its ``include_top=False`` model ends at ``conv_1``,
    and Keras fine-tuning puts a Dense on those pooled features. So the head conv exists only with the
    1000-class top (``num_classes=1000``). ``num_classes=0`` gives the pooled ``conv_1`` features (576 for
    Small, 960 for Large, at alpha 1), which is Keras's ``include_top=False, pooling="avg"``.
    ``num_classes=N`` puts a fresh Linear on those features, as Keras's ``include_top=False`` plus
    ``Dense(N)`` does. timm's ``tf_mobilenetv3_*`` would keep the 1024 / 1280 head conv for every
    ``num_classes``.

    Input ``[B, 3, H, W]`` normalised with mean = std = 0.5 -> logits ``[B, num_classes]`` (or features).
    """

    def __init__(self, *args: Any, num_classes: int = IMAGENET_CLASSES, **kwargs: Any):
        super().__init__(*args, num_classes=num_classes, **kwargs)
        if num_classes != IMAGENET_CLASSES:
            self.reset_classifier(num_classes)
            if isinstance(self.classifier, nn.Linear):
                _init_weight_goog(self.classifier, "classifier")  # as timm initialises its classifiers

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A classifier for ``num_classes`` (0: none). Other than the 1000-class ImageNet top, it sits on the
        pooled ``conv_1`` features and the head conv goes, as with Keras's ``include_top=False`` + Dense."""
        if num_classes != IMAGENET_CLASSES:
            self.conv_head, self.norm_head, self.act2 = nn.Identity(), nn.Identity(), nn.Identity()
        super().reset_classifier(num_classes, global_pool)


def _bn_args(kwargs: dict) -> dict:
    """Keras's BatchNorm eps and momentum, unless ``bn_eps`` / ``bn_momentum`` (timm's arguments) say otherwise:
    Keras's momentum suits long ImageNet runs; training from scratch for a few hundred steps needs a faster one."""
    return {"eps": KERAS_BN_EPS, "momentum": KERAS_BN_MOMENTUM, **resolve_bn_args(kwargs)}


def _create(variant: str, model_type: str, alpha: float, minimalistic: bool, pretrained: bool = False,
            **kwargs) -> KerasMobileNetV3:
    arch = ARCH_DEFS[f"{model_type}_minimal" if minimalistic else model_type]
    model_kwargs = dict(
        block_args=decode_arch_def(arch), num_features=HEAD_WIDTH[model_type], stem_size=16, fix_stem=True,
        round_chs_fn=partial(round_channels, multiplier=alpha), pad_type="same",
        act_layer=get_act_layer("relu" if minimalistic else "hard_swish"),
        se_layer=partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU,
                         rd_round_fn=round_channels),
        norm_layer=partial(nn.BatchNorm2d, **_bn_args(kwargs)),
    )
    model_kwargs.update(kwargs)
    return build_model_with_cfg(KerasMobileNetV3, variant, pretrained, feature_cfg=dict(flatten_sequential=True),
                                **model_kwargs)


def legacy_layer_name(name: str) -> str:
    """Keras 3 name of a layer as TF-era Keras named it in the official files: ``expanded_conv_1/expand/BatchNorm``
    -> ``expanded_conv_1_expand_bn``, ``Conv_1/BatchNorm`` -> ``conv_1_bn``, ``Logits`` -> ``logits``."""
    return name.replace("/BatchNorm", "_bn").replace("/", "_").lower()


def _mapping(arch: List[List[str]]):
    blocks = _expand_repeats(arch[:-1])
    last = f"blocks.{len(arch) - 1}.0"

    def to_timm(layers: KerasLayers, include_top: bool) -> dict:
        """Keras MobileNetV3 layers -> timm ``KerasMobileNetV3`` state dict."""
        b = StateDictBuilder(layers, "MobileNetV3")
        b.conv("conv", "conv_stem")
        b.bn("conv_bn", "bn1")
        for k, prefix in enumerate(blocks):
            keras = f"expanded_conv_{k}_" if k else "expanded_conv_"
            if k:
                b.conv(f"{keras}expand", f"{prefix}.conv_pw")
                b.bn(f"{keras}expand_bn", f"{prefix}.bn1")
            dw_bn, project, project_bn = ("bn2", "conv_pwl", "bn3") if k else ("bn1", "conv_pw", "bn2")
            b.depthwise(f"{keras}depthwise", f"{prefix}.conv_dw")
            b.bn(f"{keras}depthwise_bn", f"{prefix}.{dw_bn}")
            if f"{keras}squeeze_excite_conv" in layers:
                b.conv(f"{keras}squeeze_excite_conv", f"{prefix}.se.conv_reduce")
                b.conv(f"{keras}squeeze_excite_conv_1", f"{prefix}.se.conv_expand")
            b.conv(f"{keras}project", f"{prefix}.{project}")
            b.bn(f"{keras}project_bn", f"{prefix}.{project_bn}")
        b.conv("conv_1", f"{last}.conv")
        b.bn("conv_1_bn", f"{last}.bn1")
        if include_top:
            b.conv("conv_2", "conv_head")
            b.conv_1x1_as_dense("logits", "classifier")
        return b.finish()

    return to_timm


def _expand_repeats(stages: List[List[str]]) -> List[str]:
    """timm prefixes ``blocks.{stage}.{i}`` of the blocks an arch definition makes, in order."""
    out = []
    for stage, defs in enumerate(stages):
        count = sum(int(next(p for p in d.split("_") if p.startswith("r"))[1:]) for d in defs)
        out += [f"blocks.{stage}.{i}" for i in range(count)]
    return out


def files(model: str, md5_top: str, md5_notop: str) -> KerasFiles:
    """Official files of ``model`` (e.g. ``"large_224_1.0_float"``), with Keras's md5s."""
    stem = f"mobilenet_v3/weights_mobilenet_v3_{model}"
    return KerasFiles(WeightFile(f"{stem}.h5", md5_top), WeightFile(f"{stem}_no_top_v2.h5", md5_notop))


def _keras(application: str, arch: str, alpha: float, minimalistic: bool, model: str, md5_top: str,
           md5_notop: str, top1: float, **kwargs) -> dict:
    keras_kwargs = dict(alpha=alpha, minimalistic=True) if minimalistic else dict(alpha=alpha)
    return dict(size=224, mode="tf", builtin_preprocessing=True, mapping=_mapping(ARCH_DEFS[arch]),
                first_conv="conv_stem", classifier=("conv_head", "classifier"), application=application,
                keras_kwargs=keras_kwargs, files=files(model, md5_top, md5_notop), top1=top1,
                legacy_layer_name=legacy_layer_name, **kwargs)


@register_model
@keras_application("MobileNetV3Small", **_keras("MobileNetV3Small", "small", 1.0, False, "small_224_1.0_float",
                                                "8768d4c2e7dee89b9d02b2d03d65d862",
                                                "d3e8ec802a04aa4fc771ee12a9a9b836", 68.1))
def keras_mobilenetv3_small_100(pretrained: bool = False, **kwargs) -> KerasMobileNetV3:
    """Keras ``MobileNetV3Small()``."""
    return _create("keras_mobilenetv3_small_100", "small", 1.0, False, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV3Small_075", parity=True,
                   **_keras("MobileNetV3Small", "small", 0.75, False, "small_224_0.75_float",
                            "cb65d4e5be93758266aa0a7f2c6708b7", "ebdb5cc8e0b497cd13a7c275d475c819", 65.4))
def keras_mobilenetv3_small_075(pretrained: bool = False, **kwargs) -> KerasMobileNetV3:
    """Keras ``MobileNetV3Small(alpha=0.75)``."""
    return _create("keras_mobilenetv3_small_075", "small", 0.75, False, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV3Small_minimalistic",
                   **_keras("MobileNetV3Small", "small_minimal", 1.0, True, "small_minimalistic_224_1.0_float",
                            "99cd97fb2fcdad2bf028eb838de69e37", "cde8136e733e811080d9fcd8a252f7e4", 61.9))
def keras_mobilenetv3_small_minimal_100(pretrained: bool = False, **kwargs) -> KerasMobileNetV3:
    """Keras ``MobileNetV3Small(minimalistic=True)``."""
    return _create("keras_mobilenetv3_small_minimal_100", "small", 1.0, True, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV3Large", **_keras("MobileNetV3Large", "large", 1.0, False, "large_224_1.0_float",
                                                "59e551e166be033d707958cf9e29a6a7",
                                                "07fb09a5933dd0c8eaafa16978110389", 75.6))
def keras_mobilenetv3_large_100(pretrained: bool = False, **kwargs) -> KerasMobileNetV3:
    """Keras ``MobileNetV3Large()``."""
    return _create("keras_mobilenetv3_large_100", "large", 1.0, False, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV3Large_075",
                   **_keras("MobileNetV3Large", "large", 0.75, False, "large_224_0.75_float",
                            "765b44a33ad4005b3ac83185abf1d0eb", "40af19a13ebea4e2ee0c676887f69a2e", 73.3))
def keras_mobilenetv3_large_075(pretrained: bool = False, **kwargs) -> KerasMobileNetV3:
    """Keras ``MobileNetV3Large(alpha=0.75)``."""
    return _create("keras_mobilenetv3_large_075", "large", 0.75, False, pretrained, **kwargs)


@register_model
@keras_application("MobileNetV3Large_minimalistic", parity=True,
                   **_keras("MobileNetV3Large", "large_minimal", 1.0, True, "large_minimalistic_224_1.0_float",
                            "675e7b876c45c57e9e63e6d90a36599c", "ec5221f64a2f6d1ef965a614bdae7973", 72.3))
def keras_mobilenetv3_large_minimal_100(pretrained: bool = False, **kwargs) -> KerasMobileNetV3:
    """Keras ``MobileNetV3Large(minimalistic=True)``."""
    return _create("keras_mobilenetv3_large_minimal_100", "large", 1.0, True, pretrained, **kwargs)
