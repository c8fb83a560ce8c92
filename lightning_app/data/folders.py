"""Index a class-per-subfolder image tree (Keras ``image_dataset_from_directory`` layout)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from lightning_app.data.images import IMG_EXTENSIONS, PathLike, is_image_file
from lightning_app.errors import DatasetLayoutError, DatasetNotFoundError


def find_classes(directory: PathLike) -> List[str]:
    """Sorted names of the non-hidden subfolders of ``directory`` (one per class)."""
    d = Path(directory)
    if not d.is_dir():
        raise DatasetNotFoundError(f"image folder {str(d)!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = [e.name for e in os.scandir(d) if e.is_file() and is_image_file(e.name)]
        hint = (f" It holds {len(loose)} image file(s) directly: move them into one subfolder per class."
                if loose else "")
        raise DatasetLayoutError(
            f"no class subfolders in {str(d)!r}: expected {str(d / '<class name>' / '<image>.jpg')!r}.{hint}"
        )
    return classes


def list_images(directory: PathLike) -> List[str]:
    """Image files under ``directory`` (recursive, hidden entries and symlinked dirs skipped), sorted."""
    out: List[str] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return out


def index_class_folders(
    directory: PathLike,
    class_names: Sequence[str],
    allow_missing: bool = False,
) -> Tuple[List[str], List[int]]:
    """(paths, labels) for ``directory/<class>/**`` over ``class_names`` (label = position in the list).

    Raises :class:`DatasetLayoutError` naming the folder when a class folder holds no image
    files, when ``directory`` has class folders not in ``class_names``, or (unless
    ``allow_missing``) when a class folder is missing.
    """
    d = Path(directory)
    present = find_classes(d)
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise DatasetLayoutError(
            f"{str(d)!r} has class folder(s) {unknown} that the training folder does not have "
            f"(training classes: {list(class_names)})"
        )
    paths: List[str] = []
    labels: List[int] = []
    for label, name in enumerate(class_names):
        folder = d / name
        if not folder.is_dir():
            if allow_missing:
                continue
            raise DatasetLayoutError(f"class folder {str(folder)!r} is missing")
        files = list_images(folder)
        if not files:
            raise DatasetLayoutError(
                f"class folder {str(folder)!r} contains no image files "
                f"(looked for {', '.join(IMG_EXTENSIONS)}): add images or remove the folder"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, labels


def resolve_split_dir(root: PathLike, name: Optional[str]) -> Optional[Path]:
    """``root/name`` when ``name`` is set and that folder exists, else ``None``."""
    if not name:
        return None
    p = Path(root) / name
    return p if p.is_dir() else None
