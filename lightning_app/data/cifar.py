"""CIFAR-10 from the official python pickle batches (downloaded by torchvision when online).

Reading uses our own small reader of the standard format instead of ``torchvision.datasets.CIFAR10``:
torchvision insists on the md5 of every batch file, so it cannot be tested offline with a tiny
file in the same format, and it would try to re-download anything that fails the check.
Checksums are still available (``verify_checksums=True``) and a download always checks the
archive's md5 (torchvision's ``download_and_extract_archive``).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from lightning_app.data.augment import AugmentArg
from lightning_app.data.base import BaseImageDataModule, Split
from lightning_app.data.resize import ImageSize, ResizeMode, ResizeOn
from lightning_app.data.sources import ArraySource, SplitDataset
from lightning_app.data.splits import stratified_split
from lightning_app.errors import DatasetFileError, DatasetNotFoundError

CIFAR10_CLASSES: List[str] = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILES = ["test_batch"]
CIFAR10_META_FILE = "batches.meta"


def cifar10_missing(root: os.PathLike) -> List[str]:
    """Paths of the CIFAR-10 batch files missing under ``root/cifar-10-batches-py``."""
    folder = Path(root) / CIFAR10_FOLDER
    return [str(folder / f) for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES if not (folder / f).is_file()]


def _not_found_message(root: Path, missing: List[str], cause: str) -> str:
    return (
        f"CIFAR-10 not found ({cause}). Put either the extracted folder "
        f"{str(root / CIFAR10_FOLDER)!r} (data_batch_1..data_batch_5, test_batch, batches.meta) "
        f"or the archive {str(root / CIFAR10_ARCHIVE)!r} (from {CIFAR10_URL}, md5 {CIFAR10_ARCHIVE_MD5}) there, "
        f"or run once with download=True on a machine with internet access. "
        f"Missing: {', '.join(missing)}"
    )


def ensure_cifar10(root: os.PathLike, download: bool = True, verify_checksums: bool = False) -> Path:
    """Make sure ``root/cifar-10-batches-py`` is complete: use it, else extract a local archive,
    else download (when ``download``). Returns the folder; raises :class:`DatasetNotFoundError`."""
    root = Path(root)
    folder = root / CIFAR10_FOLDER
    if not cifar10_missing(root):
        if verify_checksums:
            _verify_cifar10_md5(folder)
        return folder
    archive = root / CIFAR10_ARCHIVE
    if archive.is_file():
        from torchvision.datasets.utils import extract_archive

        extract_archive(str(archive), str(root))
    elif download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR10_URL, str(root), filename=CIFAR10_ARCHIVE, md5=CIFAR10_ARCHIVE_MD5)
        except Exception as err:  # URLError, timeouts, md5 mismatch: all mean "get the file yourself"
            raise DatasetNotFoundError(
                _not_found_message(root, cifar10_missing(root), f"download failed: {type(err).__name__}: {err}")
            ) from err
    missing = cifar10_missing(root)
    if missing:
        cause = "the archive did not contain the expected files" if archive.is_file() else "download=False"
        raise DatasetNotFoundError(_not_found_message(root, missing, cause))
    if verify_checksums:
        _verify_cifar10_md5(folder)
    return folder


def _verify_cifar10_md5(folder: Path) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    bad = [name for name, md5 in CIFAR10.train_list + CIFAR10.test_list if not check_integrity(str(folder / name), md5)]
    if bad:
        raise DatasetFileError(
            f"CIFAR-10 files with a wrong md5 in {str(folder)!r}: {bad}; delete them and download again"
        )


def read_cifar_batch(path: os.PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> (uint8 ``[N, 32, 32, 3]``, int64 labels ``[N]``)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError) as err:
        raise DatasetFileError(f"{os.fspath(path)!r} is not a CIFAR python batch ({type(err).__name__}: {err})") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetFileError(
            f"{os.fspath(path)!r}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar10(folder: os.PathLike, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """All training (or test) batches of ``folder`` concatenated."""
    names = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    parts = [read_cifar_batch(Path(folder) / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar10_classes(folder: os.PathLike) -> Optional[List[str]]:
    """``label_names`` from ``batches.meta`` (``None`` when the file is absent)."""
    path = Path(folder) / CIFAR10_META_FILE
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return [str(n) for n in pickle.load(f, encoding="latin1")["label_names"]]


class Cifar10DataModule(BaseImageDataModule):
    """CIFAR-10: 50,000 training images (a seeded stratified ``val_split`` held out) and the official
    10,000 test images, 32x32 upsampled to ``image_size`` in the workers.

    ``prepare_data`` uses ``root/cifar-10-batches-py``, else extracts ``root/cifar-10-python.tar.gz``,
    else downloads it (``download=True``); offline and missing, it raises an error naming both paths.

    Args:
        root: folder holding ``cifar-10-batches-py`` (or where it is downloaded).
        download: download when missing.
        verify_checksums: check the md5 of every batch file (the official files only).
        val_split: fraction of the training images used for validation.
        Other args: :class:`BaseImageDataModule`.
    """

    def __init__(
        self,
        root: str = "data",
        image_size: ImageSize = 224,
        batch_size: int = 32,
        num_workers: Optional[int] = None,
        val_split: float = 0.1,
        seed: int = 0,
        download: bool = True,
        verify_checksums: bool = False,
        augment: AugmentArg = True,
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
        self.root = Path(os.path.expanduser(root))
        self.val_split = float(val_split)
        self.download = bool(download)
        self.verify_checksums = bool(verify_checksums)
        self._set_class_names(CIFAR10_CLASSES)

    def prepare_data(self) -> None:
        """Extract or download when needed (Lightning runs this on one process per node)."""
        ensure_cifar10(self.root, download=self.download, verify_checksums=self.verify_checksums)

    def _build_splits(self) -> Dict[str, SplitDataset]:
        missing = cifar10_missing(self.root)
        if missing:  # setup() without prepare_data(): never download from here (all ranks run setup)
            ensure_cifar10(self.root, download=False)
        folder = self.root / CIFAR10_FOLDER
        names = read_cifar10_classes(folder)
        if names is not None and names != CIFAR10_CLASSES:
            raise DatasetFileError(f"{str(folder / CIFAR10_META_FILE)!r} lists classes {names}, expected {CIFAR10_CLASSES}")
        x_train, y_train = read_cifar10(folder, train=True)
        x_test, y_test = read_cifar10(folder, train=False)
        train_src = ArraySource(x_train, y_train, name="cifar10_train")
        test_src = ArraySource(x_test, y_test, name="cifar10_test")
        tr, va, _ = stratified_split(y_train, self.val_split, 0.0, self.seed)
        return {
            "train": self._split_dataset(train_src, tr),
            "val": self._split_dataset(train_src, va),
            "test": self._split_dataset(test_src, np.arange(len(test_src))),
        }
