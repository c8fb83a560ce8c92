"""Shared DataModule logic: split datasets, loaders, device-side conversion / augmentation / batch transforms.

Batch contract (every image DataModule here):

* loaders yield ``(images uint8 [B, 3, H, W], labels int64 [B], indices int64 [B])``, images
  already resized in the CPU workers; ``indices`` are positions inside the split being served;
* after the transfer to the device, :meth:`BaseImageDataModule.on_after_batch_transfer` returns
  ``(images float32 [B, 3, H, W] in [0, 1], labels, indices)``: train-time augmentation
  (only while ``trainer.training``), then :meth:`transform_batch` (``batch_transforms``).
  Normalisation is left to the model.
"""
from __future__ import annotations

import bisect
import hashlib
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_app.data.augment import Augment, AugmentArg, build_augmentation, resolve_augment
from lightning_app.data.resize import ImageSize, ResizeMode, as_hw
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

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        k = bisect.bisect_right(self.offsets, index) - 1
        image, label, _ = self.parts[k][index - self.offsets[k]]
        return image, label, index


_INV_255 = 1.0 / 255.0


def to_float01(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (255 -> exactly 1.0); float input is returned as float32.

    Multiplies by float32(1/255) rather than dividing: CUDA divides by a scalar that way, so CPU
    and GPU give bit-identical inputs (and therefore comparable cached features)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(_INV_255)
    return images.to(torch.float32)


class BaseImageDataModule(pl.LightningDataModule):
    """Base for the image DataModules: subclasses set ``class_names`` in ``__init__`` and implement
    :meth:`_build_splits`.

    Args:
        image_size: model input size, ``int`` or ``(height, width)``.
        batch_size: samples per batch (all stages).
        num_workers: DataLoader worker processes (decode + resize happen there).
        augment: ``True`` (horizontal flip), ``False``/``None`` (none) or an :class:`Augment`;
            applied on the device to training batches only.
        resize: ``"squash"`` (plain bilinear resize, Keras' default) or ``"crop"`` (centre crop to the
            target aspect ratio, then resize; Keras ``crop_to_aspect_ratio=True``).
        antialias: antialiased downscaling (``False`` matches ``tf.image.resize``).
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
        num_workers: int = 2,
        augment: AugmentArg = True,
        resize: ResizeMode = "squash",
        antialias: bool = False,
        seed: int = 0,
        predict_split: Split = "all",
        drop_last: bool = False,
        pin_memory: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if resize not in ("squash", "crop"):
            raise ConfigError(f"resize must be 'squash' or 'crop', got {resize!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.image_size: Tuple[int, int] = as_hw(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.augment: Augment = resolve_augment(augment)
        self.resize: ResizeMode = resize
        self.antialias = bool(antialias)
        self.seed = int(seed)
        self.predict_split: Split = _check_split(predict_split)
        self.drop_last = bool(drop_last)
        self.pin_memory: Optional[bool] = None if pin_memory is None else bool(pin_memory)
        self.batch_transforms: List[BatchTransform] = []
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
    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False, persistent: bool = True) -> DataLoader:
        """A DataLoader with the shared settings; ``shuffle`` uses a generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=should_pin_memory(self.trainer, self.pin_memory),
            persistent_workers=persistent and self.num_workers > 0,
            drop_last=drop_last,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation loader; ``[]`` (no validation) when the val split is empty."""
        ds = self.dataset("val")
        return self._loader(ds, shuffle=False) if len(ds) else []

    # test / predict loaders are iterated once per run: persistent workers would only keep idle
    # processes alive (one pool per loader, e.g. per corruption and severity in a robustness run).
    def test_dataloader(self) -> DataLoader:
        ds = self.dataset("test")
        if len(ds) == 0:
            raise DatasetLayoutError(f"{type(self).__name__} has no test split: {self._no_test_hint()}")
        return self._loader(ds, shuffle=False, persistent=False)

    def predict_dataloader(self) -> DataLoader:
        """Deterministic order over ``predict_split``, no augmentation."""
        ds = self.dataset(self.predict_split)
        if len(ds) == 0:
            raise DatasetLayoutError(f"{type(self).__name__}: predict_split={self.predict_split!r} is empty")
        return self._loader(ds, shuffle=False, persistent=False)

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
        """uint8 -> float [0, 1], augmentation while training, then :meth:`transform_batch`."""
        training = self.trainer is not None and bool(self.trainer.training)
        return self.prepare_batch(batch, dataloader_idx, train=training)

    def prepare_batch(self, batch: Batch, dataloader_idx: int = 0, train: bool = False) -> Batch:
        """What :meth:`on_after_batch_transfer` does, with the training flag explicit (for wrappers)."""
        images, labels, indices = batch
        images = to_float01(images)
        if train and self.augmentation is not None:
            images = self.augmentation(images)
        images = self.transform_batch(images, indices, dataloader_idx)
        return images, labels, indices

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
