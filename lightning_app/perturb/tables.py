"""Severity tables: the parameter of each corruption at severities 1..5.

Sources (hendrycks/robustness, ``ImageNet-C/create_c/``):

* ``imagenet``: ``make_imagenet_c.py`` (224 x 224 crops; identical to the ``imagenet_c``
  package's ``corruptions.py``).
* ``imagenet299``: ``make_imagenet_c_inception.py``, the same recipes with their own parameters
  for 299 x 299 inputs (Inception-size models): larger blur radii, stronger noise, lower JPEG
  quality, elastic constants 360 instead of 244.
* ``cifar10``: ``make_cifar_c.py`` (32 x 32; commit ca36008 of that file). Its values match
  the ones quoted in our REFERENCE.md (Gaussian sigma .04 .06 .08 .09 .10; JPEG 80 65 58 50 40).
  Caveat: the released CIFAR-10-C arrays cannot be checked offline against this script.

``"auto"`` (:func:`resolve_table`) picks ``imagenet`` or ``imagenet299`` by image size.

Units are the reference's: pixels for blur radii and sigmas, [0, 1] for intensities.
``elastic_transform`` is given in pixels at the table's ``size`` and is scaled by
``min(H, W) / size`` (the reference hard-codes 244 for 224 images: "should have been 224,
but ultimately nothing is incorrect"); all other pixel parameters are used as they are.
``frost`` is ``(image weight, frost weight, photo scale)``: the CIFAR script shrinks the frost
photographs to 0.2 of their size before cropping (``cv2.resize(frost, (0, 0), fx=0.2, fy=0.2)``).
``spatter`` is ``(loc, scale, sigma, threshold, intensity, mud)``: ``mud`` 0 is the water
variant, 1 the mud variant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

Params = Tuple[Any, Any, Any, Any, Any]


@dataclass(frozen=True)
class SeverityTable:
    """Parameters per corruption (five severities) for images of ``size`` pixels."""

    name: str
    size: int
    params: Dict[str, Params]


_E = 244  # ImageNet-C's elastic constant for 224 images

IMAGENET = SeverityTable(
    name="imagenet",
    size=224,
    params={
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        # np.arange(start, stop, step)
        "zoom_blur": ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)),
        "snow": (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
        "frost": ((1, 0.4, 1), (0.8, 0.6, 1), (0.7, 0.7, 1), (0.65, 0.7, 1), (0.6, 0.75, 1)),
        "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
        "spatter": (
            (0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1),
        ),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
        "jpeg_compression": (25, 18, 15, 10, 7),
        # (alpha, sigma, affine jitter) in pixels at 224
        "elastic_transform": (
            (_E * 2, _E * 0.7, _E * 0.1),
            (_E * 2, _E * 0.08, _E * 0.2),
            (_E * 0.05, _E * 0.01, _E * 0.02),
            (_E * 0.07, _E * 0.01, _E * 0.02),
            (_E * 0.12, _E * 0.01, _E * 0.02),
        ),
    },
)

_I = 360  # make_imagenet_c_inception.py's elastic constant for 299 images

IMAGENET299 = SeverityTable(
    name="imagenet299",
    size=299,
    params={
        **IMAGENET.params,  # zoom_blur, snow, frost, contrast, brightness, saturate: as at 224
        "gaussian_noise": (0.09, 0.13, 0.19, 0.27, 0.40),
        "shot_noise": (50, 20, 10, 5, 3),
        "impulse_noise": (0.04, 0.07, 0.10, 0.18, 0.28),
        "speckle_noise": (0.16, 0.21, 0.36, 0.46, 0.61),
        "gaussian_blur": (1.5, 2.5, 3.5, 4.5, 6.5),
        "defocus_blur": ((4, 0.1), (5, 0.5), (7, 0.5), (10, 0.5), (12, 0.5)),
        "glass_blur": ((0.8, 1, 3), (1, 3, 1), (1.1, 2, 4), (1.2, 4, 2), (1.6, 5, 2)),
        "motion_blur": ((12, 4), (17, 6), (17, 9), (17, 13), (22, 16)),
        "fog": ((1.5, 2), (2, 2), (2.5, 1.8), (2.5, 1.6), (3, 1.5)),
        "spatter": (
            (0.65, 0.3, 4, 0.69, 0.9, 0),
            (0.65, 0.3, 3.5, 0.68, 0.9, 0),
            (0.65, 0.3, 3, 0.68, 0.8, 0),
            (0.65, 0.3, 1.2, 0.65, 1.8, 1),
            (0.67, 0.4, 1.2, 0.65, 1.8, 1),
        ),
        "pixelate": (0.5, 0.4, 0.3, 0.25, 0.2),
        "jpeg_compression": (23, 16, 13, 8, 5),
        "elastic_transform": (
            (_I * 2, _I * 0.7, _I * 0.1),
            (_I * 2, _I * 0.08, _I * 0.2),
            (_I * 0.05, _I * 0.01, _I * 0.02),
            (_I * 0.07, _I * 0.01, _I * 0.02),
            (_I * 0.12, _I * 0.01, _I * 0.02),
        ),
    },
)

_C = 32  # make_cifar_c.py's IMSIZE

CIFAR10 = SeverityTable(
    name="cifar10",
    size=32,
    params={
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
        "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "zoom_blur": ((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)),
        "snow": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        "frost": ((1, 0.2, 0.2), (1, 0.3, 0.2), (0.9, 0.4, 0.2), (0.85, 0.4, 0.2), (0.75, 0.45, 0.2)),
        "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        "spatter": (
            (0.62, 0.1, 0.7, 0.7, 0.5, 0),
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1),
        ),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
        "jpeg_compression": (80, 65, 58, 50, 40),
        # (alpha, sigma, affine jitter) in pixels at 32
        "elastic_transform": (
            (_C * 0, _C * 0, _C * 0.08),
            (_C * 0.05, _C * 0.2, _C * 0.07),
            (_C * 0.08, _C * 0.06, _C * 0.06),
            (_C * 0.1, _C * 0.04, _C * 0.05),
            (_C * 0.1, _C * 0.03, _C * 0.03),
        ),
    },
)

TABLES: Dict[str, SeverityTable] = {t.name: t for t in (IMAGENET, IMAGENET299, CIFAR10)}
#: ``table`` value that picks the ImageNet-C table for the image size (:func:`resolve_table`).
AUTO = "auto"
#: Below this many pixels (shorter side) ``"auto"`` picks the 224 table, from it on the 299 table
#: (the midpoint of 224 and 299, rounded up).
AUTO_299_FROM = 262


def resolve_table(table: str, size: Optional[Sequence[int]] = None) -> SeverityTable:
    """The severity table ``table`` names; ``"auto"``: ``imagenet`` (224) for images whose shorter
    side is below 262 px (or of unknown size), ``imagenet299`` from 262 px on (299, 331, ...)."""
    if table == AUTO:
        return IMAGENET299 if size is not None and min(size) >= AUTO_299_FROM else IMAGENET
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(map(repr, [*TABLES, AUTO]))}")
    return TABLES[table]
