"""Pair the layers of a Keras weight file with a model's manifest, as Keras does (by order), and
check the names where the file has them.

Keras loads a legacy ``.h5`` file by ORDER: the i-th layer with weights in the file goes to the
i-th layer with weights in the model, names unused. Order alone cannot tell two layers of the same
shapes apart, so after the shapes fit we also compare names:

* legacy files name layers (``layer_names``) and weights (``weight_names``, e.g. ``conv2d_1/kernel:0``,
  or Keras 1's ``block1_conv1_W_1:0``). A layer Keras names itself (``block1_conv1``) must carry
  exactly that name, or the name an older Keras gave it, where the model says how Keras renamed its
  layers since (``legacy_name``: MobileNetV3's ``expanded_conv/depthwise/BatchNorm`` is Keras 3's
  ``expanded_conv_depthwise_bn``; MobileNetV2's Dense was ``Logits``, now ``predictions``). An auto-named layer (``conv2d``, ``conv2d_7``: class name + counter) must be of
  the same class, and the file's counters must run in the manifest's order: official files were
  saved by Keras 2, whose counters start at 1 (``conv2d_1`` for Keras 3's ``conv2d``), so the
  numbers may be shifted, but never permuted. Weight roles (``kernel``, ``gamma``, ...) must be the
  manifest's, in its order.
* Keras 3 ``.weights.h5`` files keep only class-based auto names (``layers/conv2d_3/vars/0``):
  layers are paired per class, the k-th ``conv2d`` of the file with the model's k-th ``Conv2D``,
  so the class always agrees and the shapes are what is checked.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Tuple

from converters.errors import LayerMismatchError
from converters.h5 import KerasWeights, LayerWeights
from converters.manifest import LayerSpec
from converters.spec import KerasLayers

__all__ = ["KerasLayers", "align", "check_names"]

Pair = Tuple[LayerWeights, Optional[LayerSpec]]

#: Keras 1 weight-name suffixes (``block1_conv1_W_1:0``) -> Keras 2/3 roles
_KERAS1_ROLES = {"W": "kernel", "b": "bias", "gamma": "gamma", "beta": "beta",
                 "running_mean": "moving_mean", "running_std": "moving_variance"}


def _describe(layer: LayerWeights) -> str:
    roles = layer.roles or [f"vars/{i}" for i in range(len(layer.arrays))]
    return f"{layer.name!r} " + ", ".join(f"{r} {tuple(s)}" for r, s in zip(roles, layer.shapes))


def _describe_spec(spec: LayerSpec) -> str:
    return f"{spec.name!r} " + ", ".join(f"{r} {tuple(s)}" for r, s in zip(spec.roles, spec.shapes))


def _first_mismatch(pairs: List[Pair]) -> Optional[int]:
    for k, (layer, spec) in enumerate(pairs):
        if tuple(layer.shapes) != tuple(spec.shapes):
            return k
    return None


def _legacy_pairs(weights: KerasWeights, manifest: List[LayerSpec]) -> List[Pair]:
    return list(zip(weights.layers, manifest))


def _keras3_pairs(weights: KerasWeights, manifest: List[LayerSpec]) -> List[Pair]:
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


def _auto_index(name: str, keras_class: str) -> Optional[int]:
    """``conv2d`` -> 0, ``conv2d_7`` -> 7 for class ``conv2d``; None for any other name."""
    if name == keras_class:
        return 0
    m = re.fullmatch(rf"{re.escape(keras_class)}_(\d+)", name)
    return int(m.group(1)) if m else None


def _normalise_role(role: str, layer_name: str, vocabulary: set) -> Optional[str]:
    """A file's weight role in Keras 3 terms (``kernel``, ``gamma``, ...); None if not recognisable."""
    if role in vocabulary:
        return role
    if role.startswith(layer_name + "_"):  # Keras 1: block1_conv1_W_1 -> W
        suffix = re.sub(r"_\d+$", "", role[len(layer_name) + 1:])
        return _KERAS1_ROLES.get(suffix)
    return None


def check_names(pairs: List[Pair], manifest: List[LayerSpec], where: str,
                legacy_name: Optional[Callable[[str], str]] = None) -> None:
    """Refuse a legacy file whose layer or weight names disagree with the manifest (see module doc).

    ``pairs`` are (file layer, manifest layer) in file order; ``where`` names file and model for errors;
    ``legacy_name`` maps a layer name of an older Keras's file to the Keras 3 name (default: the last
    ``/`` component).
    """
    vocabulary = {role for spec in manifest for role in spec.roles}
    counters: Dict[str, List[Tuple[int, int, int]]] = defaultdict(list)  # class -> (manifest no., file no., #)
    for k, (layer, spec) in enumerate(pairs):
        name = legacy_name(layer.name) if legacy_name else layer.name.split("/")[-1]
        expected = _auto_index(spec.name, spec.keras_class)
        if expected is None:
            if name != spec.name:
                raise LayerMismatchError(
                    f"{where}: layer #{k} in the file is named {name!r} where Keras has {spec.name!r} "
                    f"(same shapes {[tuple(s) for s in spec.shapes]}). The file's layers are in another order "
                    "than the model's, so loading it by order would put weights into the wrong layers.")
        else:
            got = _auto_index(name, spec.keras_class)
            if got is None:
                raise LayerMismatchError(
                    f"{where}: layer #{k} in the file is named {name!r} where Keras has its auto-named "
                    f"{spec.keras_class} layer {spec.name!r}. The file's layers are in another order than the "
                    "model's, so loading it by order would put weights into the wrong layers.")
            counters[spec.keras_class].append((expected, got, k))
        if layer.roles:
            roles = [_normalise_role(r, name, vocabulary) for r in layer.roles]
            if None not in roles and tuple(roles) != tuple(spec.roles):
                raise LayerMismatchError(
                    f"{where}: layer #{k} {name!r} stores weights {layer.roles}, Keras expects {list(spec.roles)} "
                    "in that order.")
    for keras_class, numbers in counters.items():
        numbers.sort()  # by the manifest's counter: the file's counters must increase with it
        for (exp_a, got_a, k_a), (exp_b, got_b, k_b) in zip(numbers, numbers[1:]):
            if got_b <= got_a:
                names = {i: pairs[i][0].name for i in (k_a, k_b)}
                raise LayerMismatchError(
                    f"{where}: layer #{k_a} in the file is {names[k_a]!r} where Keras has {pairs[k_a][1].name!r}, "
                    f"but layer #{k_b} is {names[k_b]!r} where Keras has {pairs[k_b][1].name!r}: the file numbers "
                    f"its {keras_class} layers in another order than Keras, so its layers are in another order "
                    "and loading it by order would put weights into the wrong layers.")


def align(weights: KerasWeights, manifests: Dict[str, List[LayerSpec]], model_name: str,
          legacy_name: Optional[Callable[[str], str]] = None) -> Tuple[KerasLayers, bool]:
    """Match a file to the top or notop manifest; return ``(layers by Keras name, include_top)``.

    ``legacy_name``: how Keras renamed the model's layers since the official files were saved (``check_names``).

    Raises:
        LayerMismatchError: naming the first layer whose weights differ, with both shapes, or the
            first layer whose name disagrees with the manifest, with both names.
    """
    pair_fn = _legacy_pairs if weights.layout == "legacy" else _keras3_pairs
    candidates = {}
    for kind in ("top", "notop"):
        pairs = pair_fn(weights, manifests[kind])
        mismatch = _first_mismatch([(l, s) for l, s in pairs if s is not None])
        complete = len(weights.layers) == len(manifests[kind]) and all(s is not None for _, s in pairs)
        if mismatch is None and complete:
            if weights.layout == "legacy":
                variant = "with top" if kind == "top" else "without top (notop)"
                check_names(pairs, manifests[kind], f"{weights.path} as Keras {model_name} {variant}", legacy_name)
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
