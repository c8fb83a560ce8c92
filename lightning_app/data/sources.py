"""Where samples come from (image files or in-memory arrays) and the per-split dataset that serves them.

A *source* holds every sample of a dataset (labels known up front) and decodes one on demand.
A :class:`SplitDataset` is a view of some source ids (one split) that yields
``(uint8 [3, H, W] image already resized, int label, int index)``, where ``index`` is the
position inside the split; it is what the feature cache and per-sample seeded perturbations key on.
Its :meth:`~SplitDataset.unresized` view (sources whose images all have one size) yields the images at that
size instead, for a resize on the device (:func:`lightning_app.data.resize.resize_batch`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_app.data.images import ImageDecodeError, PathLike, load_rgb, relpath_or_abs, warn_bad_image
from lightning_app.data.resize import ResizeMode, hwc_to_chw, resize_image


class Source(Protocol):
    """What :class:`SplitDataset` needs from a source."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def load(self, i: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB for sample ``i``; raises :class:`ImageDecodeError` if unreadable."""

    def describe(self, i: int) -> str:
        """Human-readable name of sample ``i`` (a file path) for warnings."""

    def update_fingerprint(self, h: "hashlib._Hash", ids: np.ndarray) -> None:
        """Feed the identity of samples ``ids`` (in order) into ``h``."""

    @property
    def uniform_size(self) -> Optional[Tuple[int, int]]:
        """``(H, W)`` when every sample has that size (known without decoding), else ``None``."""


class FileSource:
    """Image files with integer labels; ``root`` makes fingerprints independent of where the set lives."""

    def __init__(self, paths: Sequence[PathLike], labels: Sequence[int], root: Optional[PathLike] = None) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths: List[str] = [os.fspath(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.root = os.fspath(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        return load_rgb(self.paths[i])

    @property
    def uniform_size(self) -> Optional[Tuple[int, int]]:
        """``None``: file sizes are only known once decoded."""
        return None

    def describe(self, i: int) -> str:
        return self.paths[i]

    def update_fingerprint(self, h: "hashlib._Hash", ids: np.ndarray) -> None:
        for i in ids:
            p = self.paths[int(i)]
            st = os.stat(p)
            name = relpath_or_abs(p, self.root) if self.root else Path(p).resolve().as_posix()
            # surrogateescape: a file name that is not valid UTF-8 hashes as its bytes on disk
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{int(self.labels[int(i)])}\n"
                     .encode("utf-8", "surrogateescape"))


class ArraySource:
    """In-memory uint8 images ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]`` with labels."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], name: str = "array") -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"images must be [N, H, W] or [N, H, W, 3], got shape {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    @property
    def uniform_size(self) -> Optional[Tuple[int, int]]:
        """``(H, W)`` of the array."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def load(self, i: int) -> np.ndarray:
        img = self.images[i]
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        return img

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def update_fingerprint(self, h: "hashlib._Hash", ids: np.ndarray) -> None:
        h.update(f"{self.name}\0{self.images.shape[1:]}\n".encode())
        for start in range(0, len(ids), 4096):  # chunked: never copies a whole large split at once
            chunk = ids[start:start + 4096]
            h.update(np.ascontiguousarray(self.images[chunk]).tobytes())
            h.update(self.labels[chunk].tobytes())


class SplitDataset(Dataset):
    """Samples ``ids`` of ``source``, decoded and resized: ``(uint8 [3, H, W], label, index)``.

    On a decode failure it warns (naming the file) and returns the next readable sample of
    this split (index ``i+1``, ``i+2``, ... wrapping around) with that sample's image and
    label but the requested ``index``: deterministic, the batch keeps its size and
    every index in ``0..len-1`` still appears exactly once per epoch. If nothing in the
    split is readable it raises.

    :meth:`reporting` gives the view used for prediction, where a file's row must be its own: it never
    substitutes and yields ``(image, label, index, ok)``, a black image with ``ok=False`` for an unreadable file.
    :meth:`unresized` gives the view that leaves the resize to the device (same samples, images at the source's
    one size).
    """

    def __init__(
        self,
        source: Source,
        ids: Sequence[int],
        image_size: Tuple[int, int],
        resize: ResizeMode = "squash",
        antialias: bool = False,
    ) -> None:
        self.source = source
        self.ids = np.asarray(ids, dtype=np.int64)
        self.image_size = tuple(image_size)
        self.resize = resize
        self.antialias = antialias
        self.report_errors = False
        self.resize_in_worker = True

    def _view(self) -> "SplitDataset":
        view = SplitDataset(self.source, self.ids, self.image_size, self.resize, self.antialias)
        view.report_errors, view.resize_in_worker = self.report_errors, self.resize_in_worker
        return view

    def reporting(self) -> "SplitDataset":
        """The same samples, yielding ``(image, label, index, ok)`` and never another sample in place of an
        unreadable one (see the class docstring)."""
        view = self._view()
        view.report_errors = True
        return view

    @property
    def uniform_size(self) -> Optional[Tuple[int, int]]:
        """The one ``(H, W)`` of this split's source images (``None``: sizes vary or are unknown)."""
        return self.source.uniform_size

    def unresized(self) -> "SplitDataset":
        """The same samples with images at the source's size (:attr:`uniform_size`), uint8 ``[3, h, w]``; the
        resize to ``image_size`` is left to :func:`lightning_app.data.resize.resize_batch` on the device."""
        if self.uniform_size is None:
            raise ValueError(f"{self.describe(0) if len(self) else 'this split'}: images of varying size cannot be "
                             f"batched before resizing")
        view = self._view()
        view.resize_in_worker = False
        return view

    @property
    def served_size(self) -> Tuple[int, int]:
        """``(H, W)`` of the images this view yields."""
        return self.image_size if self.resize_in_worker else self.uniform_size  # type: ignore[return-value]

    def describe(self, index: int) -> str:
        """The file path (or array name) of sample ``index``."""
        return self.source.describe(int(self.ids[index]))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> np.ndarray:
        """Labels of this split, in index order."""
        return self.source.labels[self.ids]

    def _sample(self, i: int) -> Tuple[torch.Tensor, int]:
        sid = int(self.ids[i])
        img = self.source.load(sid)
        if not self.resize_in_worker:  # HWC -> CHW copy, no resize (see ``unresized``)
            return hwc_to_chw(img), int(self.source.labels[sid])
        return resize_image(img, self.image_size, self.resize, self.antialias), int(self.source.labels[sid])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        n = len(self.ids)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a split of {n} samples")
        try:
            image, label = self._sample(index)
            return (image, label, index, True) if self.report_errors else (image, label, index)
        except ImageDecodeError as err:
            first = err
        if self.report_errors:
            warn_bad_image(first.path, f"{first}; it gets a row with the error, no prediction")
            blank = torch.zeros((3, *self.served_size), dtype=torch.uint8)
            return blank, int(self.source.labels[int(self.ids[index])]), index, False
        for step in range(1, n):
            j = (index + step) % n
            try:
                image, label = self._sample(j)
            except ImageDecodeError:
                continue
            warn_bad_image(first.path, f"{first}; sample {j} of the split ({self.source.describe(int(self.ids[j]))}) "
                                       f"is used in its place")
            return image, label, index
        raise RuntimeError(f"no readable image in this split of {n} samples; first failure: {first}")

    def update_fingerprint(self, h: "hashlib._Hash") -> None:
        """Feed this split's content, size and resize settings into ``h``."""
        h.update(f"split\0{len(self.ids)}\0{self.image_size}\0{self.resize}\0{self.antialias}\n".encode())
        self.source.update_fingerprint(h, self.ids)
