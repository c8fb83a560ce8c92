"""``create_backbone``: a zoo model (or any timm model) with the requested weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import timm
import torch.nn as nn

from lightning_app.zoo.registry import get_entry, list_models

WeightsArg = Union[str, os.PathLike, None]


def _is_zoo(name: str) -> bool:
    try:
        get_entry(name)
        return True
    except KeyError:
        return False


def preprocessing(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) on [0, 1] RGB input that the named backbone expects."""
    if _is_zoo(name):
        entry = get_entry(name)
        return entry.mean, entry.std
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        raise KeyError(f"unknown model {name!r}: neither in the zoo ({', '.join(list_models())}) nor in timm")
    return tuple(cfg.mean), tuple(cfg.std)


def create_backbone(
    name: str,
    weights: WeightsArg = "imagenet",
    num_classes: Optional[int] = None,
    **timm_kwargs,
) -> nn.Module:
    """Build a Keras-equivalent backbone.

    Args:
        name: zoo name (``"InceptionV3"``, a variant such as ``"MobileNetV2_035_96"``; see
            ``python -m converters list --variants``) or any timm model name.
        weights: ``"imagenet"`` (Keras ImageNet weights: cache, else download and convert),
            a path to a converted ``.safetensors`` or a Keras ``.h5`` file, or ``None``
            for random initialisation.
        num_classes: ``None`` keeps the Keras top (1000 ImageNet classes); ``0`` returns
            pooled features (Keras ``include_top=False, pooling="avg"``); any other number
            puts a fresh classifier on the notop weights.
        timm_kwargs: passed to ``timm.create_model``.
    """
    from lightning_app.zoo.weights import load_weights  # late import: converters is heavy

    if not _is_zoo(name):
        if weights == "imagenet":
            raise ValueError(
                f"{name!r} is not a zoo model, so it has no Keras ImageNet weights; "
                f"use weights=None, a .safetensors file, or one of: {', '.join(list_models())}"
            )
        model = timm.create_model(name, pretrained=False, num_classes=1000 if num_classes is None else num_classes,
                                  **timm_kwargs)
        if weights is not None:
            load_weights(model, Path(weights), entry=None)
        return model

    entry = get_entry(name)
    include_top = num_classes is None or num_classes == 1000
    # a size variant shares its architecture with the default size: its pretrained_cfg says its own size
    overlay = dict(input_size=(3, entry.input_size, entry.input_size), **timm_kwargs.pop("pretrained_cfg_overlay", {}))
    model = timm.create_model(entry.timm_arch, pretrained=False, num_classes=1000 if include_top else num_classes,
                              pretrained_cfg_overlay=overlay, **timm_kwargs)
    if weights is not None:
        load_weights(model, weights, entry=entry, include_top=include_top)
    return model
