"""Pair the layers of a Keras weight file with a model's manifest, as Keras does (by order)."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np

from converters.errors import LayerMismatchError
from converters.h5 import KerasWeights, LayerWeights
from converters.manifest import LayerSpec

#: Keras layer name -> {weight role: array}
KerasLayers = Dict[str, Dict[str, np.ndarray]]


def _describe(layer: LayerWeights) -> str:
    roles = layer.roles or [f"vars/{i}" for i in range(len(layer.arrays))]
    return f"{layer.name!r} " + ", ".join(f"{r} {tuple(s)}" for r, s in zip(roles, layer.shapes))


def _describe_spec(spec: LayerSpec) -> str:
    return f"{spec.name!r} " + ", ".join(f"{r} {tuple(s)}" for r, s in zip(spec.roles, spec.shapes))


def _first_mismatch(pairs: List[Tuple[LayerWeights, LayerSpec]]) -> int | None:
    for k, (layer, spec) in enumerate(pairs):
        if tuple(layer.shapes) != tuple(spec.shapes):
            return k
    return None


def _legacy_pairs(weights: KerasWeights, manifest: List[LayerSpec]) -> List[Tuple[LayerWeights, LayerSpec]]:
    return list(zip(weights.layers, manifest))


def _keras3_pairs(weights: KerasWeights, manifest: List[LayerSpec]) -> List[Tuple[LayerWeights, LayerSpec]]:
    by_class: Dict[str, List[LayerSpec]] = defaultdict(list)
    for spec in manifest:
        by_class[spec.keras_class].append(spec)
    seen: Dict[str, int] = defaultdict(int)
    pairs = []
    for layer in weights.layers:  # sorted by class, then index
        specs = by_class.get(layer.keras_class, [])
        k = seen[layer.keras_class]
        seen[layer.keras_class] += 1
        pairs.append((layer, specs[k] if k < len(specs) else None))
    # keep manifest order so error messages name the earliest layer
    order = {spec.name: i for i, spec in enumerate(manifest)}
    pairs.sort(key=lambda p: order[p[1].name] if p[1] is not None else len(order))
    return pairs


def align(weights: KerasWeights, manifests: Dict[str, List[LayerSpec]], model_name: str) -> Tuple[KerasLayers, bool]:
    """Match a file to the top or notop manifest; return ``(layers by Keras name, include_top)``.

    Raises:
        LayerMismatchError: naming the first layer whose weights differ, with both shapes.
    """
    pair_fn = _legacy_pairs if weights.layout == "legacy" else _keras3_pairs
    candidates = {}
    for kind in ("top", "notop"):
        pairs = pair_fn(weights, manifests[kind])
        mismatch = _first_mismatch([(l, s) for l, s in pairs if s is not None])
        complete = len(weights.layers) == len(manifests[kind]) and all(s is not None for _, s in pairs)
        if mismatch is None and complete:
            return {spec.name: dict(zip(spec.roles, layer.arrays)) for layer, spec in pairs}, kind == "top"
        candidates[kind] = (mismatch, pairs)

    # Report against the variant whose layer count matches, else the one that matches longest.
    def score(kind: str) -> Tuple[bool, int]:
        mismatch, pairs = candidates[kind]
        return len(weights.layers) == len(manifests[kind]), len(pairs) if mismatch is None else mismatch

    kind = max(candidates, key=score)
    mismatch, pairs = candidates[kind]
    variant = "with top" if kind == "top" else "without top (notop)"
    if mismatch is not None:
        layer, spec = pairs[mismatch]
        raise LayerMismatchError(
            f"{weights.path} does not fit Keras {model_name} {variant}: layer #{mismatch} in the file, "
            f"{_describe(layer)}, but {model_name} expects {_describe_spec(spec)}. "
            "Is this the weight file of another model?"
        )
    raise LayerMismatchError(
        f"{weights.path} does not fit Keras {model_name}: the file has {len(weights.layers)} layers with weights, "
        f"{model_name} has {len(manifests['top'])} with top and {len(manifests['notop'])} without. "
        "Is this the weight file of another model?"
    )
