"""Run Keras (optional dependency, torch backend, on the CPU) beside our timm model on the same images.

The equivalence proof used by the tests and ``python -m converters verify``: build the
Keras model with ``weights=None``, give it non-trivial weights (random kernels and biases,
random BatchNorm affine, moving statistics calibrated on a batch so signal survives
depth), save it in the legacy ``.h5`` layout of the official files (top and notop), convert
them with our converter, and compare outputs on real images.

One Keras build serves top and notop: the notop model is the top model cut where Keras's
``include_top=False`` model ends (the manifest's ``notop_output``), and one forward pass of a
two-output model gives both references (``make_case``). ``check_case`` compares ours in
float32 (tolerance 1e-4 relative); ``check_case_float64`` runs Keras and ours again in float64
on the same files, with tolerance 1e-9: for very deep nets float32 rounding alone approaches
1e-4, and float64 leaves no room for an architecture error to hide behind rounding.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from converters.keras_models import import_keras, keras_floatx, seed_keras
from converters.manifest import manifest_from_keras_model
from converters.spec import KerasModelSpec

#: ``load_model(spec, converted_path, include_top) -> torch model`` (the zoo passes ``create_backbone``'s path)
ModelLoader = Callable[[KerasModelSpec, Path, bool], torch.nn.Module]

#: max |ours - keras| <= tolerance * max |keras| (ARCHITECTURE.md decision 3)
TOLERANCE = 1e-4
TOLERANCE_FLOAT64 = 1e-9
_TOLERANCES = {"float32": TOLERANCE, "float64": TOLERANCE_FLOAT64}
#: Keras's functional graph keeps every intermediate output of a call until it returns
#: (``keras/src/ops/function.py`` ``_run_through_graph``): memory grows as batch x all activations, about
#: 4 GB an image for EfficientNetB7 at 600. Above this input size Keras is calibrated on one image and run
#: one image at a time (inference is per image, so the outputs are the same).
LARGE_INPUT = 331


@dataclass
class ParityReport:
    model: str
    include_top: bool
    input_size: int
    max_abs_diff: float
    max_abs_ref: float
    top1_agree: Optional[float] = None
    dtype: str = "float32"

    @property
    def tolerance(self) -> float:
        return _TOLERANCES[self.dtype]

    @property
    def rel_error(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-300)

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance

    def __str__(self) -> str:
        kind = "top" if self.include_top else "notop"
        agree = "" if self.top1_agree is None else f", top-1 agreement {self.top1_agree:.0%}"
        return (f"{self.model} {kind} @{self.input_size} {self.dtype}: max|diff| {self.max_abs_diff:.3g}, "
                f"max|keras| {self.max_abs_ref:.3g}, relative {self.rel_error:.2e} "
                f"({'ok' if self.ok else 'FAIL'}, tolerance {self.tolerance:g}){agree}")


def sample_images(size: int, count: int = 2) -> np.ndarray:
    """Real photos (skimage.data) resized to ``size``: float32 NHWC in [0, 1]."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
           for p in photos[:count]]
    return np.stack(out)


def randomize_keras_model(model, calibration_images: np.ndarray, spec: KerasModelSpec, seed: int = 0) -> None:
    """Non-trivial weights: random biases and BN / LayerNorm affine, BN statistics calibrated on a batch.

    Layer scales (ConvNeXt's ``LayerScale.gamma``, initialised to 1e-6, its variable auto-named) are drawn
    like BN gammas, so the residual branches they scale take part in the output."""
    keras = import_keras()
    rng = np.random.default_rng(seed)
    batchnorms = []
    branch_ends = residual_branch_batchnorms(model)
    for layer in model.layers:
        scale = RESIDUAL_BRANCH_SCALE if layer.name in branch_ends else 1.0
        for variable in layer.weights:
            role = variable.name.rsplit("/", 1)[-1]
            shape = tuple(variable.shape)
            if role == "bias":
                variable.assign(rng.normal(0.0, 0.1, shape).astype("float32"))
            elif role == "gamma" or variable is getattr(layer, "gamma", None):  # incl. auto-named LayerScale
                variable.assign((scale * rng.uniform(0.5, 1.5, shape)).astype("float32"))
            elif role == "beta":
                variable.assign((scale * rng.normal(0.0, 0.2, shape)).astype("float32"))
        if isinstance(layer, keras.layers.BatchNormalization):
            batchnorms.append((layer, layer.momentum))
            layer.momentum = 0.0  # one training-mode pass sets moving stats to the batch stats
    set_builtin_normalization(model, spec)
    if batchnorms:  # without BatchNorm (ConvNeXt) a training-mode pass changes nothing
        with torch.no_grad():
            model(keras_preprocess(calibration_images, spec), training=True)
    for layer, momentum in batchnorms:
        layer.momentum = momentum


#: BatchNorms that end a residual branch get gamma and beta this much smaller (the calibrated BN outputs then have
#: about this standard deviation), as in trained nets (and the zero-init-gamma practice): with O(1) branches the
#: identity stream's variance grows with every block of a stage (23 in ResNet101's conv4, 36 in ResNet152's, 55
#: blocks in EfficientNetB7), and float32 rounding grows with it past 1e-4 relative at the output.
RESIDUAL_BRANCH_SCALE = 0.2
#: layers a residual branch may pass through between its last BatchNorm and the Add (EfficientNet's drop-connect)
_PASS_THROUGH = ("Dropout", "Identity", "Activation")


def residual_branch_batchnorms(model) -> set:
    """Names of the BatchNormalization layers that end a residual branch: one input of an ``Add`` (directly or
    through dropout) whose other input is the identity shortcut (not a BatchNorm).

    Applied alike to every model: ResNet's identity blocks' ``*_3_bn`` (a projection block's sum of two BNs
    starts each stage at O(1)), EfficientNet's ``*project_bn`` of blocks with a skip;
    models whose branches end in a convolution (ResNetV2, Inception-ResNet) or without Add have none."""
    keras = import_keras()
    names = set()
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Add) or _feeds_concatenate(layer):
            continue  # an Add whose sum is concatenated (NASNet's cells) carries no identity stream through depth
        for node in layer._inbound_nodes:
            ends = [_through_pass_through(parent.operation) for parent in node.parent_nodes]
            ends = [op.name for op in ends if isinstance(op, keras.layers.BatchNormalization)]
            if len(ends) == 1:  # an identity shortcut beside one branch (a projection shortcut's BN is not one)
                names.update(ends)
    return names


def _feeds_concatenate(layer) -> bool:
    keras = import_keras()
    return any(isinstance(node.operation, keras.layers.Concatenate) for node in layer._outbound_nodes)


def _through_pass_through(op):
    while type(op).__name__ in _PASS_THROUGH and op._inbound_nodes and op._inbound_nodes[0].parent_nodes:
        if type(op).__name__ == "Activation" and getattr(op.activation, "__name__", "") != "linear":
            break
        op = op._inbound_nodes[0].parent_nodes[0].operation
    return op


def set_builtin_normalization(model, spec: KerasModelSpec) -> None:
    """EfficientNet's built-in Rescaling(1/255) -> Normalization holds its statistics as weights, left at mean 0 /
    variance 1 by weights=None: set them so this graph computes the spec's preprocessing (Keras's ImageNet graph
    gets the same from the official values and an extra Rescaling), in the model's own dtype."""
    keras = import_keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization) and layer.weights:
            values = {"mean": np.asarray(spec.mean, np.float64), "variance": np.square(np.asarray(spec.std, np.float64))}
            for variable in layer.weights:
                role = variable.name.rsplit("/", 1)[-1]
                if role in values:
                    variable.assign(values[role].reshape(tuple(variable.shape)).astype(variable.dtype))
            layer.finalize_state()  # call() reads tensors made from the variables (on JAX: a copy taken at build)


def keras_preprocess(images01: np.ndarray, spec: KerasModelSpec) -> np.ndarray:
    """What Keras is fed: its own ``preprocess_input`` on 0..255 RGB, or 0..255 RGB itself for models that
    normalise inside (``builtin_preprocessing``). Keeps the dtype of ``images01`` (float32 or float64)."""
    from keras.src.applications import imagenet_utils

    x = images01 * images01.dtype.type(255.0)
    if spec.builtin_preprocessing:
        return x
    return imagenet_utils.preprocess_input(x, data_format="channels_last", mode=spec.mode)


def save_legacy_h5(model, path: os.PathLike | str) -> Path:
    """Save weights in the legacy Keras 2 HDF5 layout of the official Applications files."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path = Path(path)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def _numpy(out) -> np.ndarray:
    return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def keras_outputs(model, images01: np.ndarray, spec: KerasModelSpec):
    """The Keras model on ``images01`` (NHWC in [0, 1]): an array, or a list for a multi-output model."""
    if images01.shape[1] > LARGE_INPUT and len(images01) > 1:  # one at a time (see LARGE_INPUT)
        outs = [keras_outputs(model, images01[i:i + 1], spec) for i in range(len(images01))]
        if isinstance(outs[0], list):
            return [np.concatenate(parts) for parts in zip(*outs)]
        return np.concatenate(outs)
    with torch.no_grad():
        out = model(keras_preprocess(images01, spec), training=False)
    return [_numpy(o) for o in out] if isinstance(out, (list, tuple)) else _numpy(out)


def _normalise(images01: np.ndarray, spec: KerasModelSpec, dtype: torch.dtype) -> torch.Tensor:
    x = torch.from_numpy(images01).permute(0, 3, 1, 2).to(dtype)
    mean = torch.tensor(spec.mean, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def timm_outputs(model: torch.nn.Module, images01: np.ndarray, entry: KerasModelSpec, include_top: bool
                 ) -> np.ndarray:
    """Our model on [0, 1] RGB input normalised with the entry's (mean, std): logits, or NHWC features (pooled
    features where the entry compares Keras's pooled notop output: ``keras_pooled_notop``)."""
    dtype = next(model.parameters()).dtype
    x = _normalise(images01, entry, dtype)
    model.eval()
    if include_top or getattr(entry, "keras_pooled_notop", None) is not None:
        return model(x).numpy()  # logits, or pooled features (num_classes=0) against Keras pooling="avg"
    return model.forward_features(x).permute(0, 2, 3, 1).numpy()


def compare(entry: KerasModelSpec, keras_out: np.ndarray, ours: np.ndarray, include_top: bool, size: int,
            dtype: str = "float32") -> ParityReport:
    if keras_out.shape != ours.shape:
        raise AssertionError(f"{entry.keras_name}: output shapes differ, Keras {keras_out.shape} vs ours {ours.shape}")
    if keras_out.dtype != np.dtype(dtype) or ours.dtype != np.dtype(dtype):
        raise AssertionError(f"{entry.keras_name}: expected {dtype} outputs, Keras gave {keras_out.dtype}, "
                             f"ours {ours.dtype}")
    agree = float((keras_out.argmax(-1) == ours.argmax(-1)).mean()) if include_top else None
    return ParityReport(entry.keras_name, include_top, size, float(np.abs(keras_out - ours).max()),
                        float(np.abs(keras_out).max()), agree, dtype)


def load_into_timm(entry: KerasModelSpec, converted_path: os.PathLike | str, include_top: bool) -> torch.nn.Module:
    """``timm.create_model(entry.timm_arch)`` with the converted weights, strictly."""
    import timm

    from converters.convert import load_converted

    state_dict, _ = load_converted(converted_path)
    model = timm.create_model(entry.timm_arch, pretrained=False, num_classes=1000 if include_top else 0)
    model.load_state_dict(state_dict, strict=True)
    return model


@dataclass
class ParityCase:
    """A randomised Keras model saved as official-layout files, and its float32 outputs on real images."""

    spec: KerasModelSpec
    input_size: int
    images: np.ndarray  # NHWC float32 in [0, 1]
    h5: Dict[bool, Path]  # include_top -> legacy .h5
    keras_out: Dict[bool, np.ndarray]  # include_top -> logits / NHWC features
    workdir: Path
    top_manifest: list  # the built top model's layers with weights (converters.manifest.LayerSpec)

    def converted(self, include_top: bool) -> Path:
        """The converted ``.safetensors`` of the top / notop file (converted once, then reused)."""
        from converters.convert import convert, save_converted

        path = self.workdir / f"{self.spec.keras_name}_{'top' if include_top else 'notop'}.safetensors"
        if not path.is_file():
            converted = convert(self.spec, self.h5[include_top])
            if converted.include_top != include_top:
                raise AssertionError(f"{self.h5[include_top]} converted as include_top={converted.include_top}")
            save_converted(converted, path)
        return path

    def cleanup(self) -> None:
        """Delete the files (they can be large); the case cannot be checked again afterwards."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def _keras_top_and_notop(spec: KerasModelSpec, size: int, initialise: bool = True) -> Tuple[object, object, object]:
    """(top, notop, both): the notop model shares the top model's layers; ``both`` outputs [features, logits].

    ``initialise=False``: zero variables, for weights loaded right after."""
    from converters.keras_models import top_and_features

    keras = import_keras()
    top, features = top_and_features(spec, size, initialise=initialise)
    both = keras.Model(top.inputs, [features.outputs[0], top.outputs[0]], name=f"{spec.keras_name}_both")
    return top, features, both


def make_case(spec: KerasModelSpec, workdir: os.PathLike | str, input_size: Optional[int] = None,
              num_images: int = 2, seed: int = 0) -> ParityCase:
    """Randomise one Keras build, save its top and notop files, and record its outputs (one forward pass)."""
    seed_keras(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    size = input_size or spec.input_size
    top, features, both = _keras_top_and_notop(spec, size)
    randomize_keras_model(top, sample_images(size, 4 if size <= LARGE_INPUT else 1), spec, seed)
    images = sample_images(size, num_images)[::-1].copy()
    h5 = {include_top: save_legacy_h5(model, workdir / f"{spec.keras_name}_{'top' if include_top else 'notop'}.h5")
          for include_top, model in ((True, top), (False, features))}
    keras_features, keras_logits = keras_outputs(both, images, spec)
    return ParityCase(spec, size, images, h5, {True: keras_logits, False: keras_features}, workdir,
                      manifest_from_keras_model(top))


def check_case(case: ParityCase, load_model: ModelLoader = load_into_timm) -> List[ParityReport]:
    """Convert the case's top and notop files, load them into ours, compare in float32."""
    reports = []
    for include_top in (True, False):
        model = load_model(case.spec, case.converted(include_top), include_top)
        ours = timm_outputs(model, case.images, case.spec, include_top)
        reports.append(compare(case.spec, case.keras_out[include_top], ours, include_top, case.input_size))
    return reports


def check_case_float64(case: ParityCase, load_model: ModelLoader = load_into_timm) -> List[ParityReport]:
    """Keras and ours both in float64 on the case's files (the float32 weights are exact in float64).

    Keras is rebuilt in float64 (``keras_floatx``: variables and computation, BatchNorm included)
    and loads the same legacy file by order, as it loads the official ones. Ours is the model
    ``load_model`` gives, in float64, holding the file's values converted in float64 (a folded
    conv bias is not rounded to float32 first).
    """
    from converters.convert import convert

    keras = import_keras()
    with keras_floatx("float64"):
        top, features, both = _keras_top_and_notop(case.spec, case.input_size, initialise=False)
        top.load_weights(str(case.h5[True]))
        set_builtin_normalization(top, case.spec)  # the file holds them rounded to float32; ours uses them exact
        if getattr(case.spec, "keras_pooled_notop", None) is not None:  # its own final layer, not in the top
            features.load_weights(str(case.h5[False]))
        keras_features, keras_logits = keras_outputs(both, case.images.astype(np.float64), case.spec)
    keras.utils.clear_session()
    keras_out = {True: keras_logits, False: keras_features}
    reports = []
    for include_top in (True, False):
        model = load_model(case.spec, case.converted(include_top), include_top).double()
        model.load_state_dict(convert(case.spec, case.h5[include_top], dtype=torch.float64).state_dict)
        ours = timm_outputs(model, case.images.astype(np.float64), case.spec, include_top)
        reports.append(compare(case.spec, keras_out[include_top], ours, include_top, case.input_size, "float64"))
    return reports


def run_random_parity(entry: KerasModelSpec, workdir: os.PathLike | str, input_size: Optional[int] = None,
                      num_images: int = 2, seed: int = 0, load_model: ModelLoader = load_into_timm,
                      float64: bool = False) -> List[ParityReport]:
    """Random-weight Keras model -> legacy .h5 (top and notop) -> convert -> compare both (and in float64)."""
    case = make_case(entry, workdir, input_size, num_images, seed)
    reports = check_case(case, load_model)
    if float64:
        reports += check_case_float64(case, load_model)
    return reports


def verify_file(entry: KerasModelSpec, h5_path: os.PathLike | str, input_size: Optional[int] = None,
                num_images: int = 2, load_model: ModelLoader = load_into_timm) -> ParityReport:
    """Keras loading ``h5_path`` itself vs our conversion of the same file, on real images."""
    import tempfile

    from converters.convert import convert, save_converted
    from converters.keras_models import build_keras_model

    converted = convert(entry, h5_path)
    size = input_size or entry.input_size
    keras_model = build_keras_model(entry, converted.include_top, size, initialise=False)
    keras_model.load_weights(str(h5_path))
    images = sample_images(size, num_images)
    with tempfile.TemporaryDirectory() as tmp:
        ours = load_model(entry, save_converted(converted, Path(tmp) / "converted.safetensors"), converted.include_top)
        ours_out = timm_outputs(ours, images, entry, converted.include_top)
    return compare(entry, keras_outputs(keras_model, images, entry), ours_out, converted.include_top, size)
