"""Convert a Keras weight file into a timm state dict and save it as safetensors."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from converters import CONVERTER_VERSION
from converters.align import align
from converters.errors import LayerMismatchError, WeightFileError
from converters.h5 import read_keras_weights
from converters import layouts
from converters.layouts import flip_input_channels
from converters.digest import file_digest
from converters.manifest import load_manifest
from converters.spec import KerasModelSpec, StateDict


@dataclass
class Converted:
    state_dict: StateDict
    metadata: Dict[str, str]

    @property
    def include_top(self) -> bool:
        return self.metadata["include_top"] == "true"


@functools.lru_cache(maxsize=None)
def _reference_shapes(timm_arch: str, include_top: bool) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    import timm

    with torch.device("meta"):  # keys and shapes only: no memory, no initialisation of real tensors
        model = timm.create_model(timm_arch, pretrained=False, num_classes=1000 if include_top else 0)
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


def check_against_model(state_dict: StateDict, entry: KerasModelSpec, include_top: bool) -> StateDict:
    """Fill BatchNorm step counters, then require exactly the model's keys and shapes (``entry.timm_arch``)."""
    reference = _reference_shapes(entry.timm_arch, include_top)
    for key, (shape, dtype) in reference.items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros(shape, dtype=dtype)
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    wrong = [f"{k}: converted {tuple(state_dict[k].shape)} vs model {tuple(shape)}"
             for k, (shape, _) in reference.items() if k in state_dict and state_dict[k].shape != shape]
    if missing or unexpected or wrong:
        raise LayerMismatchError(
            f"conversion for {entry.keras_name} does not fill {entry.timm_arch}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )
    return {k: state_dict[k] for k in reference}


def convert(entry: KerasModelSpec, h5_path: os.PathLike | str, dtype: torch.dtype = torch.float32) -> Converted:
    """Convert a Keras Applications weight file (top or notop, legacy ``.h5`` or ``.weights.h5``).

    ``dtype=torch.float64`` is for the float64 parity mode: the same values, with the one piece
    of arithmetic a mapping may do (folding a conv bias into a BatchNorm mean) left unrounded.
    """
    weights = read_keras_weights(h5_path)
    layers, include_top = align(weights, load_manifest(entry.manifest_path), entry.keras_name,
                                getattr(entry, "legacy_layer_name", None))
    with layouts.precision({torch.float32: np.float32, torch.float64: np.float64}[dtype]):
        state_dict = entry.to_timm(layers, include_top)
    if entry.bgr:
        key = f"{entry.first_conv}.weight"
        state_dict[key] = flip_input_channels(state_dict[key])
    state_dict = check_against_model(state_dict, entry, include_top)
    metadata = {
        "keras_model": entry.keras_name,
        "timm_arch": entry.timm_arch,
        "include_top": "true" if include_top else "false",
        "source_file": Path(h5_path).name,
        "source_sha256": file_digest(h5_path, "sha256"),
        "source_md5": file_digest(h5_path, "md5"),  # what the zoo's registry lists for the official files
        "source_layout": weights.layout,
        "preprocessing_mode": entry.mode,
        "mean": json.dumps(entry.mean),
        "std": json.dumps(entry.std),
        "bgr_folded_into": f"{entry.first_conv}.weight" if entry.bgr else "",
        "converter_version": CONVERTER_VERSION,
    }
    return Converted(state_dict, metadata)


def save_converted(converted: Converted, out_path: os.PathLike | str) -> Path:
    """Write ``.safetensors`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in converted.state_dict.items()}, str(tmp), metadata=converted.metadata)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def load_converted(path: os.PathLike | str) -> Tuple[StateDict, Dict[str, str]]:
    """Read a converted ``.safetensors`` file: (state dict, metadata)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise WeightFileError(f"{path}: not a readable .safetensors file ({err}); convert it again") from err
    return state_dict, metadata
