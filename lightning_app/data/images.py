"""Safe image decoding: any file PIL can open becomes 8-bit RGB; anything else is reported, not crashed on.

Two layers:

* :func:`scan_images` runs once per dataset before training (``setup``). The default
  ``verify="header"`` is cheap (one ``stat`` and one header read per file) and drops
  zero-byte files, non-images with an image extension and unknown formats.
  ``verify="full"`` decodes every file and also catches truncated / corrupt pixel data
  (slow on large sets). ``verify="none"`` skips the scan.
* :func:`load_rgb` is what workers call per sample. It raises :class:`ImageDecodeError`
  (naming the file) for anything the scan missed; the dataset turns that into a warning
  and a deterministic replacement sample (see ``sources.SplitDataset``).

Mode conversion follows Keras (``load_img(color_mode="rgb")`` / ``tf.io.decode_image(channels=3)``):
alpha is dropped (not composited), grayscale is replicated, CMYK / palette / YCbCr go
through PIL's RGB conversion, and 16/32-bit integer images are rescaled to 8 bits (PIL's own
``convert("RGB")`` would clip them to 255). EXIF orientation is not applied (Keras does not).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, List, Literal, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from lightning_app.errors import ConfigError

PathLike = Union[str, os.PathLike]
Verify = Literal["none", "header", "full"]

#: Extensions indexed as images (Keras' allow-list plus torchvision's), compared lower-case.
IMG_EXTENSIONS: Tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp",
)

_MAX_NAMED = 20  # files named in one warning; the rest are counted


class ImageDecodeError(RuntimeError):
    """A file could not be decoded as an image; ``path`` names it."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"cannot decode image {os.fspath(path)!r}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class BadImageWarning(UserWarning):
    """An image file could not be used; the warning's location is the file itself (``path:0: BadImageWarning``)."""


def warn_bad_image(path: PathLike, message: str) -> None:
    """Warn about ``path`` with the image file as the warning's location (not the code that happened to read it,
    e.g. torch's DataLoader ``fetch.py``); printed every time, once per file and reason."""
    warnings.warn_explicit(message, BadImageWarning, filename=os.fspath(path), lineno=0, module="lightning_app.data")


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an ``(H, W, 3)`` uint8 array."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (PNG/TIFF) or 32-bit integer grayscale: rescale the 16-bit range to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr, 0, 65535) / 257.0
        gray = np.rint(arr).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        gray = np.rint(np.clip(np.nan_to_num(arr), 0, 255)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha dropped next
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:  # defensive: should not happen after convert("RGB")
        raise ValueError(f"unexpected array shape {arr.shape} after RGB conversion")
    return arr


#: environment variable: the largest image (in pixels) decoded at all (default 1 gigapixel, ~3 GB as RGB)
MAX_PIXELS_ENV = "LIGHTNING_APP_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 1_000_000_000


def max_image_pixels() -> int:
    return int(os.environ.get(MAX_PIXELS_ENV) or DEFAULT_MAX_PIXELS)


def _pillow_limit() -> float:
    """Pixels above which Pillow refuses to open an image (2 x ``MAX_IMAGE_PIXELS``: DecompressionBombError)."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else float("inf")


def open_image(path: PathLike) -> Image.Image:
    """``Image.open`` that also opens images over Pillow's decompression-bomb limit (a guard against hostile files;
    a big photo in one's own dataset is valid input) up to :func:`max_image_pixels`, beyond which it raises
    :class:`ImageDecodeError`. Call it with Pillow's DecompressionBombWarning silenced."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # this open only (decoding runs in one thread per worker process)
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    w, h = img.size
    if w * h > max_image_pixels():
        img.close()
        raise ImageDecodeError(path, f"{w}x{h} image is over the {max_image_pixels():,}-pixel limit "
                                     f"(raise {MAX_PIXELS_ENV} to decode it)")
    return img


def _reduce_oversized(img: Image.Image, path: PathLike) -> None:
    """An image over Pillow's limit is decoded anyway (with a notice); a JPEG at the smallest reduced scale (1/2,
    1/4, 1/8: DCT scaling, memory and time divided by 4 to 64) that brings it under the limit."""
    w, h = img.size
    if w * h <= _pillow_limit():
        return
    note = ""
    if img.format == "JPEG":
        for k in (2, 4, 8):
            if (w // k) * (h // k) <= _pillow_limit() or k == 8:
                img.draft("RGB", (w // k, h // k))
                note = f", at 1/{k} scale ({img.size[0]}x{img.size[1]})"
                break
    warn_bad_image(path, f"{w}x{h} image ({w * h / 1e6:.0f} MP) is over Pillow's decompression-bomb limit: decoded "
                         f"anyway{note}; it is resized to the model's input size like any other image")


def load_rgb(path: PathLike) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array; :class:`ImageDecodeError` on failure."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageDecodeError(path, "file is empty (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as img:
                _reduce_oversized(img, path)
                img.load()  # forces the full decode: truncated data raises here
                arr = to_rgb_array(img)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
        raise ImageDecodeError(path, f"{type(err).__name__}: {err}") from err
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(path, f"image has zero size {arr.shape[:2]}")
    return arr


def check_image(path: PathLike, verify: Verify = "header") -> Union[str, None]:
    """Why ``path`` is unusable (a short reason), or ``None`` if it passes the ``verify`` level."""
    if verify == "none":
        return None
    try:
        if os.path.getsize(path) == 0:
            return "file is empty (0 bytes)"
        if verify == "full":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BadImageWarning)  # the scan's own warning names the file
                load_rgb(path)
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as img:
                w, h = img.size
        if w == 0 or h == 0:
            return f"image has zero size {(h, w)}"
    except ImageDecodeError as err:
        return err.reason
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def check_verify_mode(verify: str) -> Verify:
    """Validate a ``verify`` argument (``"none"``, ``"header"`` or ``"full"``)."""
    if verify not in ("none", "header", "full"):
        raise ConfigError(f"verify must be 'none', 'header' or 'full', got {verify!r}")
    return verify


def scan_images(paths: Sequence[PathLike], verify: Verify = "header") -> Tuple[List[int], List[Tuple[str, str]]]:
    """Check every path; return (indices of usable files, [(bad path, reason), ...]).

    Emits one ``UserWarning`` naming the skipped files (the first 20, then a count).
    """
    check_verify_mode(verify)
    good: List[int] = []
    bad: List[Tuple[str, str]] = []
    for i, p in enumerate(paths):
        reason = check_image(p, verify)
        if reason is None:
            good.append(i)
        else:
            bad.append((os.fspath(p), reason))
    if bad:
        warn_skipped(bad)
    return good, bad


def warn_skipped(bad: Iterable[Tuple[str, str]]) -> None:
    """One warning listing skipped files and why."""
    bad = list(bad)
    lines = [f"  {p}: {r}" for p, r in bad[:_MAX_NAMED]]
    more = f"\n  ... and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
    warnings.warn(
        f"skipping {len(bad)} unreadable image file(s):\n" + "\n".join(lines) + more,
        UserWarning,
        stacklevel=3,
    )


def relpath_or_abs(path: PathLike, root: PathLike) -> str:
    """``path`` relative to ``root`` when inside it (for stable fingerprints), else absolute."""
    p, r = Path(path).resolve(), Path(root).resolve()
    try:
        return p.relative_to(r).as_posix()
    except ValueError:
        return p.as_posix()
