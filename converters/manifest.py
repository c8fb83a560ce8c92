"""Layer manifests: the Keras ``model.layers`` order of the layers that have weights.

Keras loads a weight file by ORDER (the i-th layer with weights in the file goes to
the i-th layer with weights in the model), not by name: official files may name
layers differently (``conv2d_1`` vs ``conv2d``) and Keras 3 ``.weights.h5`` files
keep only class-based names. A manifest records, per model and for the top and
notop variants, each such layer's Keras name (as a fresh Keras 3 session names
it), snake-case class and weight roles/shapes. It is generated from Keras
(``python -m converters manifest``) and checked against Keras by the tests.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

from lightning_app.zoo.registry import ZooEntry, get_entry

MANIFEST_DIR = Path(__file__).with_name("manifests")


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


def build_manifest(entry: ZooEntry) -> Dict[str, List[LayerSpec]]:
    """Build both manifests (top, notop) from Keras (needs Keras 3)."""
    from converters.keras_models import build_keras_model

    return {kind: manifest_from_keras_model(build_keras_model(entry, kind == "top"))
            for kind in ("top", "notop")}


def _to_json(specs: List[LayerSpec]) -> list:
    return [[s.name, s.keras_class, [[r, list(sh)] for r, sh in zip(s.roles, s.shapes)]] for s in specs]


def _from_json(rows: list) -> List[LayerSpec]:
    return [LayerSpec(name, cls, tuple(r for r, _ in ws), tuple(tuple(sh) for _, sh in ws)) for name, cls, ws in rows]


def write_manifest(entry: ZooEntry, directory: Path = MANIFEST_DIR) -> Path:
    import keras

    manifests = build_manifest(entry)
    path = directory / f"{entry.keras_name}.json"
    payload = {"keras_name": entry.keras_name, "keras_version": keras.__version__,
               "input_size": entry.input_size, **{k: _to_json(v) for k, v in manifests.items()}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


@lru_cache(maxsize=None)
def load_manifest(keras_name: str) -> Dict[str, List[LayerSpec]]:
    """The committed manifests of a zoo model: ``{"top": [...], "notop": [...]}``."""
    entry = get_entry(keras_name)
    path = MANIFEST_DIR / f"{entry.keras_name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no layer manifest for {entry.keras_name} at {path}; "
                                f"generate it with: python -m converters manifest --model {entry.keras_name}")
    payload = json.loads(path.read_text())
    return {kind: _from_json(payload[kind]) for kind in ("top", "notop")}
