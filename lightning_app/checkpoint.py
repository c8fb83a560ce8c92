"""Checkpoints that never lose work, and that say what inference needs.

* :class:`ModelCheckpoint` is Lightning's, plus:

  - ``last.ckpt`` after **every** training epoch (Lightning 2.6 rewrites it only when a top-k checkpoint was saved
    at the same step, i.e. when the monitored metric improved: a run killed at epoch 2 resumed from epoch 0);
  - on SIGTERM or a first Ctrl+C the run stops at the end of the current batch and ``last.ckpt`` is written there,
    resumable part-way through the epoch when the training loader serves an
    :class:`~lightning_app.data.sampling.EpochSampler` in one process (else ``last.ckpt`` keeps the last completed
    epoch, and says so); a second Ctrl+C stops at once and keeps the previous ``last.ckpt``;
  - every checkpoint file is written atomically (:class:`AtomicCheckpointIO`: temporary file, fsync, rename), so a
    kill during a save never leaves a truncated ``last.ckpt``.

* The RNG states (torch, CUDA, numpy, random) travel in the checkpoint and are restored when training resumes
  (:func:`capture_rng_state` / :func:`restore_rng_state`), so dropout and augmentation after a resume draw what the
  uninterrupted run drew.
* ``checkpoint["lightning_app"]`` (:data:`METADATA_KEY`) holds what inference needs: class names in order, input
  size, resize mode, preprocessing, backbone and weights provenance (written by the module, see
  :func:`inference_metadata`). :func:`load_checkpoint` reads a file or raises a
  :class:`~lightning_app.errors.CheckpointError` that says what is wrong (missing, truncated, not a checkpoint).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_app.data.sampling import EpochSampler, sampler_of, train_position
from lightning_app.errors import CheckpointError

#: key of the inference metadata in a checkpoint
METADATA_KEY = "lightning_app"
#: key of the RNG states in a checkpoint
RNG_KEY = "lightning_app_rng"
METADATA_FORMAT = 1

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- files
def _is_local(path: PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (local paths: temporary file in the same folder, fsync,
    ``os.replace``) and whose loads raise :class:`CheckpointError` for a truncated or foreign file."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: PathLike, map_location: Any = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def load_checkpoint(path: PathLike, map_location: Any = "cpu", weights_only: Optional[bool] = None,
                    mmap: bool = False) -> Dict[str, Any]:
    """``torch.load`` of a Lightning checkpoint file, or :class:`CheckpointError` saying what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist (or is not a file): check --ckpt_path")
    size = p.stat().st_size
    try:
        kwargs = {"weights_only": weights_only} if weights_only is not None else {}
        checkpoint = torch.load(p, map_location=map_location, mmap=mmap, **kwargs)
    except Exception as err:  # truncated zip, pickle garbage, an unsafe global under weights_only, ...
        if isinstance(err, EOFError) or "zip archive" in str(err) or "central directory" in str(err) or size == 0:
            what = f"is truncated or corrupt ({size:,} bytes; {type(err).__name__}: {err})"
            fix = ("it was cut off while being written or copied: use another checkpoint of the run (last.ckpt is "
                   "written atomically from this version on) or copy it again")
        else:
            what = f"cannot be read as a PyTorch checkpoint ({type(err).__name__}: {err})"
            fix = "pass a .ckpt file written by this application (runs/<name>/version_N/checkpoints/*.ckpt)"
        raise CheckpointError(f"checkpoint {str(p)!r} {what}: {fix}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = list(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{str(p)!r} is not a Lightning checkpoint (no 'state_dict'; found {keys}): pass a .ckpt "
                              f"file written by this application (runs/<name>/version_N/checkpoints/*.ckpt)")
    return checkpoint


def metadata(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The inference metadata of a loaded checkpoint (``{}`` for checkpoints written before it existed)."""
    return dict(checkpoint.get(METADATA_KEY) or {})


# ----------------------------------------------------------------------------- metadata
def display_name(name: str) -> str:
    """``name`` as text that can always be printed and written (a file name that is not valid UTF-8 keeps its bytes
    as ``\\xNN`` escapes instead of failing at the first CSV or plot)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unwrap_datamodule(dm: Any) -> Any:
    """The image DataModule behind a feature / robustness wrapper (``source`` / ``datamodule`` attribute)."""
    for attr in ("source", "datamodule"):
        inner = getattr(dm, attr, None)
        if isinstance(inner, pl.LightningDataModule):
            return _unwrap_datamodule(inner)
    return dm


def data_spec(dm: Any) -> Dict[str, Any]:
    """What a DataModule says about its images: class names (display form), input size, resize mode."""
    spec: Dict[str, Any] = {}
    if dm is None:
        return spec
    names = list(getattr(dm, "class_names", None) or [])
    if not names:
        names = list(getattr(_unwrap_datamodule(dm), "class_names", None) or [])
    if names:
        spec["class_names"] = [display_name(str(n)) for n in names]
    images = _unwrap_datamodule(dm)
    size = getattr(images, "image_size", None)
    if size is not None:
        spec["input_size"] = [int(v) for v in (size if isinstance(size, (tuple, list)) else (size, size))]
    for attr in ("resize", "antialias"):
        if hasattr(images, attr):
            spec[attr] = getattr(images, attr)
    spec["datamodule"] = type(images).__name__
    return spec


def weights_provenance(backbone: str, weights_used: Optional[str]) -> Dict[str, Any]:
    """Where the backbone's starting weights came from: the resolved option, and for Keras ImageNet weights the
    converted file's record of its source (file name, sha256, converter version)."""
    out: Dict[str, Any] = {"resolved": weights_used}
    if weights_used is None:
        return out
    try:
        if weights_used == "imagenet":
            from lightning_app.zoo import get_entry
            from lightning_app.zoo.weights import converted_path

            path = converted_path(get_entry(backbone), include_top=False)
        else:
            path = Path(weights_used)
        out["file"] = str(path)
        if path.suffix == ".safetensors" and path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            out.update({k: meta[k] for k in ("keras_model", "source_file", "source_sha256", "source_md5",
                                              "converter_version") if k in meta})
    except Exception as err:  # provenance is informative: never fail a save over it
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def inference_metadata(module: Any, spec: Dict[str, Any]) -> Dict[str, Any]:
    """``checkpoint["lightning_app"]`` for a :class:`~lightning_app.module.TransferModule` and its data spec."""
    from lightning_app import __version__

    mean = getattr(getattr(module, "normalize", None), "mean", None)
    std = getattr(getattr(module, "normalize", None), "std", None)
    out = {
        "format": METADATA_FORMAT,
        "num_classes": int(module.num_classes),
        "backbone": module.backbone_name,
        "stage": module.stage,
        "preprocessing": {"mean": torch.as_tensor(mean).flatten().tolist() if mean is not None else None,
                          "std": torch.as_tensor(std).flatten().tolist() if std is not None else None,
                          "input": "RGB in [0, 1], normalised inside the model"},
        "weights": {"configured": module.hparams.get("weights"), **getattr(module, "weights_provenance", {})},
        "versions": {"lightning_app": str(__version__), "torch": str(torch.__version__), "lightning": str(pl.__version__)},
    }
    out.update({k: v for k, v in spec.items() if k in ("class_names", "input_size", "resize", "antialias",
                                                       "datamodule")})
    return out


# ----------------------------------------------------------------------------- RNG
def capture_rng_state() -> Dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and ``random`` states, as tensors and plain Python values (loadable
    with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where the same number of devices exists)."""
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ----------------------------------------------------------------------------- the callback
def resumes_part_way(trainer: "pl.Trainer") -> bool:
    """Whether a checkpoint saved in the middle of an epoch resumes exactly: one process, and a training loader whose
    sampler is an :class:`EpochSampler` (it skips the samples already trained on)."""
    loader = trainer.train_dataloader
    loaders: Sequence[Any] = loader if isinstance(loader, (list, tuple)) else [loader]
    return trainer.world_size == 1 and bool(loaders) and all(isinstance(sampler_of(dl), EpochSampler) for dl in loaders)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that never loses work (see the module docstring). Same arguments; with
    ``save_last=True`` (the CLI's default) ``last.ckpt`` is written after every epoch and on SIGTERM / Ctrl+C."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_saved_step: Optional[int] = None
        self._previous_sigint: Any = None
        self._sigint_installed = False
        self._stop_signal = "SIGTERM"
        #: why and where the last run stopped early ("" when it did not)
        self.interrupt_note = ""

    # -- atomic files
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    # -- last.ckpt every epoch
    def _save_last_checkpoint(self, trainer: "pl.Trainer", monitor_candidates: Dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (self.save_last and not trainer.fast_dev_run and not trainer.sanity_checking
                and self._last_saved_step != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # -- interruption
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.interrupt_note, self._stop_signal = "", "SIGTERM"
        if threading.current_thread() is threading.main_thread() and not self._sigint_installed:
            self._previous_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._graceful_sigint(trainer))
            self._sigint_installed = True

    def _graceful_sigint(self, trainer: "pl.Trainer"):
        def handler(signum: int, frame: Any) -> None:
            self._restore_sigint()  # a second Ctrl+C stops at once
            rank_zero_info("Ctrl+C: stopping after the current batch and saving last.ckpt "
                           "(press Ctrl+C again to stop at once)")
            trainer._signal_connector.received_sigterm = True  # Lightning's graceful stop (DDP-synchronised)
            self._stop_signal = "Ctrl+C"

        return handler

    def _restore_sigint(self) -> None:
        if self._sigint_installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint if self._previous_sigint is not None
                          else signal.default_int_handler)
            self._sigint_installed = False

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._restore_sigint()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._restore_sigint()
        super().on_exception(trainer, pl_module, exception)
        if type(exception).__name__ != "SIGTERMException" or not self.save_last or trainer.sanity_checking:
            return
        why = self._stop_signal
        position = train_position(trainer) or {"epoch": trainer.current_epoch, "batches": 0}
        if position["batches"] == 0 or resumes_part_way(trainer):
            if self._last_saved_step != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            where = (f"epoch {position['epoch']}, batch {position['batches']}" if position["batches"]
                     else f"the start of epoch {position['epoch']}")
            self.interrupt_note = f"stopped by {why}: {self.last_model_path} resumes at {where}"
        else:
            self.interrupt_note = (f"stopped by {why} in epoch {position['epoch']}: this training loader cannot resume "
                                   f"part-way, so {self.last_model_path or 'last.ckpt'} keeps the last completed epoch")
        rank_zero_warn(self.interrupt_note)
        exception.lightning_app_note = self.interrupt_note  # printed by lightning_app.entry


__all__ = [
    "AtomicCheckpointIO",
    "METADATA_KEY",
    "ModelCheckpoint",
    "RNG_KEY",
    "capture_rng_state",
    "data_spec",
    "display_name",
    "inference_metadata",
    "load_checkpoint",
    "match_data",
    "metadata",
    "restore_rng_state",
    "resumes_part_way",
    "weights_provenance",
]


# ----------------------------------------------------------------------------- data against checkpoint
def _preview(names: Sequence[str], limit: int = 8) -> str:
    names = list(names)
    return ", ".join(repr(n) for n in names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def match_data(meta: Dict[str, Any], dm: Any, labelled: bool = True, source: str = "the checkpoint") -> List[str]:
    """Check a DataModule against a checkpoint's metadata before test / validate / predict / resumed fit.

    Refuses (:class:`~lightning_app.errors.DataMismatchError`) a different class set or order (``labelled``: the
    labels are used, i.e. not for predict) and an input size the DataModule cannot take; adapts where that is the
    obvious right thing: images are resized to the trained input size (and resize mode) when the DataModule has not
    loaded anything yet. Returns the notices of what it adapted (also logged).
    """
    from lightning_app.errors import DataMismatchError

    if not meta or dm is None:
        return []
    spec = data_spec(dm)
    trained, names = meta.get("class_names"), spec.get("class_names")
    if labelled and trained and names and names != trained:
        if sorted(names) == sorted(trained):
            raise DataMismatchError(
                f"the data has the classes {source} was trained on but in another order (data: {_preview(names)}; "
                f"trained: {_preview(trained)}), so every label would mean another class: give the data the training "
                f"class order")
        missing = [n for n in trained if n not in names]
        extra = [n for n in names if n not in trained]
        raise DataMismatchError(
            f"the data's classes are not the {len(trained)} classes {source} was trained on"
            + (f"; missing from the data: {_preview(missing)}" if missing else "")
            + (f"; not known to the model: {_preview(extra)}" if extra else "")
            + ". Use data with the training classes (one folder per class, same names), or train a model on these "
              "classes")
    if labelled and not (trained and names) and meta.get("num_classes") and getattr(dm, "num_classes", None):
        if int(dm.num_classes) != int(meta["num_classes"]):
            raise DataMismatchError(f"the data has {dm.num_classes} classes, {source} was trained on "
                                    f"{meta['num_classes']}: use data with the training classes")
    notices: List[str] = []
    images = _unwrap_datamodule(dm)
    want = meta.get("input_size")
    have = spec.get("input_size")
    adaptable = getattr(images, "_splits", "n/a") is None  # a BaseImageDataModule that has not built its datasets
    if want and have and list(have) != list(want):
        if not adaptable:
            raise DataMismatchError(f"the data serves {have[0]}x{have[1]} images, {source} was trained at "
                                    f"{want[0]}x{want[1]}: set data.init_args.image_size to {want[0]}")
        images.image_size = (int(want[0]), int(want[1]))
        if hasattr(images, "_augmentation_built"):
            images._augmentation_built = False  # sized for the old input
        notices.append(f"images are resized to {want[0]}x{want[1]}, the size {source} was trained at "
                       f"(data.init_args.image_size was {have[0]}x{have[1]})")
    for attr in ("resize", "antialias"):
        if attr in meta and attr in spec and meta[attr] != spec[attr] and adaptable:
            setattr(images, attr, meta[attr])
            notices.append(f"data.init_args.{attr} set to {meta[attr]!r} as in training (was {spec[attr]!r})")
    for notice in notices:
        rank_zero_warn(notice)
    return notices
