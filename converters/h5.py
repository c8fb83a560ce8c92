"""Read Keras weight files with h5py alone (no Keras import).

Two layouts are understood:

* legacy Keras 2 HDF5 (the official Applications files): root attribute
  ``layer_names`` (possibly chunked as ``layer_names0..N``), each layer group has
  ``weight_names`` whose datasets sit at ``group[layer][weight_name]``; full-model
  files hold the same under ``model_weights``. Layers come in ``model.layers`` order.
* Keras 3 ``.weights.h5``: ``layers/<class-based name>/vars/<i>``; names are
  ``conv2d``, ``conv2d_1``, ... per class in ``model.layers`` order, user names are lost.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import h5py
import numpy as np

from converters.errors import WeightFileError


@dataclass
class LayerWeights:
    """The weights of one Keras layer, in the order Keras stores them."""

    name: str  # layer name in the file
    arrays: List[np.ndarray]
    roles: Optional[List[str]] = None  # e.g. ["kernel", "bias"]; None in .weights.h5 files
    keras_class: Optional[str] = None  # snake-case class name (``.weights.h5`` only)

    @property
    def shapes(self) -> List[tuple]:
        return [tuple(a.shape) for a in self.arrays]


@dataclass
class KerasWeights:
    """All layers with weights in a Keras weight file."""

    path: Path
    layout: str  # "legacy" | "keras3"
    layers: List[LayerWeights] = field(default_factory=list)


def _decode(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _chunked_attr(group: h5py.Group, name: str) -> List[str]:
    """Read an attribute Keras may have split into ``name0``, ``name1``, ... when too long."""
    if name in group.attrs:
        return [_decode(v) for v in group.attrs[name]]
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
        values.extend(_decode(v) for v in group.attrs[f"{name}{chunk}"])
        chunk += 1
    return values


def _role(weight_name: str) -> str:
    """``conv2d_1/kernel:0`` -> ``kernel``."""
    return re.sub(r":\d+$", "", weight_name).rsplit("/", 1)[-1]


def _read_legacy(root: h5py.Group, path: Path) -> KerasWeights:
    result = KerasWeights(path, "legacy")
    for layer_name in _chunked_attr(root, "layer_names"):
        if layer_name not in root:
            raise WeightFileError(f"{path}: layer {layer_name!r} is listed in layer_names but has no group")
        group = root[layer_name]
        weight_names = _chunked_attr(group, "weight_names")
        if not weight_names:
            continue
        arrays = []
        for weight_name in weight_names:
            if weight_name not in group:
                raise WeightFileError(f"{path}: dataset {weight_name!r} of layer {layer_name!r} is missing")
            arrays.append(np.asarray(group[weight_name], dtype=np.float32))
        result.layers.append(LayerWeights(layer_name, arrays, [_role(w) for w in weight_names]))
    return result


_AUTO_NAME = re.compile(r"^(?P<cls>.+?)(?:_(?P<idx>\d+))?$")


def _read_keras3(root: h5py.Group, path: Path) -> KerasWeights:
    result = KerasWeights(path, "keras3")
    for name, group in root["layers"].items():
        if "vars" not in group or not len(group["vars"]):
            continue
        variables = group["vars"]
        arrays = [np.asarray(variables[str(i)], dtype=np.float32) for i in range(len(variables))]
        cls = _AUTO_NAME.match(name).group("cls")
        result.layers.append(LayerWeights(name, arrays, None, cls))
    # h5py lists groups alphabetically; restore model.layers order within each class.
    result.layers.sort(key=lambda layer: (layer.keras_class, int(_AUTO_NAME.match(layer.name).group("idx") or 0)))
    return result


def read_keras_weights(path: os.PathLike | str) -> KerasWeights:
    """Read every layer with weights from a legacy ``.h5`` or a Keras 3 ``.weights.h5`` file."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise WeightFileError(f"{path}: the file is empty (an interrupted download?); delete it and fetch it again")
    if not h5py.is_hdf5(path):
        raise WeightFileError(
            f"{path}: not an HDF5 file; expected a Keras weight file (.h5 or .weights.h5). "
            "A truncated or interrupted download looks like this too: delete it and fetch it again"
        )
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs or "layer_names0" in f.attrs:
                weights = _read_legacy(f, path)
            elif "model_weights" in f:
                weights = _read_legacy(f["model_weights"], path)
            elif "layers" in f:
                weights = _read_keras3(f, path)
            else:
                raise WeightFileError(
                    f"{path}: an HDF5 file, but not a Keras weight file (no layer_names, model_weights or layers)"
                )
    except (OSError, KeyError, RuntimeError) as err:  # h5py raises these on truncated data
        raise WeightFileError(f"{path}: unreadable HDF5 data ({err}); the file is probably truncated") from err
    if not weights.layers:
        raise WeightFileError(f"{path}: the file holds no layer weights")
    return weights
