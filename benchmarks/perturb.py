"""Corruption throughput: ours (batched torch) against a per-image numpy/scipy/PIL reference.

The reference functions below follow Hendrycks' ``make_imagenet_c.py`` line by line (one
``H x W x 3`` uint8 image in, float 0..255 out, global-style numpy randomness), with the
pieces that need OpenCV or ImageMagick (not installed here) replaced by scipy / numpy
equivalents: ``cv2.filter2D`` -> ``scipy.ndimage.correlate(mode='mirror')``;
``cv2.GaussianBlur`` (for the disk kernel) -> separable ``correlate1d(mode='mirror')``;
Wand's motion blur -> bethgelab/imagecorruptions' numpy ``_motion_blur``;
``cv2.getAffineTransform`` / ``warpAffine`` -> ``numpy.linalg.solve`` /
``scipy.ndimage.affine_transform(order=1, mode='mirror')`` (without OpenCV's 1/32-pixel
coordinate rounding); frost photographs -> the same procedural texture as ours when the
photographs are not installed. ``spatter`` runs the reference's OpenCV code itself and is
listed only where OpenCV is installed.
Parameters come from our severity tables so both tables can be run. The tests use these
functions as the oracle.

    python benchmarks/perturb.py [--size 224 299] [--batch 32] [--severity 3] [--quick]
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import skimage as sk
from PIL import Image
from scipy import ndimage
from scipy.ndimage import map_coordinates
from scipy.ndimage import zoom as scizoom
from skimage.filters import gaussian

# ----------------------------------------------------------------------------- helpers


def disk(radius, alias_blur=0.1, dtype=np.float32):
    if radius <= 8:
        L = np.arange(-8, 8 + 1)
        ksize = 3
    else:
        L = np.arange(-radius, radius + 1)
        ksize = 5
    X, Y = np.meshgrid(L, L)
    aliased_disk = np.array((X**2 + Y**2) <= radius**2, dtype=dtype)
    aliased_disk /= np.sum(aliased_disk)
    # cv2.GaussianBlur(aliased_disk, ksize=(ksize, ksize), sigmaX=alias_blur), BORDER_REFLECT_101
    i = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(i**2) / (2 * alias_blur**2))
    g = (g / g.sum()).astype(np.float32)
    out = ndimage.correlate1d(aliased_disk.astype(np.float64), g, axis=0, mode="mirror")
    return ndimage.correlate1d(out, g, axis=1, mode="mirror").astype(dtype)


# bethgelab/imagecorruptions: numpy port of ImageMagick's MotionBlurImage
def _motion_kernel(width, sigma):
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    return k / np.sum(k)


def _shift(image, dx, dy):
    if dx < 0:
        shifted = np.roll(image, shift=image.shape[1] + dx, axis=1)
        shifted[:, dx:] = shifted[:, dx - 1 : dx]
    elif dx > 0:
        shifted = np.roll(image, shift=dx, axis=1)
        shifted[:, :dx] = shifted[:, dx : dx + 1]
    else:
        shifted = image
    if dy < 0:
        shifted = np.roll(shifted, shift=image.shape[0] + dy, axis=0)
        shifted[dy:, :] = shifted[dy - 1 : dy, :]
    elif dy > 0:
        shifted = np.roll(shifted, shift=dy, axis=0)
        shifted[:dy, :] = shifted[dy : dy + 1, :]
    return shifted


def _motion_blur(x, radius, sigma, angle):
    width = int(2 * math.ceil(radius) + 1)
    kernel = _motion_kernel(width, sigma)
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    blurred = np.zeros_like(x, dtype=np.float32)
    for i in range(width):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        if np.abs(dy) >= x.shape[0] or np.abs(dx) >= x.shape[1]:
            break
        blurred = blurred + kernel[i] * _shift(x, dx, dy)
    return blurred


def plasma_fractal(mapsize=256, wibbledecay=3, uniform=np.random.uniform):
    assert mapsize & (mapsize - 1) == 0
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100

    def wibbledmean(array):
        return array / 4 + wibble * uniform(-wibble, wibble, array.shape)

    def fillsquares():
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2 : mapsize : stepsize, stepsize // 2 : mapsize : stepsize] = wibbledmean(squareaccum)

    def filldiamonds():
        mapsize_ = maparray.shape[0]
        drgrid = maparray[stepsize // 2 : mapsize_ : stepsize, stepsize // 2 : mapsize_ : stepsize]
        ulgrid = maparray[0:mapsize_:stepsize, 0:mapsize_:stepsize]
        ldrsum = drgrid + np.roll(drgrid, 1, axis=0)
        lulsum = ulgrid + np.roll(ulgrid, -1, axis=1)
        ltsum = ldrsum + lulsum
        maparray[0:mapsize_:stepsize, stepsize // 2 : mapsize_ : stepsize] = wibbledmean(ltsum)
        tdrsum = drgrid + np.roll(drgrid, 1, axis=1)
        tulsum = ulgrid + np.roll(ulgrid, -1, axis=0)
        ttsum = tdrsum + tulsum
        maparray[stepsize // 2 : mapsize_ : stepsize, 0:mapsize_:stepsize] = wibbledmean(ttsum)

    while stepsize >= 2:
        fillsquares()
        filldiamonds()
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    return maparray / maparray.max()


def _mapsize(shape):
    return 1 << max(0, (int(max(shape[0], shape[1], 2)) - 1).bit_length())


def clipped_zoom(img, zoom_factor):
    h = img.shape[0]
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    img = scizoom(img[top : top + ch, top : top + ch], (zoom_factor, zoom_factor, 1), order=1)
    trim_top = (img.shape[0] - h) // 2
    return img[trim_top : trim_top + h, trim_top : trim_top + h]


# ----------------------------------------------------------------------------- reference corruptions
# Each: (uint8 H x W x 3 array, parameter from our table, numpy RandomState) -> float 0..255


def gaussian_noise(x, c, rs=np.random):
    x = np.array(x) / 255.0
    return np.clip(x + rs.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(x, c, rs=np.random):
    x = np.array(x) / 255.0
    return np.clip(rs.poisson(x * c) / c, 0, 1) * 255


def impulse_noise(x, c, rs=np.random):
    x = sk.util.random_noise(np.array(x) / 255.0, mode="s&p", amount=c, rng=rs.randint(2**31))
    return np.clip(x, 0, 1) * 255


def speckle_noise(x, c, rs=np.random):
    x = np.array(x) / 255.0
    return np.clip(x + x * rs.normal(size=x.shape, scale=c), 0, 1) * 255


def gaussian_blur(x, c, rs=np.random):
    x = gaussian(np.array(x) / 255.0, sigma=c, channel_axis=-1)
    return np.clip(x, 0, 1) * 255


def glass_blur(x, c, rs=np.random, randint=None):
    randint = randint or rs.randint
    x = np.uint8(gaussian(np.array(x) / 255.0, sigma=c[0], channel_axis=-1) * 255)
    H, W = x.shape[:2]
    for i in range(c[2]):
        for h in range(H - c[1], c[1], -1):
            for w in range(W - c[1], c[1], -1):
                dx, dy = randint(-c[1], c[1], size=(2,))
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    return np.clip(gaussian(x / 255.0, sigma=c[0], channel_axis=-1), 0, 1) * 255


def defocus_blur(x, c, rs=np.random):
    x = np.array(x) / 255.0
    kernel = disk(radius=c[0], alias_blur=c[1])
    channels = [ndimage.correlate(x[:, :, d], kernel, mode="mirror") for d in range(3)]
    return np.clip(np.array(channels).transpose((1, 2, 0)), 0, 1) * 255


def motion_blur(x, c, rs=np.random, angle=None):
    angle = rs.uniform(-45, 45) if angle is None else angle
    x = _motion_blur(np.array(x), radius=c[0], sigma=c[1], angle=angle)
    return np.clip(x, 0, 255)


def zoom_blur(x, c, rs=np.random):
    c = np.arange(*c)
    x = (np.array(x) / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for zoom_factor in c:
        out += clipped_zoom(x, zoom_factor)
    x = (x + out) / (len(c) + 1)
    return np.clip(x, 0, 1) * 255


def snow(x, c, rs=np.random):
    x = np.array(x, dtype=np.float32) / 255.0
    H, W = x.shape[:2]
    snow_layer = rs.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    snow_layer = clipped_zoom(snow_layer[..., np.newaxis], c[2])
    snow_layer[snow_layer < c[3]] = 0
    snow_layer = (np.clip(snow_layer.squeeze(), 0, 1) * 255).astype(np.uint8).astype(np.float32)
    snow_layer = _motion_blur(snow_layer, radius=c[4], sigma=c[5], angle=rs.uniform(-135, -45))
    snow_layer = np.round(snow_layer).astype(np.uint8) / 255.0
    snow_layer = snow_layer[..., np.newaxis]
    gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).reshape(H, W, 1)
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + snow_layer + np.rot90(snow_layer, k=2), 0, 1) * 255


def frost_procedural(x, c, rs=np.random):
    # stand-in texture when the frost photographs are not installed: same recipe as ours
    H, W = x.shape[:2]
    m = _mapsize(x.shape)
    rough = plasma_fractal(m, 1.4, rs.uniform)[:H, :W]
    haze = plasma_fractal(m, 2.2, rs.uniform)[:H, :W]
    ice = np.clip(0.45 * haze + 0.9 * (1 - np.abs(2 * rough - 1)) ** 6, 0, 1)
    frost_img = ice[..., None] * np.array([0.84, 0.92, 1.0]) * 255
    return np.clip(c[0] * np.array(x) + c[1] * frost_img, 0, 255)


def frost_photo(index, scale=1):
    """Frost photograph ``index`` as RGB uint8, shrunk as make_cifar_c.py does when ``scale`` != 1
    (cv2.resize(fx=scale), INTER_LINEAR; with OpenCV when installed)."""
    from lightning_app.perturb.photos import cv2_resize_linear, load_frost_photo

    img = load_frost_photo(index)
    if scale == 1:
        return img
    try:
        import cv2

        return cv2.resize(np.ascontiguousarray(img[..., ::-1]), (0, 0), fx=scale, fy=scale)[..., ::-1]
    except ImportError:
        return cv2_resize_linear(img, scale)


def frost(x, c, rs=np.random):
    # make_imagenet_c.py (crop of an unscaled photograph; make_cifar_c.py shrinks it by c[2] = 0.2 first);
    # photographs larger than the image only (ours enlarges smaller ones as imagecorruptions does)
    from lightning_app.perturb.photos import enlarge_to_cover, frost_photo_dir

    if frost_photo_dir() is None:
        return frost_procedural(x, c, rs)
    H, W = x.shape[:2]
    idx = rs.randint(5)
    frost = enlarge_to_cover(frost_photo(idx, c[2]), H, W)
    x_start, y_start = rs.randint(0, frost.shape[0] - H), rs.randint(0, frost.shape[1] - W)
    frost = frost[x_start : x_start + H, y_start : y_start + W]
    return np.clip(c[0] * np.array(x) + c[1] * frost, 0, 255)


def spatter(x, c, rs=np.random):
    # make_imagenet_c.py verbatim (needs OpenCV), parameters from the table
    import cv2

    x = np.array(x, dtype=np.float32) / 255.0
    liquid_layer = rs.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    liquid_layer = gaussian(liquid_layer, sigma=c[2])
    liquid_layer[liquid_layer < c[3]] = 0
    if c[5] == 0:
        liquid_layer = (liquid_layer * 255).astype(np.uint8)
        dist = 255 - cv2.Canny(liquid_layer, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
        dist = cv2.equalizeHist(dist)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = cv2.filter2D(dist, cv2.CV_8U, ker)
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = cv2.cvtColor(liquid_layer * dist, cv2.COLOR_GRAY2BGRA)
        m /= np.max(m, axis=(0, 1))
        m *= c[4]
        color = np.concatenate((175 / 255.0 * np.ones_like(m[..., :1]), 238 / 255.0 * np.ones_like(m[..., :1]),
                                238 / 255.0 * np.ones_like(m[..., :1])), axis=2)
        color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
        return cv2.cvtColor(np.clip(x + m * color, 0, 1), cv2.COLOR_BGRA2BGR) * 255
    m = np.where(liquid_layer > c[3], 1, 0)
    m = gaussian(m.astype(np.float32), sigma=c[4])
    m[m < 0.8] = 0
    color = np.concatenate((63 / 255.0 * np.ones_like(x[..., :1]), 42 / 255.0 * np.ones_like(x[..., :1]),
                            20 / 255.0 * np.ones_like(x[..., :1])), axis=2)
    color *= m[..., np.newaxis]
    x *= 1 - m[..., np.newaxis]
    return np.clip(x + color, 0, 1) * 255


def fog(x, c, rs=np.random):
    x = np.array(x) / 255.0
    H, W = x.shape[:2]
    max_val = x.max()
    x += c[0] * plasma_fractal(mapsize=_mapsize(x.shape), wibbledecay=c[1], uniform=rs.uniform)[:H, :W][..., np.newaxis]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def contrast(x, c, rs=np.random):
    x = np.array(x) / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def brightness(x, c, rs=np.random):
    x = np.array(x) / 255.0
    x = sk.color.rgb2hsv(x)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    x = sk.color.hsv2rgb(x)
    return np.clip(x, 0, 1) * 255


def saturate(x, c, rs=np.random):
    x = np.array(x) / 255.0
    x = sk.color.rgb2hsv(x)
    x[:, :, 1] = np.clip(x[:, :, 1] * c[0] + c[1], 0, 1)
    x = sk.color.hsv2rgb(x)
    return np.clip(x, 0, 1) * 255


def jpeg_compression(x, c, rs=np.random):
    output = io.BytesIO()
    Image.fromarray(np.asarray(x)).save(output, "JPEG", quality=c)
    return np.asarray(Image.open(output)).astype(np.float64)


def pixelate(x, c, rs=np.random):
    H, W = np.asarray(x).shape[:2]
    x = Image.fromarray(np.asarray(x))
    x = x.resize((int(W * c), int(H * c)), Image.BOX)
    x = x.resize((W, H), Image.BOX)
    return np.asarray(x).astype(np.float64)


def elastic_transform(image, c, rs=np.random, uniform=None):
    # c = (alpha, sigma, affine) in pixels for this image size
    uniform = uniform or rs.uniform
    image = np.array(image, dtype=np.float32) / 255.0
    shape = image.shape
    shape_size = shape[:2]
    center_square = np.float32(shape_size) // 2
    square_size = min(shape_size) // 3
    pts1 = np.float32(
        [center_square + square_size, [center_square[0] + square_size, center_square[1] - square_size], center_square - square_size]
    )
    pts2 = pts1 + uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
    # cv2.getAffineTransform(pts1, pts2) + cv2.warpAffine(image, M, (W, H), BORDER_REFLECT_101):
    # output (x, y) samples the source at M^-1 (x, y)
    A = np.concatenate([pts2.astype(np.float64), np.ones((3, 1))], 1)
    minv = np.linalg.solve(A, pts1.astype(np.float64)).T  # (x, y, 1) -> source (x, y)
    matrix = np.array([[minv[1, 1], minv[1, 0]], [minv[0, 1], minv[0, 0]]])  # (row, col) order
    offset = np.array([minv[1, 2], minv[0, 2]])
    image = np.stack(
        [ndimage.affine_transform(image[..., k], matrix, offset, order=1, mode="mirror") for k in range(shape[2])], -1
    )
    dx = (gaussian(uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dy = (gaussian(uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dx, dy = dx[..., np.newaxis], dy[..., np.newaxis]
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
    return np.clip(map_coordinates(image, indices, order=1, mode="reflect").reshape(shape), 0, 1) * 255


REFERENCE: Dict[str, Callable] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "saturate": saturate,
}
try:  # spatter's reference needs OpenCV (the [imagenet-c] extra installs it)
    import cv2  # noqa: F401

    REFERENCE["spatter"] = spatter
except ImportError:
    pass

#: corruptions whose output has no randomness: ours and the reference are compared pixel by pixel
DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression", "gaussian_blur", "saturate")


# ----------------------------------------------------------------------------- benchmark
def sample_images(size: int, count: int) -> np.ndarray:
    """``count`` real RGB photos from skimage.data, centre-cropped and resized to ``size``."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for i in range(count):
        img = Image.fromarray(photos[i % len(photos)])
        s = min(img.size)
        left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(img))
    return np.stack(out)


def run(
    size: int, batch: int, severity: int, table: str, names: List[str], reps: int, ref_budget: float, device: str = "cpu"
) -> List[dict]:
    import torch

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]
    from _timing import images_per_second

    from lightning_app.perturb import CORRUPTIONS, corrupt, corruption_params

    images = sample_images(size, batch)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device)
    indices = torch.arange(batch)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    rows = []
    for name in names:
        p = corruption_params(name, severity, table, size=(size, size))
        t_ours = 1.0 / images_per_second(lambda: (corrupt(x, name, severity, indices, table=table), sync()), batch, reps)
        ours = corrupt(x, name, severity, indices, table=table).permute(0, 2, 3, 1).cpu().numpy()
        ref_fn = REFERENCE[name]
        rs = np.random.RandomState(0)
        start = time.perf_counter()
        refs = [ref_fn(images[0], p, rs) / 255.0]
        t_first = time.perf_counter() - start
        n = int(min(batch, max(1, ref_budget // max(t_first, 1e-9))))
        start = time.perf_counter()
        for i in range(n):
            out = ref_fn(images[i], p, rs) / 255.0
            if i and len(refs) < batch:
                refs.append(out)
        t_ref = (time.perf_counter() - start) / n
        k = len(refs)
        clean = images[:k] / 255.0
        row = dict(
            name=name,
            exact=CORRUPTIONS[name].exact,
            ours=1.0 / t_ours,
            ref=1.0 / t_ref,
            speedup=t_ref / t_ours,
            change_ours=float(np.abs(ours[:k] - clean).mean()),
            change_ref=float(np.abs(np.stack(refs) - clean).mean()),
            max_diff=float(np.abs(ours[:k] - np.stack(refs)).max()) if name in DETERMINISTIC else None,
        )
        rows.append(row)
    return rows


def print_table(size: int, severity: int, table: str, threads: int, rows: List[dict], device: str = "cpu") -> None:
    print(f"\n## {table} table, severity {severity}, {size}x{size}, ours on {device} (torch threads {threads}), "
          "reference per image on the CPU")
    head = f"| {'corruption':<18} | exact | ours img/s | ref img/s | speedup | mean abs change ours / ref | max abs diff |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        print(
            f"| {r['name']:<18} | {'yes' if r['exact'] else 'no':<5} | {r['ours']:>10.1f} | {r['ref']:>9.1f} | "
            f"{r['speedup']:>6.1f}x | {r['change_ours']:>12.4f} / {r['change_ref']:<11.4f} | {diff:>12} |"
        )
    geo = math.exp(sum(math.log(r["speedup"]) for r in rows) / len(rows))
    print(f"geometric-mean speedup: {geo:.1f}x over {len(rows)} corruptions")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs="+", default=[224, 299])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--table", default="imagenet", choices=["imagenet", "imagenet299", "cifar10"])
    parser.add_argument("--names", nargs="+", default=None, help="corruptions (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (numpy reference is single-threaded)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--ref-budget", type=float, default=2.0, help="seconds of reference timing per corruption")
    parser.add_argument("--device", default="cpu", help="device for ours, e.g. cuda (the reference always runs on the CPU)")
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 rep, 0.5 s reference budget")
    args = parser.parse_args(argv)
    import torch

    if args.quick:
        args.batch, args.reps, args.ref_budget = min(args.batch, 8), 1, 0.5
    torch.set_num_threads(args.threads)
    names = args.names or list(REFERENCE)
    for size in args.size:
        rows = run(size, args.batch, args.severity, args.table, names, args.reps, args.ref_budget, args.device)
        print_table(size, args.severity, args.table, args.threads, rows, args.device)


if __name__ == "__main__":
    main()
