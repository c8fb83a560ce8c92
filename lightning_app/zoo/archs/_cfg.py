"""Shared pretrained-config helper for the Keras-equivalent timm architectures."""
from __future__ import annotations

from typing import Any, Dict

from lightning_app.zoo.registry import get_entry


def keras_cfg(keras_name: str, **overrides: Any) -> Dict[str, Any]:
    """timm ``pretrained_cfg`` for a zoo model: Keras input size and preprocessing (mean, std)."""
    entry = get_entry(keras_name)
    cfg = dict(
        url="",
        num_classes=1000,
        input_size=(3, entry.input_size, entry.input_size),
        pool_size=None,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=entry.mean,
        std=entry.std,
        first_conv=entry.first_conv,
        classifier="classifier",
        hf_hub_id=None,
        source="keras-applications",
        license="apache-2.0",
        notes=(f"Keras {entry.keras_name}, preprocessing mode {entry.mode!r}",),
    )
    cfg.update(overrides)
    return cfg
