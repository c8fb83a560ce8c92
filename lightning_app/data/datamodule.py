"""Image-folder DataModule (Keras ``image_dataset_from_directory`` layout) and re-exports of the others."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

from lightning_app.data.augment import Augment, AugmentArg
from lightning_app.data.base import BaseImageDataModule, Split
from lightning_app.data.bundled import ArrayDataModule, DigitsDataModule
from lightning_app.data.cifar import Cifar10DataModule
from lightning_app.data.filesets import FileList, build_file_splits
from lightning_app.data.folders import find_classes, index_class_folders, resolve_split_dir
from lightning_app.data.food import Food101DataModule
from lightning_app.data.images import Verify, check_verify_mode
from lightning_app.data.resize import ImageSize, ResizeMode, ResizeOn
from lightning_app.data.sources import SplitDataset
from lightning_app.errors import ConfigError, DatasetLayoutError, DatasetNotFoundError

__all__ = [
    "Augment",
    "ArrayDataModule",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "BaseImageDataModule",
    "Cifar10DataModule",
    "DigitsDataModule",
    "Food101DataModule",
    "ImageFolderDataModule",
]


class ImageFolderDataModule(BaseImageDataModule):
    """One subfolder per class; classes sorted by folder name (label = position).

    Layout: ``root/train/<class>/...`` with optional ``root/val/...`` and ``root/test/...``;
    or ``root/<class>/...`` directly. A split without its own folder is carved out of the
    training images by a seeded, stratified split (``val_split`` / ``test_split`` are fractions
    of the training images). Files are found recursively by extension; hidden files are skipped.

    Errors before training: a missing ``root``, no class folders, an empty class folder, a
    val/test class folder unknown to train (in ``__init__``); a class whose every image is
    unreadable (in ``setup``). Unreadable files are skipped with a warning naming them
    (``verify``: ``"header"`` checks size and header, ``"full"`` decodes everything, ``"none"``
    defers to load time, where a failure warns and substitutes the next readable sample).

    Args:
        root: dataset folder.
        val_split, test_split: fractions of the training images used when ``root/val_dir`` /
            ``root/test_dir`` do not exist.
        train_dir, val_dir, test_dir: split folder names under ``root`` (train: if absent,
            ``root`` itself holds the class folders).
        verify: how unreadable files are detected up front (see above).
        Other args: see :class:`BaseImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        image_size: ImageSize = 224,
        batch_size: int = 32,
        num_workers: Optional[int] = None,
        val_split: float = 0.2,
        test_split: float = 0.0,
        seed: int = 0,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str = "test",
        augment: AugmentArg = True,
        resize: ResizeMode = "squash",
        antialias: bool = False,
        verify: Verify = "header",
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
        check_verify_mode(verify)
        if not (0 <= val_split < 1 and 0 <= test_split < 1 and val_split + test_split < 1):
            raise ConfigError(f"val_split={val_split}, test_split={test_split}: each in [0, 1), sum < 1")
        self.root = Path(os.path.expanduser(root))
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"dataset root {str(self.root)!r} does not exist or is not a directory")
        self.val_split = float(val_split)
        self.test_split = float(test_split)
        self.verify: Verify = verify

        self.train_root = resolve_split_dir(self.root, train_dir) or self.root
        self._set_class_names(find_classes(self.train_root))
        # Indexing (a directory walk, no decoding) happens here so that layout errors surface at
        # construction, before any training starts.
        self._lists: Dict[str, Optional[FileList]] = {"train": index_class_folders(self.train_root, self.class_names)}
        self.split_dirs: Dict[str, Optional[Path]] = {"train": self.train_root}
        for split, name in (("val", val_dir), ("test", test_dir)):
            d = resolve_split_dir(self.root, name) if self.train_root != self.root else None
            self.split_dirs[split] = d
            self._lists[split] = index_class_folders(d, self.class_names, allow_missing=True) if d else None

    def _build_splits(self) -> Dict[str, SplitDataset]:
        source, ids = build_file_splits(
            self._lists, self.class_names, self.val_split, self.test_split, self.seed, self.verify, root=self.root
        )
        return {s: self._split_dataset(source, ids[s]) for s in ("train", "val", "test")}

    def _no_test_hint(self) -> str:
        return f"add {str(self.root / 'test')!r} (one folder per class) or set test_split > 0"
