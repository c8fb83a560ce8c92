"""What the converter library needs to know about a Keras model.

The library never looks models up itself: callers (the zoo, the CLI, tests) hand it an
object with these attributes, e.g. a ``lightning_app.zoo.ZooEntry``. Dependencies point one
way: ``lightning_app.zoo`` imports ``converters``; the library modules never import ``lightning_app``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Protocol, Tuple

import numpy as np
import torch

#: Keras layer name -> {weight role: array}
KerasLayers = Dict[str, Dict[str, np.ndarray]]
StateDict = Dict[str, torch.Tensor]


class KerasModelSpec(Protocol):
    """A Keras Applications model and the timm architecture that reproduces it."""

    keras_name: str  #: unique model name (recorded in converted files), e.g. ``"MobileNetV2_035_96"``
    application: str  #: the ``keras.applications`` function, e.g. ``"MobileNetV2"``
    keras_kwargs: Mapping[str, Any]  #: extra arguments of that function, e.g. ``{"alpha": 0.35}``
    timm_arch: str  #: registered timm model name
    input_size: int  #: native (square) input size
    mode: str  #: preprocessing mode (a key of ``converters.preprocessing.PREPROCESSING``)
    builtin_preprocessing: bool  #: Keras normalises inside the model (feed it 0..255 RGB)
    first_conv: str  #: timm parameter prefix of the first conv (where a BGR flip is folded)
    manifest_path: Path  #: the committed layer manifest (``converters.manifest``)
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    bgr: bool

    # Optional: ``legacy_layer_name(name) -> str``, the Keras 3 name of a layer as an older Keras named it in
    # the official files (``converters.align.check_names``); absent or None: names are compared as they are.
    # Optional: ``keras_pooled_notop(keras_top_model) -> keras tensor``, Keras's ``include_top=False,
    # pooling="avg"`` output built on the top model's layers, for models whose notop model is no cut of the top
    # model (ConvNeXt appends its own LayerNormalization, which does not commute with pooling). With it, the
    # Keras notop reference is ``pooling="avg"`` and ours is ``model(x)`` with ``num_classes=0`` (``parity``).

    def to_timm(self, layers: KerasLayers, include_top: bool) -> StateDict:
        """Keras layers (manifest names) -> timm state dict."""
