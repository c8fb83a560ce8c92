"""The zoo table, collected from the ``@keras_application`` decorators of the family files.

A family file (``lightning_app/zoo/families/<family>.py``) holds everything about its models, as a
timm model file and a Keras Applications module do together: the Keras-equivalent architecture
built from timm layers, the Keras -> timm weight mapping, and one ``@keras_application`` per timm
model function, right under ``@register_model``, carrying the official Keras files (URL + hash, top
and notop, other input sizes), preprocessing, native size and published top-1::

    @register_model
    @keras_application("InceptionV3", size=299, mode="tf", top1=77.9, mapping=to_timm,
                       files=tf_kernels("inception_v3/inception_v3", "9a0d5805...", "bcbd6486..."),
                       first_conv="Conv2d_1a_3x3.conv", classifier="fc", parity_float64=True)
    def keras_inception_v3(pretrained=False, **kwargs):
        return build_model_with_cfg(KerasInceptionV3, "keras_inception_v3", pretrained, **kwargs)

Variants are models too. Another width (alpha) is another timm function with its own decorator,
named after the Keras model plus what differs; other input sizes of the same architecture (own
weight files, same layers) are ``SizeVariant`` rows registered as ``<name>_<size>``::

    @register_model
    @keras_application("MobileNetV2_035", application="MobileNetV2", keras_kwargs=dict(alpha=0.35),
                       size=224, mode="tf", top1=None, mapping=to_timm, first_conv="conv_stem",
                       files=_files(0.35, 224), sizes=[SizeVariant(s, _files(0.35, s), parity=s == 96)
                                                        for s in (96, 128, 160, 192)])
    def keras_mobilenetv2_035(pretrained=False, **kwargs): ...

gives ``MobileNetV2_035`` (224) and ``MobileNetV2_035_96`` ... ``MobileNetV2_035_192``, all variants
of ``MobileNetV2`` (``list_models()`` lists default models, ``list_models(variants=True)`` all).

The decorator also writes the timm ``pretrained_cfg`` (input size, mean / std, first conv,
classifier) into the module's ``default_cfgs``, which ``@register_model`` then registers. The
table (``REGISTRY``), ``python -m converters list``, the README table and the parity tests are
derived from what the decorators collect; ``lightning_app.zoo`` imports every family module.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
from timm.models import generate_default_cfgs

from converters.digest import hash_algorithm
from converters.preprocessing import PREPROCESSING, preprocessing
from converters.spec import KerasLayers, StateDict

KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
#: EfficientNet (v1) files live under another bucket path
KERAS_BASE_URL_E = "https://storage.googleapis.com/keras-applications/"
#: Environment variable naming a mirror of the Keras weight hosts (same relative paths), e.g. an internal server.
MIRROR_ENV = "KERAS_APPLICATIONS_MIRROR"
#: Where the layer manifests live: ``<name>.json`` (see ``converters.manifest``)
MANIFEST_DIR = Path(__file__).with_name("manifests")

__all__ = ["KERAS_BASE_URL", "KERAS_BASE_URL_E", "MIRROR_ENV", "PREPROCESSING", "REGISTRY", "KerasFiles",
           "SizeVariant", "WeightFile", "ZooEntry", "get_entry", "keras_application", "list_models", "tf_kernels",
           "variants_of"]


@dataclass(frozen=True)
class WeightFile:
    """One official Keras weight file.

    ``file_hash`` is what Keras checks (``keras.utils.get_file``): md5 (32 hex digits) or sha256
    (64), or None where Keras ships none (MobileNet v1 / v2): such a file is accepted as Keras
    accepts it, then proven structurally by the conversion (every layer's name and shape must
    match the manifest), and the converted file records its sha256.
    """

    path: str  # relative to ``base``
    file_hash: Optional[str]
    base: str = KERAS_BASE_URL

    @property
    def hash_algorithm(self) -> Optional[str]:
        return hash_algorithm(self.file_hash)

    @property
    def url(self) -> str:
        base = os.environ.get(MIRROR_ENV) or self.base
        return base.rstrip("/") + "/" + self.path

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class KerasFiles:
    """The official top (``include_top=True``) and notop weight files of one model."""

    top: WeightFile
    notop: WeightFile


def tf_kernels(stem: str, top_hash: Optional[str], notop_hash: Optional[str]) -> KerasFiles:
    """The common naming: ``<stem>_weights_tf_dim_ordering_tf_kernels[_notop].h5``."""
    return KerasFiles(WeightFile(f"{stem}_weights_tf_dim_ordering_tf_kernels.h5", top_hash),
                      WeightFile(f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5", notop_hash))


@dataclass(frozen=True)
class SizeVariant:
    """The same architecture at another input size with its own Keras weights (MobileNet rows).

    Registered as ``<name>_<size>``; ``parity=True`` adds it to the parity tests.
    """

    size: int
    files: KerasFiles
    top1: Optional[float] = None
    parity: bool = False
    top5: Optional[float] = None


@dataclass(frozen=True)
class ZooEntry:
    """A Keras Applications model and its Keras-equivalent timm architecture.

    Satisfies ``converters.spec.KerasModelSpec``, so the converter library takes it directly.
    """

    keras_name: str  # zoo name, e.g. "InceptionV3", "MobileNetV2_035_96"
    application: str  # keras.applications function, e.g. "MobileNetV2"
    timm_arch: str  # registered timm model name
    input_size: int  # native (square) input size
    mode: str  # preprocessing mode (converters.preprocessing.PREPROCESSING)
    files: KerasFiles
    mapping: Callable[[KerasLayers, bool], StateDict] = field(repr=False, compare=False)
    first_conv: str  # timm parameter prefix of the first conv (where a BGR flip is folded)
    top1: Optional[float]  # published Keras ImageNet top-1 (%), None if unpublished
    top5: Optional[float] = None  # published Keras ImageNet top-5 (%), None if unpublished
    published_size: Optional[int] = None  # input size of the published figures when not the native size
    keras_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"alpha": 0.35}
    builtin_preprocessing: bool = False  # Keras normalises inside the model (EfficientNet, ConvNeXt, ...)
    manifest: str = ""  # manifest name (default: keras_name); size variants share their model's
    variant_of: Optional[str] = None  # the default model of the same application, for variants
    parity: bool = True  # in the parity tests (top and notop at the native size)
    parity_float64: bool = False  # in the float64 parity test (very deep nets), also where ``parity`` is False
    family: str = ""  # the family module that registered it
    #: Keras 3 name of a layer as an older Keras named it in the official files (the name check), or None
    legacy_layer_name: Optional[Callable[[str], str]] = field(default=None, repr=False, compare=False)
    #: ``f(keras_top_model) -> tensor``: Keras's ``include_top=False, pooling="avg"`` output built on the top
    #: model's layers, for models whose notop model is no cut of the top one (ConvNeXt); see ``converters.spec``
    keras_pooled_notop: Optional[Callable[[Any], Any]] = field(default=None, repr=False, compare=False)

    # --- derived ---------------------------------------------------------------------------------
    @property
    def top(self) -> WeightFile:
        return self.files.top

    @property
    def notop(self) -> WeightFile:
        return self.files.notop

    def weight_file(self, include_top: bool) -> WeightFile:
        return self.files.top if include_top else self.files.notop

    @property
    def mean(self) -> Tuple[float, float, float]:
        return PREPROCESSING[self.mode].mean

    @property
    def std(self) -> Tuple[float, float, float]:
        return PREPROCESSING[self.mode].std

    @property
    def bgr(self) -> bool:
        return PREPROCESSING[self.mode].bgr

    @property
    def manifest_path(self) -> Path:
        return MANIFEST_DIR / f"{self.manifest or self.keras_name}.json"

    @cached_property
    def num_features(self) -> int:
        """Pooled feature width (Keras ``include_top=False, pooling="avg"``); built on the meta device."""
        with torch.device("meta"):
            return int(timm.create_model(self.timm_arch, pretrained=False, num_classes=0).num_features)

    def to_timm(self, layers: KerasLayers, include_top: bool) -> StateDict:
        """Keras layers (manifest names) -> timm state dict (``converters.spec.KerasModelSpec``)."""
        return self.mapping(layers, include_top)


REGISTRY: Dict[str, ZooEntry] = {}
_BY_LOWER: Dict[str, ZooEntry] = {}
_BY_ARCH: Dict[str, ZooEntry] = {}


def _add(entry: ZooEntry, by_arch: bool) -> None:
    key = entry.keras_name.lower()
    old = _BY_LOWER.get(key)
    if old is not None and (old.family, old.timm_arch) != (entry.family, entry.timm_arch):
        raise ValueError(f"zoo name {entry.keras_name!r} is registered twice: by {old.family} ({old.timm_arch}) "
                         f"and {entry.family} ({entry.timm_arch})")
    REGISTRY[entry.keras_name] = entry
    _BY_LOWER[key] = entry
    if by_arch:
        _BY_ARCH[entry.timm_arch] = entry


def _timm_cfg(entry: ZooEntry, classifier: str, cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """timm ``pretrained_cfg`` of a zoo model: Keras input size and preprocessing (mean, std)."""
    out = dict(
        url="", num_classes=1000, input_size=(3, entry.input_size, entry.input_size), pool_size=None,
        crop_pct=1.0, interpolation="bilinear", mean=entry.mean, std=entry.std, first_conv=entry.first_conv,
        classifier=classifier, hf_hub_id=None, source="keras-applications", license="apache-2.0",
        notes=(f"Keras {entry.application}{_kwargs_text(entry.keras_kwargs)}, preprocessing mode {entry.mode!r}",),
    )
    out.update(cfg)
    return out


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")" if kwargs else ""


def keras_application(
    name: str,
    *,
    size: int,
    mode: str,
    files: KerasFiles,
    top1: Optional[float],
    mapping: Callable[[KerasLayers, bool], StateDict],
    first_conv: str,
    classifier: str = "classifier",
    application: Optional[str] = None,
    keras_kwargs: Optional[Mapping[str, Any]] = None,
    builtin_preprocessing: bool = False,
    sizes: Sequence[SizeVariant] = (),
    parity: Optional[bool] = None,
    parity_float64: bool = False,
    cfg: Optional[Mapping[str, Any]] = None,
    legacy_layer_name: Optional[Callable[[str], str]] = None,
    top5: Optional[float] = None,
    published_size: Optional[int] = None,
    keras_pooled_notop: Optional[Callable[[Any], Any]] = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated timm model function as the Keras model ``name`` (place it right under
    ``@register_model``).

    Args:
        name: zoo name. The Keras name for a default model (``"MobileNetV2"``); for variants the
            Keras name plus what differs, e.g. ``"MobileNetV2_035"`` (alpha 0.35).
        size: native input size. mode: preprocessing mode (``converters.preprocessing``).
        files: the official weight files (``KerasFiles``; ``tf_kernels(stem, top_hash, notop_hash)``).
        top1: published Keras ImageNet top-1 (%), None if unpublished.
        mapping: ``mapping(layers, include_top) -> timm state dict`` (Keras layer names as in the manifest).
        first_conv / classifier: timm names of the first conv and the classifier (``pretrained_cfg``).
        application: the ``keras.applications`` function (default: ``name``); keras_kwargs: its extra
            arguments (``alpha``, ``minimalistic``, ...). A ``name`` other than ``application`` makes a variant.
        builtin_preprocessing: Keras normalises inside the model; the parity harness feeds it 0..255.
        sizes: the same architecture at other input sizes, registered as ``<name>_<size>``.
        parity: run the parity tests (default: for default models, not for variants).
        parity_float64: also run the float64 parity test (very deep nets); it runs even with ``parity=False``
            (a net whose float32 rounding alone exceeds the float32 tolerance: ResNet101 / ResNet152).
        cfg: extra timm ``pretrained_cfg`` fields (e.g. ``pool_size``).
        legacy_layer_name: ``name -> Keras 3 name`` for official files saved by an older Keras that named
            layers otherwise (MobileNetV3's ``expanded_conv/depthwise/BatchNorm``); the converter's name check
            compares the mapped names.
        top5: published Keras ImageNet top-5 (%). published_size: the input size the published figures
            were measured at, when not ``size`` (ResNetV2: 299); ``python -m converters evaluate`` says so.
        keras_pooled_notop: ``f(keras_top_model) -> tensor``, Keras's ``include_top=False, pooling="avg"``
            output on the top model's layers, where Keras's notop model is no cut of the top one (ConvNeXt
            appends its own LayerNormalization); its parity check compares pooled features.
    """
    application = application or name
    keras_kwargs = dict(keras_kwargs or {})
    preprocessing(mode)  # unknown modes fail at import, naming the known ones

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        arch = fn.__name__
        if timm.models.is_model(arch):
            raise TypeError(f"{fn.__module__}.{arch}: put @keras_application below @register_model "
                            "(its pretrained_cfg must exist when timm registers the model)")
        family = fn.__module__.rsplit(".", 1)[-1]
        variant_of = None if name == application else application
        entry = ZooEntry(
            keras_name=name, application=application, timm_arch=arch, input_size=size, mode=mode, files=files,
            mapping=mapping, first_conv=first_conv, top1=top1, keras_kwargs=keras_kwargs,
            builtin_preprocessing=builtin_preprocessing, manifest=name, variant_of=variant_of,
            parity=variant_of is None if parity is None else parity, parity_float64=parity_float64, family=family,
            legacy_layer_name=legacy_layer_name, top5=top5, published_size=published_size,
            keras_pooled_notop=keras_pooled_notop,
        )
        _add(entry, by_arch=True)
        for variant in sizes:
            _add(ZooEntry(
                keras_name=f"{name}_{variant.size}", application=application, timm_arch=arch,
                input_size=variant.size, mode=mode, files=variant.files, mapping=mapping, first_conv=first_conv,
                top1=variant.top1, keras_kwargs=keras_kwargs, builtin_preprocessing=builtin_preprocessing,
                manifest=name, variant_of=application, parity=variant.parity, family=family,
                legacy_layer_name=legacy_layer_name, top5=variant.top5, keras_pooled_notop=keras_pooled_notop,
            ), by_arch=False)
        module = sys.modules[fn.__module__]
        default_cfgs = module.__dict__.setdefault("default_cfgs", {})
        default_cfgs.update(generate_default_cfgs({f"{arch}.keras_in1k": _timm_cfg(entry, classifier, cfg or {})}))
        return fn

    return decorate


def list_models(variants: bool = False) -> List[str]:
    """Zoo names of the default models (``variants=True``: every registered model), in table order."""
    return [name for name, e in REGISTRY.items() if variants or e.variant_of is None]


def variants_of(name: str) -> List[str]:
    """Zoo names of the variants of a default model (other alphas, sizes, ...)."""
    return [n for n, e in REGISTRY.items() if e.variant_of == name]


def get_entry(name: str) -> ZooEntry:
    """Look up a zoo entry by zoo name (case-insensitive) or timm architecture name."""
    entry = _BY_LOWER.get(name.lower()) or _BY_ARCH.get(name)
    if entry is None:
        from lightning_app.errors import UnknownModelError

        raise UnknownModelError(f"unknown model {name!r}; the zoo has: {', '.join(list_models())} "
                                f"(and their variants: python -m converters list --variants)")
    return entry
