"""ImageNet-C's six frost photographs: where they are installed, loaded and resized as the reference does.

The photographs ship with the ``imagecorruptions`` package on PyPI (``pip install
"keras-lightning-zoo[imagenet-c]"``) and with Hendrycks' ``imagenet_c`` package; the directory
named by ``$IMAGENET_C_FROST_DIR`` (e.g. a checkout's ``ImageNet-C/create_c``) is tried first.
The packages are located, never imported (``imagecorruptions`` needs OpenCV and ``pkg_resources``
at import time; only its image files are used here).

Decoding: Pillow, ``convert("RGB")`` (drops the PNGs' alpha channel exactly as ``cv2.imread``
does; the test suite checks the pixels against OpenCV where it is installed).
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

FROST_FILES: Tuple[str, ...] = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
#: The reference draws ``np.random.randint(5)``: frost6 is listed but never used.
FROST_DRAWN = 5
#: Packages that ship a ``frost/`` directory with the six photographs.
FROST_PACKAGES: Tuple[str, ...] = ("imagecorruptions", "imagenet_c")
FROST_DIR_ENV = "IMAGENET_C_FROST_DIR"
#: imagecorruptions' margin when it must enlarge a photograph to cover the image.
ENLARGE_MARGIN = 1.1


def _complete(d: Path) -> bool:
    return all((d / name).is_file() for name in FROST_FILES)


@lru_cache(maxsize=1)
def frost_photo_dir() -> Optional[Path]:
    """The directory holding the six frost photographs, or ``None`` when none is installed."""
    env = os.environ.get(FROST_DIR_ENV)
    if env:
        if _complete(Path(env)):
            return Path(env)
        warnings.warn(f"${FROST_DIR_ENV}={env} does not hold {', '.join(FROST_FILES)}; ignoring it", stacklevel=2)
    for package in FROST_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            if _complete(Path(location) / "frost"):
                return Path(location) / "frost"
    return None


@lru_cache(maxsize=len(FROST_FILES))
def load_frost_photo(index: int) -> np.ndarray:
    """Photograph ``index`` (0-based) as ``H x W x 3`` uint8 RGB."""
    folder = frost_photo_dir()
    if folder is None:
        raise FileNotFoundError(
            "the ImageNet-C frost photographs are not installed: pip install 'keras-lightning-zoo[imagenet-c]' "
            f"(the imagecorruptions package ships them), or set ${FROST_DIR_ENV} to a folder holding "
            f"{', '.join(FROST_FILES)}"
        )
    with Image.open(folder / FROST_FILES[index]) as img:
        return np.asarray(img.convert("RGB")).copy()


def cv2_resize_linear(img: np.ndarray, factor: float) -> np.ndarray:
    """``cv2.resize(img, (0, 0), fx=factor, fy=factor)`` (``INTER_LINEAR``) of an ``H x W x C`` uint8 image.

    Output size ``round(side * factor)``; source coordinate ``(d + 0.5) / factor - 0.5``, clamped at the
    borders; OpenCV's 11-bit fixed-point weights and rounding. With ``factor`` 0.2 (CIFAR-10-C) every
    coordinate is an integer, so the result is a plain subsampling of the photograph."""
    h, w = img.shape[:2]
    out_h, out_w = int(np.rint(h * factor)), int(np.rint(w * factor))
    scale = 1.0 / factor

    def taps(n_out: int, n_in: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = (np.arange(n_out) + 0.5) * scale - 0.5
        s = np.floor(f).astype(np.int64)
        t = (f - s).astype(np.float32)
        t[s < 0], s[s < 0] = 0, 0
        last = s >= n_in - 1
        t[last], s[last] = 0, n_in - 1
        c0 = np.rint((np.float32(1) - t) * 2048).astype(np.int64)
        return s, np.minimum(s + 1, n_in - 1), np.stack([c0, 2048 - c0])

    y0, y1, cy = taps(out_h, h)
    x0, x1, cx = taps(out_w, w)
    src = img.astype(np.int64)
    rows0 = src[y0][:, x0] * cx[0][None, :, None] + src[y0][:, x1] * cx[1][None, :, None]
    rows1 = src[y1][:, x0] * cx[0][None, :, None] + src[y1][:, x1] * cx[1][None, :, None]
    out = (rows0 * cy[0][:, None, None] + rows1 * cy[1][:, None, None] + (1 << 21)) >> 22
    return np.clip(out, 0, 255).astype(np.uint8)


def enlarge_to_cover(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """imagecorruptions' rule for a photograph smaller than the image: scale it by the larger of the two
    side ratios times 1.1, bicubic (``cv2.INTER_CUBIC`` there; torch's bicubic here, the same kernel
    without OpenCV's fixed-point rounding: within one 8-bit level)."""
    ph, pw = img.shape[:2]
    if ph >= h and pw >= w:
        return img
    factor = max(h / ph, w / pw) * ENLARGE_MARGIN
    size = (int(math.ceil(ph * factor)), int(math.ceil(pw * factor)))
    t = torch.from_numpy(img).permute(2, 0, 1)[None].to(torch.float32)
    out = F.interpolate(t, size=size, mode="bicubic", align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@lru_cache(maxsize=64)
def frost_layer_source(index: int, scale: float, h: int, w: int, device: torch.device) -> Tensor:
    """Photograph ``index`` resized by ``scale`` (the table's photo scale), enlarged to cover ``h x w`` if
    needed, as uint8 ``[3, PH, PW]`` on ``device`` (cached)."""
    img = load_frost_photo(index)
    if scale != 1:
        img = cv2_resize_linear(img, scale)
    img = enlarge_to_cover(img, h, w)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous().to(device)


__all__ = [
    "FROST_DIR_ENV",
    "FROST_DRAWN",
    "FROST_FILES",
    "FROST_PACKAGES",
    "cv2_resize_linear",
    "enlarge_to_cover",
    "frost_layer_source",
    "frost_photo_dir",
    "load_frost_photo",
]
