"""Predict on image files: folders (searched recursively, labelled or not) and / or single files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lightning_app.data.base import BaseImageDataModule
from lightning_app.data.folders import list_images
from lightning_app.data.resize import ImageSize, ResizeMode
from lightning_app.data.sources import FileSource, SplitDataset
from lightning_app.errors import ConfigError, DatasetLayoutError, DatasetNotFoundError


def collect_image_files(inputs: Sequence[str], class_names: Sequence[str] = ()) -> Tuple[List[str], List[int]]:
    """``(paths, labels)`` for ``inputs``: a folder gives its image files (recursive, sorted, hidden entries skipped),
    a file is taken as given. A file under ``<folder>/<class name>/`` is labelled with that class (its position in
    ``class_names``), any other file ``-1`` (unlabelled)."""
    index = {name: i for i, name in enumerate(class_names)}
    paths: List[str] = []
    labels: List[int] = []
    for item in inputs:
        p = Path(os.path.expanduser(str(item)))
        if p.is_dir():
            files = list_images(p)
            if not files:
                raise DatasetLayoutError(f"no image files under {str(p)!r} (looked recursively for .jpg, .png, ...)")
            for f in files:
                first = Path(f).relative_to(p).parts[0]
                paths.append(f)
                labels.append(index.get(first, -1) if len(Path(f).relative_to(p).parts) > 1 else -1)
        elif p.is_file():
            paths.append(str(p))
            labels.append(-1)
        else:
            raise DatasetNotFoundError(f"{str(p)!r} is neither an image file nor a folder: check the inputs to predict")
    return paths, labels


class ImageFilesDataModule(BaseImageDataModule):
    """Serves image files for ``predict``, one row per file in ``predictions.csv`` (an unreadable file gets a row
    with its error, never another file's prediction).

    Args:
        inputs: image files and / or folders (searched recursively).
        class_names: the model's classes, in output order (the CLI takes them from the checkpoint); files in a
            ``<folder>/<class name>/`` sub-folder are labelled with that class.
        image_size, resize, antialias: as the model was trained (the CLI takes them from the checkpoint).
        Other args: see :class:`~lightning_app.data.base.BaseImageDataModule`.
    """

    def __init__(self, inputs: List[str], class_names: Sequence[str] = (), image_size: ImageSize = 224,
                 batch_size: int = 32, num_workers: Optional[int] = None, resize: ResizeMode = "squash", antialias: bool = False,
                 pin_memory: Optional[bool] = None) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers, augment=False,
                         resize=resize, antialias=antialias, predict_split="train", pin_memory=pin_memory)
        if not inputs:
            raise ConfigError("nothing to predict: give image files or folders")
        self.inputs = [str(i) for i in inputs]
        self.class_names = [str(n) for n in class_names]
        self.paths, self.labels = collect_image_files(self.inputs, self.class_names)
        self.predict_report_errors = True

    def _build_splits(self) -> Dict[str, SplitDataset]:
        source = FileSource(self.paths, self.labels)
        empty = self._split_dataset(source, [])
        return {"train": self._split_dataset(source, range(len(self.paths))), "val": empty, "test": empty}

    def train_dataloader(self):  # noqa: D102
        raise ConfigError(f"{type(self).__name__} serves predict only: train with an image DataModule")


__all__ = ["ImageFilesDataModule", "collect_image_files"]
