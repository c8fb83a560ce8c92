"""Digital corruptions (ImageNet-C ``pixelate``, ``jpeg_compression``, ``elastic_transform``)."""
from __future__ import annotations

import io
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ._ops import cpu_chunked, gaussian_kernel1d, pil_box_matrix, pil_box_taps, resample_taps, separable
from ._rng import SampleRNG


# ----------------------------------------------------------------------------- pixelate
def pixelate(x: Tensor, c: float, rng: SampleRNG) -> Tensor:
    """Pillow ``resize(BOX)`` to ``int(side * c)`` and back, with Pillow's exact coefficients
    (in float: Pillow rounds to uint8 after each pass). The passes are linear and separable,
    so their order does not matter. On the CPU columns go through a small matrix product
    (faster than gathers); elsewhere by taps (exact whatever the TF32 matmul setting)."""
    h, w = x.shape[-2:]
    sh, sw = max(1, int(h * c)), max(1, int(w * c))
    down_h, up_h = pil_box_taps(h, sh), pil_box_taps(sh, h)
    if x.device.type != "cpu":
        y = resample_taps(resample_taps(x, *down_h, dim=-2), *pil_box_taps(w, sw), dim=-1)
        y = resample_taps(resample_taps(y, *pil_box_taps(sw, w), dim=-1), *up_h, dim=-2)
        return y.clamp_(0, 1)
    down_w = torch.as_tensor(pil_box_matrix(w, sw), dtype=x.dtype)
    up_w = torch.as_tensor(pil_box_matrix(sw, w), dtype=x.dtype)

    def run(t: Tensor) -> Tensor:
        t = resample_taps(t, *down_h, dim=-2) @ down_w
        return resample_taps(t @ up_w, *up_h, dim=-2)

    return cpu_chunked(run, x).clamp_(0, 1)


# ----------------------------------------------------------------------------- jpeg
def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode an ``H x W x 3`` uint8 array as JPEG with Pillow (libjpeg defaults: 4:2:0,
    no optimisation) and decode it, as the reference's ``PIL.Image.save(..., 'JPEG')``."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))


def jpeg_compression(x: Tensor, quality: int, rng: SampleRNG) -> Tensor:
    """JPEG round trip of each image at ``quality``, on the CPU with Pillow.

    Input is rounded to 8 bits first (the reference starts from uint8 images).
    ``torchvision.io.encode_jpeg`` / ``decode_jpeg`` give bit-identical bytes and pixels (same
    libjpeg-turbo defaults, checked) but are deprecated since torchvision 0.29 and were slower.
    """
    u8 = (x.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([jpeg_roundtrip(np.ascontiguousarray(img), quality) for img in u8])
    return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).to(x.dtype).div_(255)


# ----------------------------------------------------------------------------- elastic
def _affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``cv2.getAffineTransform`` for a batch: ``M [B, 2, 3]`` with ``M @ (x, y, 1) = dst``."""
    a = np.concatenate([src, np.ones(src.shape[:-1] + (1,))], axis=-1)
    return np.swapaxes(np.linalg.solve(a, dst), -1, -2)


def warp_affine_cv2(x: Tensor, inverse: np.ndarray, quantize: bool = True) -> Tensor:
    """``cv2.warpAffine(INTER_LINEAR, BORDER_REFLECT_101)`` given the inverse maps ``[B, 2, 3]``
    (output pixel -> source pixel), including OpenCV's fixed-point coordinates (1/1024 per
    term, then 1/32 pixel, ``INTER_BITS = 5``) unless ``quantize=False``."""
    b, _, h, w = x.shape
    fdt = torch.float32 if x.device.type == "mps" else torch.float64
    m = torch.as_tensor(inverse, dtype=fdt, device=x.device)[:, :, :, None, None]  # [B, 2, 3, 1, 1]
    xs = torch.arange(w, dtype=fdt, device=x.device).view(1, 1, w)
    ys = torch.arange(h, dtype=fdt, device=x.device).view(1, h, 1)
    coords = []
    for row in range(2):  # X from row 0, Y from row 1
        if quantize:
            base = torch.round((m[:, row, 1] * ys + m[:, row, 2]) * 1024) + 16
            delta = torch.round(m[:, row, 0] * xs * 1024)
            coords.append(torch.floor((base + delta) / 32) / 32)  # arithmetic >> 5, in pixels
        else:
            coords.append(m[:, row, 0] * xs + m[:, row, 1] * ys + m[:, row, 2])
    gx = coords[0] * (2.0 / max(w - 1, 1)) - 1
    gy = coords[1] * (2.0 / max(h - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def elastic_transform(x: Tensor, p: Tuple[float, float, float], rng: SampleRNG) -> Tensor:
    """Random affine (3 points moved by U(-a, a)) then a smooth random displacement field.

    ``p = (alpha, sigma, a)`` in pixels for this image size (the registry scales the table).
    Affine: ``cv2.getAffineTransform`` + ``cv2.warpAffine`` (reflect-101). Field: uniform noise
    smoothed by ``skimage.filters.gaussian(sigma, mode='reflect', truncate=3)`` times alpha;
    resampling ``scipy.ndimage.map_coordinates(order=1, mode='reflect')`` = ``grid_sample``
    with ``align_corners=False`` and reflection padding.
    """
    alpha, sigma, a = p
    b, _, h, w = x.shape
    # the reference's points are (x, y) pairs built from (H, W): identical for square images
    center = np.float32([h, w]) // 2
    side = min(h, w) // 3
    pts1 = np.float32([center + side, [center[0] + side, center[1] - side], center - side])
    jitter = rng.uniform((3, 2), -a, a, dtype=torch.float64).cpu().numpy().astype(np.float32)
    pts2 = (pts1[None] + jitter).astype(np.float64)
    inverse = _affine(pts2, np.broadcast_to(pts1.astype(np.float64), pts2.shape))
    image = warp_affine_cv2(x, inverse)

    field = rng.uniform((2, h, w), -1.0, 1.0, dtype=x.dtype)  # dx then dy, as in the reference
    k = gaussian_kernel1d(sigma, truncate=3.0)
    field = separable(field, k, k, "symmetric") * alpha
    cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w) + field[:, 0]
    rows = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1) + field[:, 1]
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], dim=-1)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp_(0, 1)
