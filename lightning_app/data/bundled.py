"""In-memory DataModules: any uint8 array, and offline real-image sets bundled with installed packages."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from lightning_app.data.augment import AugmentArg
from lightning_app.data.base import BaseImageDataModule, Split
from lightning_app.data.resize import ImageSize, ResizeMode, ResizeOn
from lightning_app.data.sources import ArraySource, SplitDataset
from lightning_app.data.splits import stratified_split
from lightning_app.errors import ConfigError, DatasetLayoutError


class ArrayDataModule(BaseImageDataModule):
    """Images held in memory: uint8 ``[N, H, W]`` (grayscale, replicated to RGB) or ``[N, H, W, 3]``.

    ``val_split`` / ``test_split`` are fractions of all images (seeded, stratified); pass
    ``test_images`` / ``test_labels`` to use an official test set instead (then ``test_split``
    is ignored). Labels are ``0..len(class_names)-1``. Other args: :class:`BaseImageDataModule`.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        class_names: Sequence[str],
        test_images: Optional[np.ndarray] = None,
        test_labels: Optional[Sequence[int]] = None,
        name: str = "array",
        image_size: ImageSize = 224,
        batch_size: int = 32,
        num_workers: Optional[int] = 0,
        val_split: float = 0.1,
        test_split: float = 0.2,
        seed: int = 0,
        augment: AugmentArg = False,
        resize: ResizeMode = "squash",
        antialias: bool = False,
        predict_split: Split = "all",
        drop_last: bool = False,
        pin_memory: Optional[bool] = None,
        resize_on: ResizeOn = "auto",
    ) -> None:
        super().__init__(
            image_size=image_size, batch_size=batch_size, num_workers=num_workers, augment=augment,
            resize=resize, antialias=antialias, seed=seed, predict_split=predict_split,
            drop_last=drop_last, pin_memory=pin_memory, resize_on=resize_on,
        )
        self._set_class_names(class_names)
        if (test_images is None) != (test_labels is None):
            raise ConfigError("pass both test_images and test_labels, or neither")
        self.val_split = float(val_split)
        self.test_split = 0.0 if test_images is not None else float(test_split)
        self._source = ArraySource(images, labels, name=name)
        self._test_source = ArraySource(test_images, test_labels, name=f"{name}_test") if test_images is not None else None
        for src in (self._source, self._test_source):
            if src is not None and len(src) and (src.labels.min() < 0 or src.labels.max() >= self.num_classes):
                raise DatasetLayoutError(f"labels of {src.name!r} must be in 0..{self.num_classes - 1}")

    def _build_splits(self) -> Dict[str, SplitDataset]:
        tr, va, te = stratified_split(self._source.labels, self.val_split, self.test_split, self.seed)
        out = {"train": self._split_dataset(self._source, tr), "val": self._split_dataset(self._source, va)}
        if self._test_source is not None:
            out["test"] = self._split_dataset(self._test_source, np.arange(len(self._test_source)))
        else:
            out["test"] = self._split_dataset(self._source, te)
        return out


def digits_arrays() -> tuple:
    """scikit-learn's 1,797 real 8x8 handwritten digits as uint8 ``[N, 8, 8]`` (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


class DigitsDataModule(ArrayDataModule):
    """Offline quickstart set: scikit-learn's 1,797 real handwritten digits (10 classes, 8x8 grayscale),
    upsampled to ``image_size`` and replicated to 3 channels, entirely in memory.

    Default split (seeded, stratified): 70% train, 10% val, 20% held-out test (360 images).
    Augmentation is off by default (flipping changes a digit's meaning).
    """

    def __init__(
        self,
        image_size: ImageSize = 96,
        batch_size: int = 64,
        num_workers: Optional[int] = 0,
        val_split: float = 0.1,
        test_split: float = 0.2,
        seed: int = 0,
        augment: AugmentArg = False,
        resize: ResizeMode = "squash",
        antialias: bool = False,
        predict_split: Split = "all",
        drop_last: bool = False,
        pin_memory: Optional[bool] = None,
        resize_on: ResizeOn = "auto",
    ) -> None:
        images, labels = digits_arrays()
        super().__init__(
            images, labels, [str(i) for i in range(10)], name="sklearn_digits",
            image_size=image_size, batch_size=batch_size, num_workers=num_workers, val_split=val_split,
            test_split=test_split, seed=seed, augment=augment, resize=resize, antialias=antialias,
            predict_split=predict_split, drop_last=drop_last, pin_memory=pin_memory, resize_on=resize_on,
        )
