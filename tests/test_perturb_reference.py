"""Corruptions against the reference formulas: pixel-exact where the corruption has no
randomness, exact given the same random draws where it has, and statistics of the noise."""
import importlib.util
import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats
from skimage.color import rgb2hsv

from lightning_app.perturb import blur, corrupt, corruption_params, digital, weather
from lightning_app.perturb._ops import fold_index, pad2d, pad_dim, pil_box_taps, resample_taps

_spec = importlib.util.spec_from_file_location("perturb_reference", Path(__file__).parents[1] / "benchmarks" / "perturb.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


@pytest.fixture(scope="module")
def images():
    """4 real photos, 48 x 48 uint8 (HWC), and the same as a [4, 3, 48, 48] float tensor."""
    u8 = ref.sample_images(48, 4)
    return u8, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


class Replay:
    """Stands in for SampleRNG (one sample): returns given draws in order."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def _next(self, dtype):
        return torch.as_tensor(np.asarray(self.draws.pop(0)))[None].to(dtype)

    def uniform(self, shape, low=0.0, high=1.0, dtype=torch.float32):
        return self._next(dtype)

    def normal(self, shape, mean=0.0, std=1.0, dtype=torch.float32):
        return self._next(dtype)

    def randint(self, low, high, shape, dtype=torch.int64):
        return self._next(dtype)


# ----------------------------------------------------------------------------- deterministic
@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "zoom_blur", "brightness", "contrast", "saturate", "jpeg_compression"])
def test_deterministic_corruptions_equal_reference(images, name, table):
    u8, x = images
    for severity in range(1, 6):
        p = corruption_params(name, severity, table, size=(48, 48))
        expected = np.stack([ref.REFERENCE[name](im, p) / 255 for im in u8])
        got = to_hwc(corrupt(x, name, severity, torch.arange(4), table=table))
        np.testing.assert_allclose(got, expected, atol=2e-6 if name != "jpeg_compression" else 0, err_msg=f"{name} {severity}")


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_pixelate_equals_pillow_box(images, table):
    u8, x = images
    for severity in range(1, 6):
        c = corruption_params("pixelate", severity, table)
        got = to_hwc(corrupt(x, "pixelate", severity, torch.arange(4), table=table))
        # Pillow in float ('F' mode, no 8-bit rounding) per channel: exact coefficients
        for i in range(2):
            for ch in range(3):
                img = Image.fromarray(u8[i, :, :, ch].astype(np.float32) / 255, mode="F")
                small = img.resize((int(48 * c), int(48 * c)), Image.BOX)
                np.testing.assert_allclose(got[i, :, :, ch], np.asarray(small.resize((48, 48), Image.BOX)), atol=1e-6)
        # and the reference (8-bit Pillow) to within its rounding
        expected = np.stack([ref.pixelate(im, c) / 255 for im in u8])
        assert np.abs(got - expected).max() <= 1.01 / 255


def test_padding_matches_index_folding():
    """The F.pad fast path and the index-folding path pad alike (any width, every mode)."""
    for mode in ("replicate", "reflect101", "symmetric"):
        for before, after in ((3, 5), (0, 4), (11, 12), (30, 2)):
            for shape in ((2, 3, 12, 13), (3, 12, 13), (12, 13)):
                y = torch.rand(*shape)
                for dim in (-1, -2):
                    n = y.shape[dim]
                    want = y.index_select(dim, torch.as_tensor(fold_index(np.arange(-before, n + after), n, mode)))
                    assert torch.equal(pad_dim(y, dim, before, after, mode), want), (mode, before, after, shape, dim)
            y = torch.rand(2, 3, 12, 13)
            want = pad_dim(pad_dim(y, -2, before, after, mode), -1, after, before, mode)
            assert torch.equal(pad2d(y, (before, after, after, before), mode), want)
    # scipy's names: nearest / mirror / reflect
    row = np.arange(5)
    assert fold_index(np.arange(-3, 8), 5, "reflect101").tolist() == [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]
    assert fold_index(np.arange(-3, 8), 5, "symmetric").tolist() == [2, 1, 0, 0, 1, 2, 3, 4, 4, 3, 2]
    assert fold_index(np.arange(-3, 8), 5, "replicate").tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 4]
    assert row[fold_index(np.arange(-12, 17), 5, "symmetric")].tolist() == np.pad(row, 12, mode="symmetric").tolist()


def test_pil_box_taps_for_odd_ratios():
    rng = np.random.default_rng(0)
    row = rng.random(37).astype(np.float32)
    for out in (5, 13, 36, 37, 50, 91):
        idx, w = pil_box_taps(37, out)
        got = resample_taps(torch.from_numpy(row)[None], idx, w, dim=-1)[0].numpy()
        img = Image.fromarray(row[None], mode="F").resize((out, 1), Image.BOX)
        np.testing.assert_allclose(got, np.asarray(img)[0], atol=1e-6)


# ----------------------------------------------------------------------------- random, same draws
def test_glass_blur_copy_loop_is_reproduced_exactly():
    """The wavefront schedule equals the reference's sequential loop (numpy view 'swap' = copy)."""
    rs = np.random.RandomState(0)
    for h, w, d, iters in ((12, 12, 1, 2), (20, 17, 3, 2), (23, 30, 4, 1)):
        img = rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
        offsets = rs.randint(-d, d, size=(2, iters, h - 2 * d, w - 2 * d, 2))
        src = blur.local_shuffle_sources(h, w, d, offsets)
        for b in range(2):
            x = img.copy()
            draws = iter(offsets[b].reshape(-1, 2))
            for _ in range(iters):
                for hh in range(h - d, d, -1):
                    for ww in range(w - d, d, -1):
                        dx, dy = next(draws)
                        x[hh, ww], x[hh + dy, ww + dx] = x[hh + dy, ww + dx], x[hh, ww]
            np.testing.assert_array_equal(img.reshape(-1, 3)[src[b]].reshape(h, w, 3), x)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_glass_blur_equals_reference_given_draws(images, table):
    u8, x = images
    rs = np.random.RandomState(1)
    for severity in (1, 3, 5):
        sigma, d, iters = p = corruption_params("glass_blur", severity, table)
        offsets = rs.randint(-d, d, size=(iters, 48 - 2 * d, 48 - 2 * d, 2))
        draws = iter(offsets.reshape(-1, 2))
        expected = ref.glass_blur(u8[0], p, randint=lambda lo, hi, size: next(draws)) / 255
        got = to_hwc(blur.glass_blur(x[:1], p, Replay(offsets)))[0]
        # the uint8 truncation differs only where the reference's float64 rounding decides it
        assert np.abs(got - expected).mean() < 2e-4 and np.abs(got - expected).max() < 6e-3


@pytest.mark.parametrize("radius,sigma", [(10, 3), (20, 15), (6, 1), (9, 2.5)])
def test_motion_blur_equals_imagemagick_port(images, radius, sigma):
    u8, x = images
    for angle in (-135.0, -60.5, -44.9, 0.0, 17.3, 45.0):
        expected = ref.motion_blur(u8[1], (radius, sigma), angle=angle) / 255
        got = to_hwc(blur.im_motion_blur(x[1:2], radius, sigma, np.array([angle])))[0]
        np.testing.assert_allclose(got, expected, atol=2e-6)


def test_motion_blur_fft_path_equals_direct_path(images):
    _, x = images
    angles = np.array([-30.0, 10.0, 44.0, -130.0])
    direct = blur.im_motion_blur(x, 15, 8, angles, method="direct")
    fft = blur.im_motion_blur(x, 15, 8, angles, method="fft")
    torch.testing.assert_close(fft, direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_fog_equals_reference_given_draws(images, table):
    u8, x = images
    rs = np.random.RandomState(2)
    for severity in range(1, 6):
        p = corruption_params("fog", severity, table)
        u = rs.uniform(-1, 1, size=sum(weather.plasma_draws(64)))
        pos = [0]

        def uniform(lo, hi, shape):
            k = int(np.prod(shape))
            pos[0] += k
            return u[pos[0] - k : pos[0]].reshape(shape) * hi

        expected = ref.fog(u8[2], p, rs=type("RS", (), {"uniform": staticmethod(uniform)})) / 255
        got = to_hwc(weather.fog(x[2:3], p, Replay(u)))[0]
        np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_elastic_equals_reference_given_draws(images, table, monkeypatch):
    u8, x = images
    rs = np.random.RandomState(3)
    for quantize in (False, True):
        monkeypatch.setattr(digital, "warp_affine_cv2", partial(ref_warp, quantize=quantize))
        for severity in range(1, 6):
            p = corruption_params("elastic_transform", severity, table, size=(48, 48))
            a, f1, f2 = rs.uniform(-p[2], p[2], size=(3, 2)), rs.uniform(-1, 1, (48, 48)), rs.uniform(-1, 1, (48, 48))
            draws = [a, f1, f2]
            expected = ref.elastic_transform(u8[3], p, uniform=lambda lo, hi, size: draws.pop(0)) / 255
            got = to_hwc(digital.elastic_transform(x[3:4], p, Replay(a, np.stack([f1, f2]))))[0]
            if quantize:  # OpenCV's 1/32-pixel coordinates vs scipy's exact ones
                assert np.abs(got - expected).mean() < 2e-3
            else:
                np.testing.assert_allclose(got, expected, atol=1e-5)


ref_warp = digital.warp_affine_cv2


def test_warp_affine_rounds_coordinates_like_opencv():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    shift = lambda t: np.array([[[1.0, 0.0, t], [0.0, 1.0, 0.0]]])  # noqa: E731  source x = x + t
    # below half of 1/32 pixel: OpenCV rounds to the pixel itself
    torch.testing.assert_close(digital.warp_affine_cv2(x, shift(0.01)), x)
    # 0.3 px -> 10/32 px: bilinear with weight 10/32
    got = digital.warp_affine_cv2(x, shift(0.3))
    want = x[..., :-1] * (22 / 32) + x[..., 1:] * (10 / 32)
    # (grid_sample's normalised float32 grid costs ~1e-6 in position)
    torch.testing.assert_close(got[..., :-1], want, atol=1e-5, rtol=0)
    # unquantised: weight 0.3
    got = digital.warp_affine_cv2(x, shift(0.3), quantize=False)
    torch.testing.assert_close(got[..., :-1], x[..., :-1] * 0.7 + x[..., 1:] * 0.3, atol=1e-5, rtol=0)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_snow_follows_reference_recipe_given_draws(images, table):
    u8, x = images
    rs = np.random.RandomState(4)
    for severity in range(1, 6):
        p = corruption_params("snow", severity, table)
        layer, angle = rs.normal(size=(48, 48), loc=p[0], scale=p[1]), rs.uniform(-135, -45)
        draws = iter([layer, angle])
        fake = type("RS", (), {"normal": staticmethod(lambda **k: next(draws)), "uniform": staticmethod(lambda *a: next(draws))})
        expected = ref.snow(u8[0], p, rs=fake) / 255
        got = to_hwc(weather.snow(x[:1], p, Replay(layer[None], np.array(angle))))[0]
        # 8-bit snow layer: rare one-level rounding differences (float32 vs float64)
        assert np.abs(got - expected).mean() < 1e-4 and np.abs(got - expected).max() <= 2.01 / 255


def test_frost_texture_equals_numpy_recipe(images):
    u8, x = images
    rs = np.random.RandomState(5)
    n = sum(weather.plasma_draws(64))
    u1, u2 = rs.uniform(-1, 1, n), rs.uniform(-1, 1, n)
    chunks = [u1, u2]
    pos = [0]

    def uniform(lo, hi, shape):
        k = int(np.prod(shape))
        src = chunks[0]
        pos[0] += k
        out = src[pos[0] - k : pos[0]].reshape(shape) * hi
        if pos[0] == n:
            chunks.pop(0)
            pos[0] = 0
        return out

    p = corruption_params("frost", 3, "imagenet")
    expected = ref.frost_procedural(u8[1], p, rs=type("RS", (), {"uniform": staticmethod(uniform)})) / 255
    got = to_hwc(weather.frost_procedural(x[1:2], p, Replay(u1, u2)))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_defocus_disk_kernel():
    k = blur.disk_kernel(3, 0.1)
    assert k.shape == (17, 17) and abs(k.sum() - 1) < 1e-6
    np.testing.assert_allclose(k, k.T, atol=1e-9)
    assert blur.disk_kernel(10, 0.5).shape == (21, 21)
    np.testing.assert_allclose(blur.disk_kernel(6, 0.5), ref.disk(6, 0.5), atol=1e-7)


# ----------------------------------------------------------------------------- statistics
def clipped_normal_std(sigma: float, lo: float = -0.5, hi: float = 0.5) -> float:
    """Std of clip(N(0, sigma^2), lo, hi) (what noise on a mid-grey image measures)."""
    z = np.linspace(lo, hi, 200001)
    pdf = stats.norm.pdf(z, scale=sigma)
    p_lo, p_hi = stats.norm.cdf(lo, scale=sigma), stats.norm.sf(hi, scale=sigma)
    m1 = np.trapezoid(z * pdf, z) + lo * p_lo + hi * p_hi
    m2 = np.trapezoid(z * z * pdf, z) + lo * lo * p_lo + hi * hi * p_hi
    return float(np.sqrt(m2 - m1 * m1))


GREY = torch.full((4, 3, 64, 64), 0.5)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_gaussian_and_speckle_noise_sigma(table):
    for severity in range(1, 6):
        sigma = corruption_params("gaussian_noise", severity, table)
        out = corrupt(GREY, "gaussian_noise", severity, torch.arange(4), table=table)
        assert float((out - 0.5).std()) == pytest.approx(clipped_normal_std(sigma), rel=0.02)
        assert abs(float(out.mean()) - 0.5) < 0.01
        c = corruption_params("speckle_noise", severity, table)
        out = corrupt(GREY, "speckle_noise", severity, torch.arange(4), table=table)
        assert float((out - 0.5).std()) == pytest.approx(clipped_normal_std(0.5 * c), rel=0.02)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_shot_noise_moments(table):
    for severity in range(1, 6):
        lam = corruption_params("shot_noise", severity, table)
        k = np.arange(0, 4 * lam + 50)
        values = np.minimum(k / lam, 1.0)
        pmf = stats.poisson.pmf(k, 0.5 * lam)
        mean, std = (values * pmf).sum(), np.sqrt((values**2 * pmf).sum() - (values * pmf).sum() ** 2)
        out = corrupt(GREY, "shot_noise", severity, torch.arange(4), table=table)
        assert float(out.mean()) == pytest.approx(mean, abs=0.004)
        assert float(out.std()) == pytest.approx(std, rel=0.02)
        # values on the 1/lam lattice
        assert torch.allclose(out * lam, torch.round(out * lam), atol=1e-3)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_impulse_noise_fractions(table):
    for severity in range(1, 6):
        amount = corruption_params("impulse_noise", severity, table)
        out = corrupt(GREY, "impulse_noise", severity, torch.arange(4), table=table)
        n = out.numel()
        tol = 4 * np.sqrt(amount / 2 / n) + 1e-4
        assert abs(float((out == 1).float().mean()) - amount / 2) < tol
        assert abs(float((out == 0).float().mean()) - amount / 2) < tol
        assert ((out == 0) | (out == 1) | (out == 0.5)).all()


def test_contrast_factor_is_exact(images):
    _, x = images
    for severity in range(1, 6):
        c = corruption_params("contrast", severity)
        out = corrupt(x, "contrast", severity, torch.arange(4))
        mean = x.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(out.mean(dim=(2, 3), keepdim=True), mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(out - mean, (x - mean) * c, atol=1e-6, rtol=0)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_brightness_shifts_hsv_value(images, table):
    u8, x = images
    hsv = rgb2hsv(u8 / 255.0)
    for severity in range(1, 6):
        c = corruption_params("brightness", severity, table)
        out = rgb2hsv(to_hwc(corrupt(x, "brightness", severity, torch.arange(4), table=table)).astype(np.float64))
        np.testing.assert_allclose(out[..., 2], np.clip(hsv[..., 2] + c, 0, 1), atol=1e-6)
        coloured = hsv[..., 1] > 0.05
        np.testing.assert_allclose(out[..., 1][coloured], hsv[..., 1][coloured], atol=1e-5)


@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_saturate_scales_hsv_saturation(images, table):
    u8, x = images
    hsv = rgb2hsv(u8 / 255.0)
    for severity in range(1, 6):
        a, b = corruption_params("saturate", severity, table)
        out = rgb2hsv(to_hwc(corrupt(x, "saturate", severity, torch.arange(4), table=table)).astype(np.float64))
        lit = hsv[..., 2] > 0  # black stays black: its saturation reads 0
        np.testing.assert_allclose(out[..., 1][lit], np.clip(hsv[..., 1] * a + b, 0, 1)[lit], atol=1e-5)
        np.testing.assert_allclose(out[..., 2], hsv[..., 2], atol=1e-6)


def test_saturate_grey_pixels_turn_red_like_skimage():
    grey = torch.full((1, 3, 8, 8), 0.6)
    out = corrupt(grey, "saturate", 5, [0])  # S = 0 * 20 + 0.2, hue 0 (red)
    expected = ref.saturate((grey[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), (20, 0.2)) / 255
    np.testing.assert_allclose(to_hwc(out)[0], expected, atol=1e-6)
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.6) and float(out[0, 1, 0, 0]) == pytest.approx(0.48)


def test_jpeg_matches_pillow_bytes(images):
    u8, x = images
    out = to_hwc(corrupt(x, "jpeg_compression", 5, torch.arange(4)))
    buf = io.BytesIO()
    Image.fromarray(u8[0]).save(buf, "JPEG", quality=7)
    np.testing.assert_array_equal((out[0] * 255).round().astype(np.uint8), np.asarray(Image.open(buf)))


def test_zoom_blur_non_square_matches_per_axis_scipy():
    x = torch.rand(1, 3, 20, 33)
    z = 1.13
    got = blur.clipped_zoom(x, z)[0].permute(1, 2, 0).numpy()
    img = x[0].permute(1, 2, 0).numpy()
    h, w = 20, 33
    ch, cw = int(np.ceil(h / z)), int(np.ceil(w / z))
    crop = img[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
    up = ndimage.zoom(crop, (z, z, 1), order=1)
    th, tw = (up.shape[0] - h) // 2, (up.shape[1] - w) // 2
    np.testing.assert_allclose(got, up[th : th + h, tw : tw + w], atol=2e-6)
