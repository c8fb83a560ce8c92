"""Run Keras (optional dependency, torch backend) beside our timm model on the same images.

The equivalence proof used by the tests and ``python -m converters verify``: build the
Keras model with ``weights=None``, give it non-trivial weights (random kernels and biases,
random BatchNorm affine, moving statistics calibrated on a batch so signal survives
depth), save it in the legacy ``.h5`` layout of the official files, convert it with our
converter, and compare outputs on real images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from converters.keras_models import import_keras
from lightning_app.zoo.registry import ZooEntry

#: max |ours - keras| <= TOLERANCE * max |keras| in float32 (ARCHITECTURE.md decision 2)
TOLERANCE = 1e-4


@dataclass
class ParityReport:
    model: str
    include_top: bool
    input_size: int
    max_abs_diff: float
    max_abs_ref: float
    top1_agree: Optional[float] = None

    @property
    def rel_error(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-30)

    @property
    def ok(self) -> bool:
        return self.rel_error <= TOLERANCE

    def __str__(self) -> str:
        kind = "top" if self.include_top else "notop"
        agree = "" if self.top1_agree is None else f", top-1 agreement {self.top1_agree:.0%}"
        return (f"{self.model} {kind} @{self.input_size}: max|diff| {self.max_abs_diff:.3g}, "
                f"max|keras| {self.max_abs_ref:.3g}, relative {self.rel_error:.2e} "
                f"({'ok' if self.ok else 'FAIL'}, tolerance {TOLERANCE:g}){agree}")


def sample_images(size: int, count: int = 2) -> np.ndarray:
    """Real photos (skimage.data) resized to ``size``: float32 NHWC in [0, 1]."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
           for p in photos[:count]]
    return np.stack(out)


def randomize_keras_model(model, calibration_images: np.ndarray, mode: str, seed: int = 0) -> None:
    """Non-trivial weights: random biases and BN affine, BN statistics calibrated on a batch."""
    keras = import_keras()
    rng = np.random.default_rng(seed)
    batchnorms = []
    for layer in model.layers:
        for variable in layer.weights:
            role = variable.name.rsplit("/", 1)[-1]
            shape = tuple(variable.shape)
            if role == "bias":
                variable.assign(rng.normal(0.0, 0.1, shape).astype("float32"))
            elif role == "gamma":
                variable.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
            elif role == "beta":
                variable.assign(rng.normal(0.0, 0.2, shape).astype("float32"))
        if isinstance(layer, keras.layers.BatchNormalization):
            batchnorms.append((layer, layer.momentum))
            layer.momentum = 0.0  # one training-mode pass sets moving stats to the batch stats
    x = keras_preprocess(calibration_images, mode)
    model(x, training=True)
    for layer, momentum in batchnorms:
        layer.momentum = momentum


def keras_preprocess(images01: np.ndarray, mode: str) -> np.ndarray:
    """Keras's own ``preprocess_input`` on 0..255 RGB."""
    from keras.src.applications import imagenet_utils

    return imagenet_utils.preprocess_input(images01 * 255.0, data_format="channels_last", mode=mode)


def save_legacy_h5(model, path: os.PathLike | str) -> Path:
    """Save weights in the legacy Keras 2 HDF5 layout of the official Applications files."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path = Path(path)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def keras_outputs(model, images01: np.ndarray, mode: str) -> np.ndarray:
    out = model(keras_preprocess(images01, mode), training=False)
    return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


@torch.no_grad()
def timm_outputs(model: torch.nn.Module, images01: np.ndarray, entry: ZooEntry, include_top: bool) -> np.ndarray:
    """Our model on [0, 1] RGB input normalised with the entry's (mean, std); NHWC features."""
    x = torch.from_numpy(images01).permute(0, 3, 1, 2)
    mean = torch.tensor(entry.mean).view(1, 3, 1, 1)
    std = torch.tensor(entry.std).view(1, 3, 1, 1)
    model.eval()
    x = (x - mean) / std
    if include_top:
        return model(x).numpy()
    return model.forward_features(x).permute(0, 2, 3, 1).numpy()


def compare(entry: ZooEntry, keras_out: np.ndarray, ours: np.ndarray, include_top: bool, size: int) -> ParityReport:
    if keras_out.shape != ours.shape:
        raise AssertionError(f"{entry.keras_name}: output shapes differ, Keras {keras_out.shape} vs ours {ours.shape}")
    agree = float((keras_out.argmax(-1) == ours.argmax(-1)).mean()) if include_top else None
    return ParityReport(entry.keras_name, include_top, size, float(np.abs(keras_out - ours).max()),
                        float(np.abs(keras_out).max()), agree)


def load_into_timm(entry: ZooEntry, converted_path: os.PathLike | str) -> torch.nn.Module:
    """Our zoo model built through the public entry point from a converted file."""
    from lightning_app.zoo import create_backbone
    from converters.convert import load_converted

    _, metadata = load_converted(converted_path)
    num_classes = None if metadata.get("include_top") == "true" else 0
    return create_backbone(entry.keras_name, weights=converted_path, num_classes=num_classes)


def run_random_parity(entry: ZooEntry, workdir: os.PathLike | str, input_size: Optional[int] = None,
                      num_images: int = 2, seed: int = 0) -> list[ParityReport]:
    """Random-weight Keras model -> legacy .h5 (top and notop) -> convert -> compare both."""
    from converters.convert import convert, save_converted
    from converters.keras_models import top_and_features

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    workdir = Path(workdir)
    size = input_size or entry.input_size
    top, features = top_and_features(entry, size)
    randomize_keras_model(top, sample_images(size, 4), entry.mode, seed)
    images = sample_images(size, num_images)[::-1].copy()
    reports = []
    for include_top, keras_model in ((True, top), (False, features)):
        kind = "top" if include_top else "notop"
        h5_path = save_legacy_h5(keras_model, workdir / f"{entry.keras_name}_{kind}.h5")
        out = save_converted(convert(entry.keras_name, h5_path), workdir / f"{entry.keras_name}_{kind}.safetensors")
        ours = timm_outputs(load_into_timm(entry, out), images, entry, include_top)
        reports.append(compare(entry, keras_outputs(keras_model, images, entry.mode), ours, include_top, size))
    return reports


def verify_file(entry: ZooEntry, h5_path: os.PathLike | str, input_size: Optional[int] = None,
                num_images: int = 2) -> ParityReport:
    """Keras loading ``h5_path`` itself vs our conversion of the same file, on real images."""
    import tempfile

    from converters.convert import convert, save_converted
    from converters.keras_models import build_keras_model

    converted = convert(entry.keras_name, h5_path)
    size = input_size or entry.input_size
    keras_model = build_keras_model(entry, converted.include_top, size)
    keras_model.load_weights(str(h5_path))
    images = sample_images(size, num_images)
    with tempfile.TemporaryDirectory() as tmp:
        ours = load_into_timm(entry, save_converted(converted, Path(tmp) / "converted.safetensors"))
        ours_out = timm_outputs(ours, images, entry, converted.include_top)
    return compare(entry, keras_outputs(keras_model, images, entry.mode), ours_out, converted.include_top, size)
