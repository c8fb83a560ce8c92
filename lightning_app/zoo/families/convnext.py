"""Keras ConvNeXtTiny/Small/Base/Large/XLarge: timm's ``ConvNeXt`` is Keras's, layer for layer.

Checked against ``keras/src/applications/convnext.py``:

* Preprocessing is built into the Keras model: ``Normalization(mean=255 * ImageNet mean,
  variance=(255 * ImageNet std)**2)`` on 0..255 input, i.e. ``(x / 255 - mean) / std``: the
  ``torch`` mode of our ``Normalize`` (``builtin_preprocessing``).
* Stem: ``Conv2D(4, stride 4)`` then ``LayerNormalization(eps=1e-6)`` = timm ``stem.0`` / ``stem.1``
  (``LayerNorm2d``, eps 1e-6). Downsampling: ``LayerNormalization`` then ``Conv2D(2, stride 2)`` =
  timm ``stages.i.downsample.0`` / ``.1``. Keras wraps both pairs in a ``Sequential``, so the weight
  file holds each pair as one layer (``kernel, bias, gamma, beta`` / ``gamma, beta, kernel, bias``).
* Block: depthwise 7x7 ``same`` conv with bias (``Conv2D(groups=C)``, stride 1: symmetric padding 3),
  ``LayerNormalization(1e-6)`` over channels, ``Dense(4C)`` / GELU (exact) / ``Dense(C)`` on the
  channels-last map, ``LayerScale`` (init 1e-6), residual add = timm ``conv_dw``, ``norm``,
  ``mlp.fc1`` / ``mlp.fc2`` (Linear, channels-last), ``gamma``. Stochastic depth is 0 in every
  Keras variant.
* Top: ``GlobalAveragePooling2D`` -> ``LayerNormalization(1e-6)`` -> ``Dense`` = timm's
  ``NormMlpClassifierHead`` (``head.global_pool``, ``head.norm``, ``head.fc``).
* Notop: Keras's ``include_top=False`` model is **not** a cut of the top model: it appends its own
  unnamed ``LayerNormalization(1e-6)`` (``layer_normalization``, after the pooling if any), whose
  weights the notop file holds. Keras ``include_top=False, pooling="avg"`` (GAP then that
  LayerNormalization) is timm's ``num_classes=0`` output (GAP, ``head.norm``); with
  ``pooling=None`` Keras normalises every position of the feature map instead, which does not
  commute with the pooling. The parity check therefore compares the pooled features
  (``keras_pooled_notop``).

Parity in CI covers ConvNeXtTiny (depths 3-3-9-3) and ConvNeXtSmall (3-3-27-3, the depths of Base,
Large and XLarge too): Base / Large / XLarge (88M / 198M / 350M parameters) are the same code with
wider layers, pinned in CI by the manifest test (every layer's name and shape, against Keras) and
``tests/test_zoo_mapping.py`` (the mapping fills exactly the timm model's keys and shapes); their
parity runs on demand (``python -m converters verify --model ConvNeXtXLarge``: 1.5e-6 top, 1.8e-7
notop), at 1.5 to 6.5 minutes each on the shared 2-core machine.

The ImageNet weights are the official facebookresearch/ConvNeXt release (T/S ImageNet-1k, B/L/XL
ImageNet-22k fine-tuned on 1k), which Keras does not publish a top-1 for (timm evaluates the same
release at 82.1 / 83.1 / 85.8 / 86.6 / 87.0).
"""
from __future__ import annotations

import re
from typing import Tuple

from timm.models import build_model_with_cfg, register_model
from timm.models.convnext import ConvNeXt

from converters import layouts
from converters.builder import StateDictBuilder, auto_named
from converters.errors import LayerMismatchError
from converters.spec import KerasLayers
from lightning_app.zoo.registry import KerasFiles, WeightFile, keras_application

#: Keras LayerNormalization epsilon everywhere in ConvNeXt (timm's LayerNorm2d / LayerNorm default)
KERAS_LN_EPS = 1e-6


def _create(variant: str, depths: Tuple[int, ...], dims: Tuple[int, ...], pretrained: bool = False,
            **kwargs) -> ConvNeXt:
    kwargs.setdefault("norm_eps", KERAS_LN_EPS)
    return build_model_with_cfg(ConvNeXt, variant, pretrained, depths=depths, dims=dims,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


def _keras_prefix(layers: KerasLayers) -> str:
    """The Keras model name that prefixes every layer (``convnext_tiny``), from the stem's name."""
    stems = [name[:-len("_stem")] for name in layers if name.endswith("_stem")]
    if len(stems) != 1:
        raise LayerMismatchError(f"ConvNeXt: expected one '<name>_stem' layer, found {stems}")
    return stems[0]


def _layer_norm(b: StateDictBuilder, weights: dict, prefix: str) -> None:
    b.raw(f"{prefix}.weight", layouts.array(weights["gamma"]))
    b.raw(f"{prefix}.bias", layouts.array(weights["beta"]))


def _conv(b: StateDictBuilder, weights: dict, prefix: str) -> None:
    b.raw(f"{prefix}.weight", layouts.conv(weights["kernel"]))
    b.raw(f"{prefix}.bias", layouts.array(weights["bias"]))


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras ConvNeXt layers -> timm ``ConvNeXt`` state dict."""
    b = StateDictBuilder(layers, "ConvNeXt")
    p = _keras_prefix(layers)
    stem = b.take(f"{p}_stem")  # Sequential: Conv2D, LayerNormalization
    _conv(b, stem, "stem.0")
    _layer_norm(b, stem, "stem.1")
    stages = sorted({int(m.group(1)) for n in layers if (m := re.match(rf"{re.escape(p)}_stage_(\d+)_block_0_", n))})
    for i in stages:
        if i > 0:  # Sequential: LayerNormalization, Conv2D
            down = b.take(f"{p}_downsampling_block_{i - 1}")
            _layer_norm(b, down, f"stages.{i}.downsample.0")
            _conv(b, down, f"stages.{i}.downsample.1")
        j = 0
        while f"{p}_stage_{i}_block_{j}_depthwise_conv" in layers:
            keras, timm = f"{p}_stage_{i}_block_{j}", f"stages.{i}.blocks.{j}"
            b.conv(f"{keras}_depthwise_conv", f"{timm}.conv_dw")
            _layer_norm(b, b.take(f"{keras}_layernorm"), f"{timm}.norm")
            b.dense(f"{keras}_pointwise_conv_1", f"{timm}.mlp.fc1")
            b.dense(f"{keras}_pointwise_conv_2", f"{timm}.mlp.fc2")
            (scale,) = b.take(f"{keras}_layer_scale").values()  # one auto-named variable
            b.raw(f"{timm}.gamma", layouts.array(scale))
            j += 1
    if include_top:
        _layer_norm(b, b.take(f"{p}_head_layernorm"), "head.norm")
        b.dense(f"{p}_head_dense", "head.fc")
    else:
        norms = auto_named(layers, "layer_normalization")
        if len(norms) != 1:
            raise LayerMismatchError(f"ConvNeXt notop: expected one unnamed final LayerNormalization, found {norms}")
        _layer_norm(b, b.take(norms[0]), "head.norm")
    return b.finish()


def keras_pooled_notop(top):
    """Keras's ``include_top=False, pooling="avg"`` output on the top model's layers: the last block's
    output, ``GlobalAveragePooling2D``, then a new (unnamed) ``LayerNormalization(1e-6)``, as Keras builds it."""
    from converters.keras_models import import_keras

    keras = import_keras()
    (gap,) = [layer for layer in top.layers if layer.name.endswith("_head_gap")]
    x = keras.layers.GlobalAveragePooling2D()(gap.input)
    return keras.layers.LayerNormalization(epsilon=KERAS_LN_EPS)(x)


def _files(size: str, top_sha256: str, notop_sha256: str) -> KerasFiles:
    return KerasFiles(WeightFile(f"convnext/convnext_{size}.h5", top_sha256),
                      WeightFile(f"convnext/convnext_{size}_notop.h5", notop_sha256))


_KERAS = dict(size=224, mode="torch", builtin_preprocessing=True, top1=None, mapping=to_timm, first_conv="stem.0",
              classifier="head.fc", keras_pooled_notop=keras_pooled_notop)


@register_model
@keras_application("ConvNeXtTiny", **_KERAS, files=_files(
    "tiny", "8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff",
    "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"))
def keras_convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """Keras ``ConvNeXtTiny``."""
    return _create("keras_convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768), pretrained, **kwargs)


@register_model
@keras_application("ConvNeXtSmall", **_KERAS, files=_files(
    "small", "ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c",
    "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab"))
def keras_convnext_small(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """Keras ``ConvNeXtSmall``."""
    return _create("keras_convnext_small", (3, 3, 27, 3), (96, 192, 384, 768), pretrained, **kwargs)


@register_model
@keras_application("ConvNeXtBase", **_KERAS, parity=False, files=_files(
    "base", "52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6",
    "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45"))
def keras_convnext_base(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """Keras ``ConvNeXtBase``."""
    return _create("keras_convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024), pretrained, **kwargs)


@register_model
@keras_application("ConvNeXtLarge", **_KERAS, parity=False, files=_files(
    "large", "070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6",
    "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd"))
def keras_convnext_large(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """Keras ``ConvNeXtLarge``."""
    return _create("keras_convnext_large", (3, 3, 27, 3), (192, 384, 768, 1536), pretrained, **kwargs)


@register_model
@keras_application("ConvNeXtXLarge", **_KERAS, parity=False, files=_files(
    "xlarge", "c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee",
    "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05"))
def keras_convnext_xlarge(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """Keras ``ConvNeXtXLarge``."""
    return _create("keras_convnext_xlarge", (3, 3, 27, 3), (256, 512, 1024, 2048), pretrained, **kwargs)
