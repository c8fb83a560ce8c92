"""Shared DataModule logic: split datasets, loaders, device-side conversion / augmentation / batch transforms.

Batch contract (every image DataModule here):

* loaders yield ``(images uint8 [B, 3, h, w], labels int64 [B], indices int64 [B])``; ``indices`` are positions
  inside the split being served. ``(h, w)`` is the model size ``image_size`` (resized in the CPU workers), or,
  where the loader's dataset has one image size and the resize runs on the device (``resize_on``), that size;
  :meth:`BaseImageDataModule.on_after_batch_transfer` then resizes the uint8 batch to ``image_size`` first,
  with the same semantics (:func:`~lightning_app.data.resize.resize_batch`);
* ``predict`` with ``predict_report_errors = True`` (the CLI's predict, :class:`~lightning_app.data.files.
  ImageFilesDataModule`) adds a fourth element, ``ok`` bool ``[B]``: ``False`` for an unreadable file (a black
  image), which is never replaced by another sample there;
* after the transfer to the device, :meth:`BaseImageDataModule.on_after_batch_transfer` returns
  ``(images float32 [B, 3, H, W] in [0, 1], labels, indices)`` at ``image_size``: train-time augmentation
  (only while ``trainer.training``), then :meth:`transform_batch` (``batch_transforms``).
  Normalisation is left to the model. Outside training the batch comes in the memory format the Trainer's
  LightningModule asks for with an ``input_memory_format()`` method (the inference engine's channels_last:
  converted as uint8, or resized straight into it, which is cheaper than converting the float batch), else NCHW.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import os
import warnings
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_app.data.augment import Augment, AugmentArg, build_augmentation, resolve_augment
from lightning_app.data.resize import RESIZE_ON, ImageSize, ResizeMode, ResizeOn, as_hw, resize_batch
from lightning_app.data.sampling import ResumableTrainOrder
from lightning_app.data.sources import SplitDataset
from lightning_app.errors import ConfigError, DatasetLayoutError

Split = Literal["train", "val", "test", "all"]
SPLITS: Tuple[str, ...] = ("train", "val", "test")
#: ``(images float [B, 3, H, W], indices int64 [B]) -> images``; applied on the device.
BatchTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ConcatSplits(Dataset):
    """Splits one after another (train, val, test); ``index`` is the position in the concatenation."""

    def __init__(self, parts: Sequence[SplitDataset]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([p.labels for p in self.parts]) if self.parts else np.zeros(0, np.int64)

    def _part(self, index: int) -> Tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - self.offsets[k]

    def __getitem__(self, index: int) -> Tuple:
        k, i = self._part(index)
        image, label, _, *rest = self.parts[k][i]
        return (image, label, index, *rest)

    def describe(self, index: int) -> str:
        k, i = self._part(index)
        return self.parts[k].describe(i)

    def reporting(self) -> "ConcatSplits":
        return ConcatSplits([p.reporting() for p in self.parts])

    @property
    def uniform_size(self) -> Optional[Tuple[int, int]]:
        """The one ``(H, W)`` of every part's source images, else ``None``."""
        sizes = {p.uniform_size for p in self.parts if len(p)}
        return sizes.pop() if len(sizes) == 1 and None not in sizes else None

    def unresized(self) -> "ConcatSplits":
        return ConcatSplits([p.unresized() if len(p) else p for p in self.parts])


_INV_255 = 1.0 / 255.0


def to_float01(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (255 -> exactly 1.0); float input is returned as float32.

    Multiplies by float32(1/255) rather than dividing: CUDA divides by a scalar that way, so CPU
    and GPU give bit-identical inputs (and therefore comparable cached features)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(_INV_255)
    return images.to(torch.float32)


def module_input_format(trainer: Optional["pl.Trainer"]) -> Optional[torch.memory_format]:
    """The memory format the Trainer's LightningModule takes its images in now (its ``input_memory_format()``;
    ``None``: no preference, or no module)."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    wanted = getattr(module, "input_memory_format", None)
    return wanted() if callable(wanted) else None


class BaseImageDataModule(ResumableTrainOrder, pl.LightningDataModule):
    """Base for the image DataModules: subclasses set ``class_names`` in ``__init__`` and implement
    :meth:`_build_splits`.

    Args:
        image_size: model input size, ``int`` or ``(height, width)``.
        batch_size: samples per batch (all stages).
        num_workers: DataLoader worker processes (decode, and resize unless on the device); ``None`` = automatic
            (:func:`auto_num_workers`: 0 where the resize runs on the device, 2 where the model runs on the CPU,
            else one per CPU core of this process less one, at most 16).
        augment: ``True`` (horizontal flip), ``False``/``None`` (none) or an :class:`Augment`;
            applied on the device to training batches only.
        resize: ``"squash"`` (plain bilinear resize, Keras' default) or ``"crop"`` (centre crop to the
            target aspect ratio, then resize; Keras ``crop_to_aspect_ratio=True``).
        antialias: antialiased downscaling (``False`` matches ``tf.image.resize``).
        resize_on: where images are resized to ``image_size``: ``"workers"`` (per image, in the DataLoader
            workers), ``"device"`` (per batch on the Trainer's device after the transfer, for data whose images all
            have one size: in-memory arrays, CIFAR-10; a loader over images of varying size, e.g. a folder of JPEGs,
            still resizes in the workers) or ``"auto"`` (default: ``device`` for a Trainer's loaders where the data
            has one image size; a loader iterated without a Trainer serves resized images).
            On a GPU the main process sends small images (CIFAR-10: 87x fewer bytes at 299 px) and the GPU resizes
            in float32, rounded back to uint8: a few pixels may differ by one uint8 level from the CPU's uint8
            kernel (the feature cache key records it). On the CPU both places run the same kernel (identical
            pixels), and resizing between two steps in the main process beat 2 overlapping workers on a 2-core
            machine (extraction at batch 16: MobileNetV3Small 1.15x, EfficientNetV2B0 1.04x, ResNet50 1.01x; the
            workers' threads took cores from the model's).
        seed: seed of the split and of the training shuffle.
        predict_split: split served by :meth:`predict_dataloader`: ``train``, ``val``, ``test`` or
            ``all`` (train, val, test concatenated in that order); may be changed between runs.
        drop_last: drop the last incomplete *training* batch (evaluation never drops).
        pin_memory: ``None`` = pin when the attached Trainer runs on a CUDA device (not merely when CUDA exists:
            a CPU run on a GPU machine gains nothing from pinned pages and would initialise CUDA in every process).

    Attributes:
        num_classes, class_names: known right after ``__init__``.
        batch_transforms: list of ``(images, indices) -> images`` callables applied on the device after
            augmentation, in every stage (e.g. test-time corruptions); override
            :meth:`transform_batch` for per-dataloader behaviour.
    """

    def __init__(
        self,
        image_size: ImageSize = 224,
        batch_size: int = 32,
        num_workers: Optional[int] = None,
        augment: AugmentArg = True,
        resize: ResizeMode = "squash",
        antialias: bool = False,
        seed: int = 0,
        predict_split: Split = "all",
        drop_last: bool = False,
        pin_memory: Optional[bool] = None,
        resize_on: ResizeOn = "auto",
    ) -> None:
        super().__init__()
        if resize not in ("squash", "crop"):
            raise ConfigError(f"resize must be 'squash' or 'crop', got {resize!r}")
        if resize_on not in RESIZE_ON:
            raise ConfigError(f"resize_on must be one of {list(RESIZE_ON)}, got {resize_on!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 (or null for automatic), got {num_workers}")
        self.image_size: Tuple[int, int] = as_hw(image_size)
        self.batch_size = int(batch_size)
        self.num_workers: Optional[int] = None if num_workers is None else int(num_workers)
        self.resize_on: ResizeOn = resize_on
        self.augment: Augment = resolve_augment(augment)
        self.resize: ResizeMode = resize
        self.antialias = bool(antialias)
        self.seed = int(seed)
        self.predict_split: Split = _check_split(predict_split)
        self.drop_last = bool(drop_last)
        self.pin_memory: Optional[bool] = None if pin_memory is None else bool(pin_memory)
        self.batch_transforms: List[BatchTransform] = []
        #: predict serves ``(images, labels, indices, ok)`` and never substitutes an unreadable image (set by
        #: ``python -m lightning_app predict``; the default keeps the 3-tuple batch contract)
        self.predict_report_errors = False
        self.class_names: List[str] = []
        self._augmentation: Optional[torch.nn.Module] = None
        self._augmentation_built = False
        self._splits: Optional[Dict[str, SplitDataset]] = None
        self._fingerprints: Dict[str, str] = {}

    # ------------------------------------------------------------------ classes
    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def _set_class_names(self, names: Sequence[str]) -> None:
        names = [str(n) for n in names]
        if not names:
            raise DatasetLayoutError("a dataset needs at least one class")
        if len(set(names)) != len(names):
            raise DatasetLayoutError(f"duplicate class names: {names}")
        self.class_names = names

    # ------------------------------------------------------------------ splits
    def _build_splits(self) -> Dict[str, SplitDataset]:
        """Return ``{"train": ..., "val": ..., "test": ...}`` (empty splits allowed). Subclasses implement."""
        raise NotImplementedError

    def _split_dataset(self, source, ids) -> SplitDataset:
        return SplitDataset(source, ids, self.image_size, self.resize, self.antialias)

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the split datasets once (idempotent; cheap on later calls)."""
        if self._splits is not None:
            return
        splits = self._build_splits()
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise RuntimeError(f"{type(self).__name__}._build_splits did not return splits {missing}")
        if len(splits["train"]) == 0:
            raise DatasetLayoutError(f"{type(self).__name__}: the training split is empty")
        self._splits = splits
        sizes = ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
        rank_zero_info(f"{type(self).__name__}: {self.num_classes} classes; {sizes} images")
        self._warn_classes_missing_from_splits()

    def _warn_classes_missing_from_splits(self) -> None:
        """A class too small for the val / test fractions (one image: it stays in training) gets no validation or
        test image: say so, instead of metrics that silently never see it."""
        assert self._splits is not None
        if not any(len(self._splits[s]) for s in ("val", "test")):
            return

        def count(split: str) -> np.ndarray:
            labels = np.asarray(self._splits[split].labels)
            return np.bincount(labels[labels >= 0], minlength=self.num_classes)  # -1: unlabelled

        train = count("train")
        counts = {s: count(s) for s in ("val", "test")}
        lines = []
        for c in range(self.num_classes):
            missing = [s for s in ("val", "test") if len(self._splits[s]) and counts[s][c] == 0]
            if missing and train[c]:
                total = int(train[c] + sum(counts[s][c] for s in counts))
                where = " and no ".join({"val": "validation", "test": "test"}[s] for s in missing)
                lines.append(f"{self.class_names[c]!r} ({total} image{'s' if total != 1 else ''}) has no {where} image")
        if lines:
            rank_zero_warn(f"{type(self).__name__}: " + "; ".join(lines[:10])
                           + (f"; and {len(lines) - 10} more classes" if len(lines) > 10 else "")
                           + ": its images all train, and validation / test metrics never see it. Add images "
                             "(or val / test folders) for it to be measured.")

    def dataset(self, split: Split) -> Dataset:
        """The dataset of ``split`` (``"all"`` = train, val, test concatenated); runs ``setup`` if needed."""
        split = _check_split(split)
        self.setup()
        assert self._splits is not None
        if split == "all":
            return ConcatSplits([self._splits[s] for s in SPLITS])
        return self._splits[split]

    def split_sizes(self) -> Dict[str, int]:
        """``{"train": n, "val": n, "test": n}`` (the order of ``"all"``)."""
        return {s: len(self.dataset(s)) for s in SPLITS}

    # ------------------------------------------------------------------ loaders
    def _device_type(self) -> str:
        """The attached Trainer's device type (``"cpu"`` without a Trainer)."""
        try:
            return self.trainer.strategy.root_device.type if self.trainer is not None else "cpu"
        except Exception:  # a strategy without a device yet
            return "cpu"

    def resizes_on_device(self, dataset: Dataset, trainer: Optional["pl.Trainer"] = None) -> bool:
        """Whether a loader over ``dataset`` leaves the resize to the device. Only where its images have one size (a
        batch of them is resized at once); then ``"device"`` always, ``"auto"`` where the loader feeds a Trainer
        (``trainer``, default: the attached one), whose batch transfer resizes; a loader iterated on its own serves
        resized images."""
        if self.resize_on == "workers" or getattr(dataset, "uniform_size", None) is None:
            return False
        return self.resize_on == "device" or (trainer if trainer is not None else self.trainer) is not None

    def served_dataset(self, dataset: Dataset) -> Dataset:
        """``dataset`` as a loader serves it: its :meth:`~lightning_app.data.sources.SplitDataset.unresized` view
        where the resize runs on the device (:meth:`resizes_on_device`), else itself."""
        return dataset.unresized() if self.resizes_on_device(dataset) else dataset  # type: ignore[attr-defined]

    def loader_workers(self, dataset: Optional[Dataset] = None) -> int:
        """``num_workers``, or when ``None`` :func:`auto_num_workers` for a loader over ``dataset``."""
        if self.num_workers is not None:
            return self.num_workers
        world = self.trainer.world_size if self.trainer is not None else 1
        per_node = max(1, world // max(1, getattr(self.trainer, "num_nodes", 1) or 1))
        on_device = dataset is not None and self.resizes_on_device(dataset)
        workers = auto_num_workers(on_device, self._device_type(), per_node)
        if workers == 0:  # chosen (measured faster): Lightning's advice to add workers does not apply here
            warnings.filterwarnings("ignore", message=r"The '\w+_dataloader' does not have many workers")
        return workers

    def _loader(self, dataset: Dataset, sampler: Optional[Sampler] = None, drop_last: bool = False,
                persistent: bool = True) -> DataLoader:
        """A DataLoader with the shared settings over :meth:`served_dataset`. It has its own seeded generator (it
        seeds the worker processes), so iterating a loader never draws from the global RNG, which stays the model's
        (dropout, augmentation)."""
        workers = self.loader_workers(dataset)
        return DataLoader(
            self.served_dataset(dataset),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=should_pin_memory(self.trainer, self.pin_memory),
            persistent_workers=persistent and workers > 0,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``(seed, epoch)`` (:class:`~lightning_app.data.sampling.EpochSampler`): epoch k's order is the
        same whether or not the run was interrupted, and a resumed run continues where the checkpoint left off."""
        ds = self.dataset("train")
        sampler = self.train_sampler(len(ds), self.seed, shuffle=True, batch_size=self.batch_size)
        return self._loader(ds, sampler=sampler, drop_last=self._train_drop_last(len(ds)))

    def _train_drop_last(self, n: int) -> bool:
        """``drop_last``, or True (logged) when the last training batch would hold one image: BatchNorm cannot train
        on a batch of one ("Expected more than 1 value per channel"); the order is reshuffled every epoch, so a
        different image sits out each epoch."""
        if self.drop_last:
            return True
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = math.ceil(n / max(world, 1))
        if per_rank > 1 and per_rank % self.batch_size == 1:
            rank_zero_info(f"{type(self).__name__}: {per_rank} training images per process with batch_size "
                           f"{self.batch_size} leave a last batch of one image, which BatchNorm cannot train on: that "
                           f"batch is skipped (a different image each epoch, the order is reshuffled)")
            return True
        return False

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation loader; ``[]`` (no validation) when the val split is empty."""
        ds = self.dataset("val")
        return self._loader(ds) if len(ds) else []

    # test / predict loaders are iterated once per run: persistent workers would only keep idle
    # processes alive (one pool per loader, e.g. per corruption and severity in a robustness run).
    def test_dataloader(self) -> DataLoader:
        ds = self.dataset("test")
        if len(ds) == 0:
            raise DatasetLayoutError(f"{type(self).__name__} has no test split: {self._no_test_hint()}")
        return self._loader(ds, persistent=False)

    def predict_dataloader(self) -> DataLoader:
        """Deterministic order over ``predict_split``, no augmentation. With ``predict_report_errors = True`` an
        unreadable image is reported as such (batches ``(images, labels, indices, ok)``), never replaced by another
        sample; otherwise it is replaced as in training."""
        ds = self.dataset(self.predict_split)
        ds = ds.reporting() if self.predict_report_errors else ds
        if len(ds) == 0:
            raise DatasetLayoutError(f"{type(self).__name__}: predict_split={self.predict_split!r} is empty")
        return self._loader(ds, persistent=False)

    def _no_test_hint(self) -> str:
        return "set test_split > 0"

    # ------------------------------------------------------------------ device side
    @property
    def augmentation(self) -> Optional[torch.nn.Module]:
        """The training augmentation pipeline (``None`` when off), built on first use."""
        if not self._augmentation_built:
            self._augmentation = build_augmentation(self.augment, self.image_size)
            self._augmentation_built = True
        return self._augmentation

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Resize to ``image_size`` when the loader left it to the device, uint8 -> float [0, 1], augmentation while
        training, then :meth:`transform_batch`; outside training in the module's input memory format (module
        docstring)."""
        training = self.trainer is not None and bool(self.trainer.training)
        memory_format = None if training else module_input_format(self.trainer)
        return self.prepare_batch(batch, dataloader_idx, train=training, memory_format=memory_format)

    def prepare_batch(self, batch: Batch, dataloader_idx: int = 0, train: bool = False,
                      memory_format: Optional[torch.memory_format] = None) -> Batch:
        """What :meth:`on_after_batch_transfer` does, with the training flag and the images' memory format
        (``None``: NCHW) explicit (for wrappers)."""
        images, labels, indices, *rest = batch  # rest: predict's ``ok`` flags
        # resized when served at the source's size (``resize_on``); converted while uint8 (a quarter of the bytes)
        fmt = memory_format if memory_format is not None and images.dim() == 4 else torch.contiguous_format
        if tuple(images.shape[-2:]) != self.image_size or fmt != torch.contiguous_format:
            images = resize_batch(images, self.image_size, self.resize, self.antialias, fmt)
        images = to_float01(images)
        if train and self.augmentation is not None:
            images = self.augmentation(images)
        images = self.transform_batch(images, indices, dataloader_idx)
        return (images, labels, indices, *rest)

    def transform_batch(self, images: torch.Tensor, indices: torch.Tensor, dataloader_idx: int = 0) -> torch.Tensor:
        """Apply ``batch_transforms`` in order. Override to choose transforms per ``dataloader_idx``
        (e.g. one test dataloader per corruption and severity)."""
        for transform in self.batch_transforms:
            images = transform(images, indices)
        return images

    # ------------------------------------------------------------------ identity
    def dataset_fingerprint(self, split: Split) -> str:
        """sha256 hex of ``split``'s content (files + sizes + mtimes, or array bytes; labels; order),
        class names, image size, resize mode and antialiasing. Used in the feature cache key."""
        split = _check_split(split)
        if split not in self._fingerprints:
            h = hashlib.sha256()
            h.update(f"{type(self).__name__}\0{split}\0{self.class_names}\n".encode())
            self.setup()
            assert self._splits is not None
            for s in (SPLITS if split == "all" else (split,)):
                self._splits[s].update_fingerprint(h)
            self._fingerprints[split] = h.hexdigest()
        return self._fingerprints[split]


def auto_num_workers(resize_on_device: bool, device_type: str, processes_per_node: int = 1) -> int:
    """DataLoader workers per process when the config leaves ``num_workers`` unset.

    * resize on the device: 0, the main process slices the array between two asynchronous device steps (measured on
      an H200, CIFAR-format 32 px batches of 64 to 299 px: 77k img/s with 0 workers, 19k with 2: worker IPC and
      start-up cost more than the slicing);
    * model on the CPU: 2 (the model needs the cores; its forward is far slower than decode + resize of a batch);
    * else (decode + resize feeding an accelerator): one per CPU core of this process's share of the node, less one
      for the main process, at most 16."""
    if resize_on_device:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    share = max(1, cpus // max(1, processes_per_node))
    if device_type == "cpu":
        return min(2, share)
    return max(1, min(share - 1, 16))


def should_pin_memory(trainer: Optional["pl.Trainer"], requested: Optional[bool] = None) -> bool:
    """``requested`` when set, else whether ``trainer`` runs on a CUDA device (``False`` without a trainer)."""
    if requested is not None:
        return bool(requested)
    if trainer is None:
        return False
    try:
        return trainer.strategy.root_device.type == "cuda"
    except Exception:  # a strategy without a device yet
        return False


def _check_split(split: str) -> Split:
    if split not in ("train", "val", "test", "all"):
        raise ConfigError(f"split must be 'train', 'val', 'test' or 'all', got {split!r}")
    return split  # type: ignore[return-value]
