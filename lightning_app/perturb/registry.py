"""The corruption registry, ``corrupt`` (one corruption at one severity on a batch) and ``suite``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import blur, color, digital, noise, spatter, weather
from ._rng import SampleRNG
from .photos import frost_photo_dir
from .tables import resolve_table

CorruptionFn = Callable[[Tensor, Any, SampleRNG], Tensor]

#: Name of the unperturbed entry of a suite.
CLEAN = "clean"
SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)
#: Images must be at least this many pixels on each side.
MIN_SIZE = 8
#: CPU chunk size in bytes of float32 images (a few 224 images).
_CPU_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Corruption:
    """One corruption.

    ``exact``: the same formula and parameters as the ImageNet-C reference code (random
    draws are equal in distribution, not numpy's numbers; computed in float, without the
    reference's intermediate and final 8-bit / JPEG-q85 storage). ``False`` marks an
    approximation; ``note`` says what differs. ``benchmark``: one of the 15 corruptions of
    the ImageNet-C benchmark (mCE), else one of its extra corruptions.
    """

    name: str
    fn: CorruptionFn
    category: str
    exact: bool
    benchmark: bool
    note: str = ""
    #: parameters are pixel lengths at the table's size, scaled with the image size
    scales_with_size: bool = False
    #: on the CPU, run a few images at a time (cache-sized chunks, up to 3x faster); off where
    #: a loop over the whole batch dominates (glass blur's shuffle schedule)
    cpu_chunks: bool = True


_ENTRIES = [
    Corruption("gaussian_noise", noise.gaussian_noise, "noise", True, True),
    Corruption("shot_noise", noise.shot_noise, "noise", True, True),
    Corruption("impulse_noise", noise.impulse_noise, "noise", True, True,
               "per-element salt/pepper (scikit-image >= 0.19 semantics)"),
    Corruption("defocus_blur", blur.defocus_blur, "blur", True, True),
    Corruption("glass_blur", blur.glass_blur, "blur", True, True,
               "the reference's sequential loop (its numpy 'swap' copies one pixel) reproduced "
               "exactly by a wavefront schedule",
               cpu_chunks=False),
    Corruption("motion_blur", blur.motion_blur, "blur", True, True,
               "ImageMagick MotionBlurImage kernel re-implemented (as bethgelab/imagecorruptions)"),
    Corruption("zoom_blur", blur.zoom_blur, "blur", True, True),
    Corruption("snow", weather.snow, "weather", False, True,
               "reference recipe followed, but its ImageMagick motion blur of an 8-bit snow layer is "
               "re-implemented and unverified; labelled approximate"),
    Corruption("frost", weather.frost, "weather", True, True,
               "random crops of the reference's frost photographs (installed by the [imagenet-c] extra); images "
               "larger than a photograph enlarge it as imagecorruptions does (bicubic, within one 8-bit level)")
    if frost_photo_dir() is not None else
    Corruption("frost", weather.frost, "weather", False, True,
               "procedural ice texture instead of the six frost photographs (pip install "
               "'keras-lightning-zoo[imagenet-c]' installs them); blend weights exact"),
    Corruption("fog", weather.fog, "weather", True, True),
    Corruption("brightness", color.brightness, "weather", True, True),
    Corruption("contrast", color.contrast, "digital", True, True),
    Corruption("elastic_transform", digital.elastic_transform, "digital", True, True,
               "OpenCV warpAffine's 1/32-pixel coordinates emulated; pixel parameters scale with "
               "min(H, W) / table size", scales_with_size=True),
    Corruption("pixelate", digital.pixelate, "digital", True, True,
               "Pillow's BOX coefficients in float (Pillow rounds to 8 bits after each pass)"),
    Corruption("jpeg_compression", digital.jpeg_compression, "digital", True, True,
               "Pillow/libjpeg round trip on the CPU; input rounded to 8 bits"),
    Corruption("speckle_noise", noise.speckle_noise, "noise", True, False),
    Corruption("gaussian_blur", blur.gaussian_blur, "blur", True, False),
    Corruption("spatter", spatter.spatter, "weather", True, False,
               "water (severities 1-3) and mud (4-5); OpenCV's Canny, chamfer distance, equalisation and filters "
               "re-implemented integer-exact (float32 chamfer distances may differ in the last bit)"),
    Corruption("saturate", color.saturate, "digital", True, False),
]

#: All corruptions by name (the 15 benchmark ones first, in ImageNet-C order, then extras).
CORRUPTIONS: Dict[str, Corruption] = {c.name: c for c in _ENTRIES}
#: The 15 corruptions of the ImageNet-C / CIFAR-10-C benchmark (mCE).
BENCHMARK_CORRUPTIONS: Tuple[str, ...] = tuple(c.name for c in _ENTRIES if c.benchmark)
#: ImageNet-C's extra corruptions (speckle_noise, gaussian_blur, spatter, saturate).
EXTRA_CORRUPTIONS: Tuple[str, ...] = tuple(c.name for c in _ENTRIES if not c.benchmark)


def _check_name(name: str) -> None:
    if name != CLEAN and name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {CLEAN!r}, " + ", ".join(repr(n) for n in CORRUPTIONS))


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be RGB NCHW [B, 3, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {x.dtype}")
    if x.shape[0] and min(x.shape[-2:]) < MIN_SIZE:
        raise ValueError(f"images must be at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(x.shape[-2:])}")


def _as_indices(indices: Union[Tensor, Sequence[int]], batch: int) -> List[int]:
    t = torch.as_tensor(indices)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"indices must be integers (dataset indices), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"indices must have shape [{batch}] (one dataset index per image), got {tuple(t.shape)}")
    return t.tolist()


def _scaled(params: Any, ratio: float) -> Any:
    if isinstance(params, tuple):
        return tuple(v * ratio for v in params)
    return params * ratio


def corruption_params(name: str, severity: int, table: str = "imagenet", size: Optional[Tuple[int, int]] = None) -> Any:
    """The parameter of ``name`` at ``severity`` in ``table`` (scaled to ``size`` = (H, W)
    where the corruption's parameters scale with the image size). ``table="auto"`` picks the
    ImageNet-C table for ``size`` (:func:`lightning_app.perturb.tables.resolve_table`)."""
    _check_name(name)
    t = resolve_table(table, size)
    if name == CLEAN:
        return None
    _check_severity(severity)
    params = t.params[name][severity - 1]
    if CORRUPTIONS[name].scales_with_size and size is not None:
        params = _scaled(params, min(size) / t.size)
    return params


def corrupt(
    x: Tensor,
    name: str,
    severity: int,
    indices: Union[Tensor, Sequence[int]],
    seed: int = 0,
    table: str = "imagenet",
) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a batch.

    Args:
        x: ``[B, 3, H, W]`` RGB float images in [0, 1], any device (H, W >= 8).
        name: a key of ``CORRUPTIONS``, or ``"clean"`` (returns ``x`` itself).
        severity: 1..5 (ignored for ``"clean"``).
        indices: ``[B]`` integer dataset indices of the images. A sample's random draws depend
            only on ``(seed, name, index)``: the output does not depend on batch size, batch
            composition or device count (severities share draws: common random numbers).
        seed: run seed.
        table: ``"imagenet"`` (ImageNet-C, 224 px), ``"imagenet299"`` (ImageNet-C's Inception-size
            parameters), ``"cifar10"`` (CIFAR-10-C) or ``"auto"`` (``imagenet`` or ``imagenet299``
            by image size).

    Returns:
        Corrupted images, same shape, dtype and device, values in [0, 1].
    """
    _check_name(name)
    _check_images(x)
    if name == CLEAN:
        _as_indices(indices, x.shape[0])
        return x
    params = corruption_params(name, severity, table, size=tuple(x.shape[-2:]))
    idx = _as_indices(indices, x.shape[0])
    if x.shape[0] == 0:
        return x.clone()
    work = x.detach().to(torch.float32) if x.dtype != torch.float32 else x.detach()
    corruption = CORRUPTIONS[name]
    step = len(idx)
    if work.device.type == "cpu" and corruption.cpu_chunks:
        step = max(1, _CPU_CHUNK_BYTES // (4 * work[0].numel()))
    if step >= len(idx):
        return corruption.fn(work, params, SampleRNG(idx, seed, name, x.device)).to(x.dtype)
    out = torch.empty_like(x)
    for i in range(0, len(idx), step):  # per-sample streams: chunking changes nothing
        rng = SampleRNG(idx[i : i + step], seed, name, x.device)
        out[i : i + step] = corruption.fn(work[i : i + step], params, rng)
    return out


def suite(
    names: Optional[Iterable[str]] = None,
    severities: Iterable[int] = SEVERITIES,
    clean: bool = True,
) -> List[Tuple[str, int]]:
    """The ``(name, severity)`` pairs of a robustness run: ``("clean", 0)`` first (unless
    ``clean=False``), then every name at every severity. ``names`` defaults to the 15
    benchmark corruptions."""
    names = list(BENCHMARK_CORRUPTIONS if names is None else names)
    severities = list(severities)
    for n in names:
        if n == CLEAN:
            raise ValueError(f"{CLEAN!r} is added by clean=True, not listed in names")
        _check_name(n)
    for s in severities:
        _check_severity(s)
    pairs = [(CLEAN, 0)] if clean else []
    return pairs + [(n, s) for n in names for s in severities]
