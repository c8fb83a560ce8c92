"""Build Keras Applications models for reference (needs Keras 3 on the torch backend).

Used by the manifest generator, the parity checks and the tests; never at conversion time.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Tuple

from converters.spec import KerasModelSpec


def import_keras():
    """Import Keras 3 on the torch backend (never TensorFlow), on the CPU; clear error if it is missing."""
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


@contextlib.contextmanager
def keras_floatx(dtype: str) -> Iterator[None]:
    """Build and run Keras models in ``dtype`` (``"float64"`` for the float64 parity mode).

    ``keras.config.set_floatx`` makes every layer's variables and compute dtype float64, but on
    the torch (and JAX) backend Keras's type promotion still collapses float64 to float32:
    ``backend.result_type`` maps its result through ``BIT64_TO_BIT32_DTYPE`` ("float64" ->
    "float32" unless the backend is TensorFlow, to follow JAX's x64-disabled default). The layers
    that upcast for stability with ``result_type(x.dtype, "float32")`` (BatchNormalization,
    LayerNormalization, ``ops.mean`` / ``ops.var`` and so global average pooling) therefore
    compute in float32 and cast back to float64: BatchNormalization alone is 1e-7 off. Within
    this context that one mapping is lifted, so float64 stays float64 (restored on exit).
    """
    from keras.src.backend.common import dtypes

    keras = import_keras()
    old_floatx, old_map = keras.config.floatx(), dtypes.BIT64_TO_BIT32_DTYPE.get("float64")
    keras.config.set_floatx(dtype)
    if dtype == "float64":
        dtypes.BIT64_TO_BIT32_DTYPE["float64"] = "float64"
    try:
        yield
    finally:
        keras.config.set_floatx(old_floatx)
        dtypes.BIT64_TO_BIT32_DTYPE["float64"] = old_map


def seed_keras(seed: int) -> None:
    """``keras.utils.set_random_seed`` without importing TensorFlow (it seeds TF when installed: 9 s, 1 GB).

    Seeds Python, NumPy, torch and Keras's global seed generator, as Keras does on the torch backend.
    """
    import random

    import numpy as np
    import torch

    import_keras()
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def zero_initialised_variables() -> Iterator[None]:
    """Keras variables created filled with zeros instead of drawn from their initialisers.

    For builds whose values do not matter: a layer manifest (names, classes, shapes), or a model
    whose weights are loaded right after. Drawing the random initial kernels is most of a big
    model's build time (ConvNeXtXLarge notop: 100 s against 8 s on the shared 2-core machine);
    names and shapes do not depend on it.
    """
    from keras.src import initializers
    from keras.src.backend.common import variables

    import_keras()
    original = variables.Variable._initialize_with_initializer
    zeros = initializers.Zeros()

    def initialise_with_zeros(self, initializer):
        original(self, zeros)

    variables.Variable._initialize_with_initializer = initialise_with_zeros
    try:
        yield
    finally:
        variables.Variable._initialize_with_initializer = original


def build_keras_model(spec: KerasModelSpec, include_top: bool, input_size: int | None = None, fresh: bool = True,
                      initialise: bool = True):
    """Keras model with ``weights=None`` and an explicit input shape; logits, not softmax, on top.

    ``initialise=False``: variables are zeros (``zero_initialised_variables``), for a manifest or a load.
    """
    keras = import_keras()
    if fresh:
        keras.utils.clear_session()  # auto names (conv2d, conv2d_1, ...) start from zero
    size = input_size or spec.input_size
    kwargs = dict(weights=None, include_top=include_top, input_shape=(size, size, 3))
    if include_top:
        kwargs["classifier_activation"] = None
    elif getattr(spec, "keras_pooled_notop", None) is not None:
        kwargs["pooling"] = "avg"  # the notop reference is pooled (see converters.spec)
    kwargs.update(spec.keras_kwargs)
    with contextlib.nullcontext() if initialise else zero_initialised_variables():
        try:
            return getattr(keras.applications, spec.application)(**kwargs)
        except ValueError as err:
            fallback = _TORCH_BACKEND_FALLBACKS.get(spec.application)
            if fallback is None or "torch backend" not in str(err):
                raise
            return fallback()(**kwargs)


def _nasnet_mobile():
    """Keras's ``NASNetMobile`` graph through its generic builder ``nasnet.NASNet``, with its arguments.

    Keras <= 3.15 refuses ``NASNetMobile`` on the torch backend ("outstanding bug", keras-team/keras
    #18451: pretrained predictions were wrong); keras-team/keras#23177 removed the guard upstream. With
    the installed Keras the graph it builds agrees with ``NASNetMobile`` on the JAX and TensorFlow
    backends (same random weights: 4.3e-6 / 3.5e-6 relative logits), so it serves as the reference.
    """
    import functools

    from keras.src.applications import nasnet

    return functools.partial(nasnet.NASNet, penultimate_filters=1056, num_blocks=4, stem_block_filters=32,
                             skip_reduction=False, filter_multiplier=2, default_size=224, name="nasnet_mobile")


#: applications that Keras refuses to build on the torch backend -> the same graph built another way
_TORCH_BACKEND_FALLBACKS = {"NASNetMobile": _nasnet_mobile}


def top_and_features(spec: KerasModelSpec, input_size: int | None = None, initialise: bool = True
                     ) -> Tuple[object, object]:
    """The Keras top model and, sharing its layers, the notop feature model (``include_top=False``).

    The notop model ends at the manifest's ``notop_output`` layer (where Keras's
    ``include_top=False`` model ends), so one build serves both; where the spec has
    ``keras_pooled_notop`` (no such cut exists), that function builds the notop output on the top's layers.
    """
    from converters.manifest import load_manifest

    keras = import_keras()
    top = build_keras_model(spec, True, input_size, initialise=initialise)
    pooled_notop = getattr(spec, "keras_pooled_notop", None)
    if pooled_notop is not None:
        with contextlib.nullcontext() if initialise else zero_initialised_variables():
            output = pooled_notop(top)
    else:
        output = top.get_layer(load_manifest(spec.manifest_path)["notop_output"]).output
    return top, keras.Model(top.inputs, output, name=f"{spec.keras_name}_notop")
