"""Layer manifests: the Keras ``model.layers`` order of the layers that have weights.

Keras loads a weight file by ORDER (the i-th layer with weights in the file goes to
the i-th layer with weights in the model), not by name: official files may name
layers differently (``conv2d_1`` vs ``conv2d``) and Keras 3 ``.weights.h5`` files
keep only class-based names. A manifest records, per model and for the top and
notop variants, each such layer's Keras name (as a fresh Keras 3 session names
it), snake-case class and weight roles/shapes. It is generated from Keras
(``python -m converters manifest --model NAME``) and checked against Keras by the tests.
Where it lives is the caller's choice (``spec.manifest_path``; the zoo keeps them in
``lightning_app/zoo/manifests/<name>.json``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Tuple

from converters.spec import KerasModelSpec


@dataclass(frozen=True)
class LayerSpec:
    name: str
    keras_class: str
    roles: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]


def _layer_spec(layer) -> LayerSpec:
    from keras.src.utils import naming
    from keras.src.legacy.saving.legacy_h5_format import _legacy_weights

    weights = _legacy_weights(layer)
    return LayerSpec(
        name=layer.name,
        keras_class=naming.to_snake_case(layer.__class__.__name__),
        roles=tuple(w.name.rsplit("/", 1)[-1] for w in weights),
        shapes=tuple(tuple(int(d) for d in w.shape) for w in weights),
    )


def manifest_from_keras_model(model) -> List[LayerSpec]:
    """Layers with weights of a Keras model, in the order Keras saves and loads them."""
    from keras.src.legacy.saving.legacy_h5_format import _legacy_weights

    return [_layer_spec(layer) for layer in model.layers if _legacy_weights(layer)]


def output_layer_name(model) -> str:
    """Name of the layer that produces a (single-output) Keras model's output."""
    return model.outputs[0]._keras_history[0].name


def build_manifest(spec: KerasModelSpec) -> Dict[str, Any]:
    """Build the manifest from Keras (needs Keras 3): ``top`` and ``notop`` layer lists, and
    ``notop_output``, the layer where the notop model ends (the parity harness cuts the top model there)."""
    from converters.keras_models import build_keras_model

    notop = build_keras_model(spec, False, initialise=False)
    manifest = {"notop": manifest_from_keras_model(notop), "notop_output": output_layer_name(notop)}
    manifest["top"] = manifest_from_keras_model(build_keras_model(spec, True, initialise=False))
    return manifest


def _to_json(specs: List[LayerSpec]) -> list:
    return [[s.name, s.keras_class, [[r, list(sh)] for r, sh in zip(s.roles, s.shapes)]] for s in specs]


def _from_json(rows: list) -> List[LayerSpec]:
    return [LayerSpec(name, cls, tuple(r for r, _ in ws), tuple(tuple(sh) for _, sh in ws)) for name, cls, ws in rows]


def write_manifest(spec: KerasModelSpec) -> Path:
    """Generate ``spec.manifest_path`` from Keras (atomically)."""
    from converters.keras_models import import_keras

    keras = import_keras()

    path = Path(spec.manifest_path)
    manifests = build_manifest(spec)
    payload = {"keras_name": path.stem, "application": spec.application,
               "keras_kwargs": dict(spec.keras_kwargs), "keras_version": keras.__version__,
               "input_size": spec.input_size, "notop_output": manifests["notop_output"],
               "top": _to_json(manifests["top"]), "notop": _to_json(manifests["notop"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    tmp.replace(path)
    load_manifest.cache_clear()
    return path


@lru_cache(maxsize=None)
def load_manifest(path: Path) -> Dict[str, Any]:
    """A committed manifest: ``{"top": [LayerSpec, ...], "notop": [...], "notop_output": layer name}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no layer manifest at {path}; generate it with: "
                                f"python -m converters manifest --model {path.stem}")
    payload = json.loads(path.read_text())
    return {"top": _from_json(payload["top"]), "notop": _from_json(payload["notop"]),
            "notop_output": payload.get("notop_output")}
