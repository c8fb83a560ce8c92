"""Image DataModules: folders, CIFAR-10, Food-101 and offline bundled sets (see ``base`` for the batch contract)."""
from lightning_app.data.augment import Augment
from lightning_app.data.base import BaseImageDataModule, BatchTransform
from lightning_app.data.bundled import ArrayDataModule, DigitsDataModule
from lightning_app.data.cifar import CIFAR10_CLASSES, Cifar10DataModule
from lightning_app.data.datamodule import ImageFolderDataModule
from lightning_app.data.files import ImageFilesDataModule
from lightning_app.data.food import FOOD101_CLASSES, Food101DataModule
from lightning_app.errors import DatasetLayoutError, DatasetNotFoundError

__all__ = [
    "ArrayDataModule",
    "Augment",
    "BaseImageDataModule",
    "BatchTransform",
    "CIFAR10_CLASSES",
    "Cifar10DataModule",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FOOD101_CLASSES",
    "Food101DataModule",
    "ImageFilesDataModule",
    "ImageFolderDataModule",
]
