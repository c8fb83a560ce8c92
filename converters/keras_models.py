"""Build Keras Applications models for reference (needs Keras 3 on the torch backend).

Used by the manifest generator, the parity checks and the tests; never at conversion time.
"""
from __future__ import annotations

import os
from typing import Tuple

from lightning_app.zoo.registry import ZooEntry


def import_keras():
    """Import Keras 3 on the torch backend (never TensorFlow); clear error if it is missing."""
    backend = os.environ.setdefault("KERAS_BACKEND", "torch")
    # Keras's torch backend puts every tensor on CUDA when CUDA exists (keras/src/backend/torch/core.py), where
    # convolutions run in TF32 by default: the reference must be true float32, on the CPU, on every machine.
    os.environ.setdefault("KERAS_TORCH_DEVICE", "cpu")
    try:
        import keras
    except ImportError as err:
        raise ImportError(
            "Keras 3 is needed for parity checks and manifests: pip install -e '.[test]' "
            "(it runs with KERAS_BACKEND=torch)"
        ) from err
    if keras.backend.backend() != "torch" or backend != "torch":
        raise RuntimeError(f"Keras must run on the torch backend here, got {keras.backend.backend()!r}: "
                           "set KERAS_BACKEND=torch before importing keras")
    return keras


def build_keras_model(entry: ZooEntry, include_top: bool, input_size: int | None = None, fresh: bool = True):
    """Keras model with ``weights=None`` and an explicit input shape; logits, not softmax, on top."""
    keras = import_keras()
    if fresh:
        keras.utils.clear_session()  # auto names (conv2d, conv2d_1, ...) start from zero
    size = input_size or entry.input_size
    kwargs = dict(weights=None, include_top=include_top, input_shape=(size, size, 3))
    if include_top:
        kwargs["classifier_activation"] = None
    kwargs.update(entry.keras_kwargs)
    return getattr(keras.applications, entry.keras_name)(**kwargs)


def top_and_features(entry: ZooEntry, input_size: int | None = None) -> Tuple[object, object]:
    """The Keras top model and, sharing its layers, the notop feature model (``include_top=False``)."""
    keras = import_keras()
    notop_names = {layer.name for layer in build_keras_model(entry, False, input_size).layers}
    top = build_keras_model(entry, True, input_size)
    first_top_layer = next(layer for layer in top.layers if layer.name not in notop_names)
    features = keras.Model(top.inputs, first_top_layer.input, name=f"{entry.keras_name}_notop")
    return top, features
