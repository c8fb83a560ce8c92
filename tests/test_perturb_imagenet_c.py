"""ImageNet-C's frost photographs and spatter against the reference code: the ``imagecorruptions``
package (bethgelab's copy of ``make_imagenet_c.py``) and OpenCV itself, where installed (the
``[imagenet-c]`` extra, part of ``[test]``); the procedural frost fallback where they are not."""
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_app.perturb import CORRUPTIONS, _cv, corrupt, corruption_params, photos, registry, spatter, weather

_spec = importlib.util.spec_from_file_location("perturb_reference", Path(__file__).parents[1] / "benchmarks" / "perturb.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

needs_photos = pytest.mark.skipif(photos.frost_photo_dir() is None, reason="frost photographs not installed ([imagenet-c])")


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


def cv2_or_skip():
    return pytest.importorskip("cv2", reason="OpenCV not installed ([imagenet-c] extra)")


def imagecorruptions_or_skip():
    """``imagecorruptions.corruptions`` (it imports ``pkg_resources``, gone from recent setuptools: stub it)."""
    cv2_or_skip()
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None:
        pytest.skip("imagecorruptions not installed ([imagenet-c] extra)")
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        folder = spec.submodule_search_locations[0]
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda package, path: os.path.join(folder, path)
        sys.modules["pkg_resources"] = stub
    return importlib.import_module("imagecorruptions.corruptions")


@pytest.fixture(scope="module")
def images():
    out = {}
    for size in (48, 224):
        u8 = ref.sample_images(size, 4)
        out[size] = (u8, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)
    return out


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- frost
def test_frost_entry_is_exact_only_with_the_photographs(monkeypatch):
    assert CORRUPTIONS["frost"].exact == (photos.frost_photo_dir() is not None)
    monkeypatch.setattr(photos, "frost_photo_dir", lambda: None)
    monkeypatch.setattr(registry, "frost_photo_dir", lambda: None)
    fallback = importlib.reload(registry)
    try:
        assert not fallback.CORRUPTIONS["frost"].exact and "procedural" in fallback.CORRUPTIONS["frost"].note
        assert "[imagenet-c]" in fallback.CORRUPTIONS["frost"].note
    finally:
        monkeypatch.undo()
        importlib.reload(registry)
    assert registry.CORRUPTIONS["frost"].exact == (photos.frost_photo_dir() is not None)


def test_frost_falls_back_to_the_procedural_texture(images, monkeypatch):
    _, x = images[48]
    monkeypatch.setattr(weather, "frost_photo_dir", lambda: None)
    p = corruption_params("frost", 3)
    out = weather.frost(x, p, registry.SampleRNG(range(4), 0, "frost", x.device))
    same = weather.frost_procedural(x, p, registry.SampleRNG(range(4), 0, "frost", x.device))
    torch.testing.assert_close(out, same, atol=0, rtol=0)
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)


def test_missing_photographs_give_an_install_hint(monkeypatch):
    photos.load_frost_photo.cache_clear()
    monkeypatch.setattr(photos, "frost_photo_dir", lambda: None)
    try:
        with pytest.raises(FileNotFoundError, match=r"keras-lightning-zoo\[imagenet-c\].*IMAGENET_C_FROST_DIR"):
            photos.load_frost_photo(0)
    finally:
        photos.load_frost_photo.cache_clear()


def test_frost_dir_from_the_environment(tmp_path, monkeypatch):
    photos.frost_photo_dir.cache_clear()
    try:
        monkeypatch.setenv(photos.FROST_DIR_ENV, str(tmp_path))
        with pytest.warns(UserWarning, match="does not hold frost1.png"):
            found = photos.frost_photo_dir()
        assert found != tmp_path
        for name in photos.FROST_FILES:
            (tmp_path / name).write_bytes(b"")
        photos.frost_photo_dir.cache_clear()
        assert photos.frost_photo_dir() == tmp_path
    finally:
        monkeypatch.undo()
        photos.frost_photo_dir.cache_clear()


@needs_photos
def test_frost_photographs_decode_like_opencv():
    cv2 = cv2_or_skip()
    folder = photos.frost_photo_dir()
    for i, name in enumerate(photos.FROST_FILES):
        np.testing.assert_array_equal(photos.load_frost_photo(i), cv2.imread(str(folder / name))[..., ::-1], err_msg=name)


@needs_photos
def test_cifar_photo_shrink_equals_cv2_resize():
    cv2 = cv2_or_skip()
    for i in range(len(photos.FROST_FILES)):
        img = photos.load_frost_photo(i)
        bgr = np.ascontiguousarray(img[..., ::-1])
        np.testing.assert_array_equal(photos.cv2_resize_linear(img, 0.2), cv2.resize(bgr, (0, 0), fx=0.2, fy=0.2)[..., ::-1])
        other = cv2.resize(bgr, (0, 0), fx=0.37, fy=0.37)[..., ::-1]  # non-integer phases: fixed-point rounding
        assert np.abs(photos.cv2_resize_linear(img, 0.37).astype(int) - other).max() <= 1


def _crop_draws(index, top, left, photo_shape, h, w):
    """Uniform draws that make ours pick photograph ``index`` and crop at (``top``, ``left``)."""
    return np.array([(index + 0.5) / 5, (top + 0.5) / (photo_shape[0] - h), (left + 0.5) / (photo_shape[1] - w)])


@needs_photos
@pytest.mark.parametrize("size", [48, 224])
def test_frost_equals_imagecorruptions_given_the_same_crop(images, size, monkeypatch):
    """The reference recipe (make_imagenet_c.py: crop the photograph as it is) is imagecorruptions' frost
    without its 1.1x enlargement; with the same photograph and crop both give the same pixels."""
    ic = imagecorruptions_or_skip()
    u8, x = images[size]
    monkeypatch.setattr(ic.cv2, "resize", lambda img, dsize, interpolation=None: img)
    rs = np.random.RandomState(size)
    for severity in range(1, 6):
        p = corruption_params("frost", severity, "imagenet")
        for index in range(5):
            shape = photos.load_frost_photo(index).shape
            top, left = rs.randint(0, shape[0] - size), rs.randint(0, shape[1] - size)
            draws = iter([index, top, left])
            monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(draws))
            i = index % 4
            expected = ic.frost(u8[i], severity) / 255
            monkeypatch.undo()
            monkeypatch.setattr(ic.cv2, "resize", lambda img, dsize, interpolation=None: img)
            got = hwc(weather.frost_photographs(x[i : i + 1], p, Replay(_crop_draws(index, top, left, shape, size, size))))[0]
            np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=f"severity {severity} photo {index}")


@needs_photos
def test_frost_enlarges_small_photographs_as_imagecorruptions(monkeypatch):
    """Images larger than the photograph (frost2: 315 x 560) take imagecorruptions' bicubic enlargement."""
    ic = imagecorruptions_or_skip()
    u8 = ref.sample_images(400, 1)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    p = corruption_params("frost", 5, "imagenet")
    source = photos.frost_layer_source(1, 1.0, 400, 400, torch.device("cpu"))
    top, left = 7, 31
    draws = iter([1, top, left])
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(draws))
    expected = ic.frost(u8[0], 5) / 255
    monkeypatch.undo()
    assert source.shape[1:] == (int(np.ceil(315 * 400 / 315 * 1.1)), int(np.ceil(560 * 400 / 315 * 1.1)))
    got = hwc(weather.frost_photographs(x, p, Replay(_crop_draws(1, top, left, source.shape[1:], 400, 400))))[0]
    diff = np.abs(got - expected)
    assert diff.max() <= p[1] / 255 + 1e-5 and (diff > 1e-5).mean() < 1e-3  # one 8-bit level of the photo, rarely


@needs_photos
def test_frost_cifar_crops_come_from_the_shrunk_photographs(images):
    _, x = images[48]
    small = x[..., :32, :32]
    p = corruption_params("frost", 2, "cifar10")
    shrunk = photos.cv2_resize_linear(photos.load_frost_photo(3), 0.2)
    got = weather.frost_photographs(small[:1], p, Replay(_crop_draws(3, 5, 9, shrunk.shape, 32, 32)))
    layer = torch.from_numpy(shrunk[5:37, 9:41]).permute(2, 0, 1).float()[None] / 255
    torch.testing.assert_close(got, (p[0] * small[:1] + p[1] * layer).clamp(0, 1), atol=1e-6, rtol=0)


@needs_photos
def test_frost_photo_draws_cover_every_photo_and_crop():
    x = torch.full((200, 3, 32, 32), 0.5)
    rng = registry.SampleRNG(range(200), 0, "frost", x.device)
    u = rng.uniform((3,), dtype=torch.float64).numpy()
    assert set((u[:, 0] * 5).astype(int)) == set(range(5))  # frost6 is never drawn, as in the reference
    out = corrupt(x, "frost", 1, torch.arange(200), table="cifar10")
    assert len({round(float(v), 4) for v in out.mean(dim=(1, 2, 3))}) > 150  # crops differ per image


# ----------------------------------------------------------------------------- OpenCV ops
def _liquid_layers(rs, n, size, params):
    from skimage.filters import gaussian

    out = []
    for k in range(n):
        loc, scale, sigma, thr = params[k % len(params)]
        layer = gaussian(rs.normal(size=size, loc=loc, scale=scale), sigma=sigma)
        layer[layer < thr] = 0
        out.append((layer * 255).astype(np.uint8))
    return out


def test_opencv_ops_equal_cv2():
    cv2 = cv2_or_skip()
    rs = np.random.RandomState(0)
    layers = _liquid_layers(rs, 8, (61, 48), [(0.65, 0.3, 4, 0.69), (0.65, 0.3, 1, 0.65), (0.62, 0.1, 0.7, 0.7)])
    layers += [rs.randint(0, 256, (40, 37)).astype(np.uint8), np.full((20, 20), 7, np.uint8)]
    for img in layers:
        t = torch.from_numpy(img.astype(np.int32))[None]
        edges = cv2.Canny(img, 50, 150)
        np.testing.assert_array_equal(_cv.canny(t, 50, 150)[0].numpy(), edges > 0)
        np.testing.assert_array_equal(_cv.canny(t, 30, 90)[0].numpy(), cv2.Canny(img, 30, 90) > 0)
        dist = cv2.threshold(cv2.distanceTransform(255 - edges, cv2.DIST_L2, 5), 20, 20, cv2.THRESH_TRUNC)[1]
        ours = _cv.chamfer_distance(torch.from_numpy(edges > 0)[None], 20)[0].numpy()
        np.testing.assert_allclose(ours, dist, rtol=2e-7, atol=0)  # float32 sums in another order: last bit
        np.testing.assert_array_equal(_cv.box3(torch.from_numpy(dist)[None])[0].numpy(), cv2.blur(dist, (3, 3)))
        np.testing.assert_array_equal(_cv.equalize_hist(t)[0].numpy(), cv2.equalizeHist(img))
        np.testing.assert_array_equal(_cv.filter3_u8(t, spatter.EMBOSS)[0].numpy(),
                                      cv2.filter2D(img, cv2.CV_8U, np.array(spatter.EMBOSS)))
        np.testing.assert_array_equal(_cv.box3_u8(t)[0].numpy(), cv2.blur(img, (3, 3)))


# ----------------------------------------------------------------------------- spatter
@pytest.mark.parametrize("table,size", [("imagenet", 48), ("imagenet", 224), ("imagenet299", 48), ("cifar10", 32)])
def test_spatter_equals_reference_given_draws(images, table, size):
    """make_imagenet_c.py's spatter (run with OpenCV) and ours, given the same normal draws: both variants
    (water at severities 1-3, mud at 4-5)."""
    cv2_or_skip()
    u8, x = images[48 if size == 32 else size]
    u8, x = u8[:, :size, :size].copy(), x[..., :size, :size]
    rs = np.random.RandomState(5)
    for severity in range(1, 6):
        p = corruption_params("spatter", severity, table)
        for i in range(len(u8)):
            draws = rs.normal(size=(size, size), loc=p[0], scale=p[1])
            expected = ref.spatter(u8[i], p, rs=type("RS", (), {"normal": staticmethod(lambda **k: draws)})) / 255
            got = hwc(spatter.spatter(x[i : i + 1], p, Replay(draws)))[0]
            np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=f"{table} severity {severity} image {i}")


def test_spatter_reference_copy_equals_imagecorruptions(images, monkeypatch):
    """Our copy of the reference spatter is imagecorruptions' (224 table) line for line."""
    ic = imagecorruptions_or_skip()
    from PIL import Image

    u8, _ = images[48]
    rs = np.random.RandomState(6)
    for severity in range(1, 6):
        p = corruption_params("spatter", severity, "imagenet")
        draws = rs.normal(size=(48, 48), loc=p[0], scale=p[1])
        monkeypatch.setattr(np.random, "normal", lambda **k: draws)
        expected = ic.spatter(Image.fromarray(u8[0]), severity)
        monkeypatch.undo()
        got = ref.spatter(u8[0], p, rs=type("RS", (), {"normal": staticmethod(lambda **k: draws)}))
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_spatter_variants_look_like_water_and_mud(images):
    _, x = images[224]
    water = corrupt(x, "spatter", 3, torch.arange(4))
    mud = corrupt(x, "spatter", 5, torch.arange(4))
    dw, dm = water - x, mud - x
    assert (dw >= -1e-6).all()  # water only adds (pale turquoise: red gains less than green and blue)
    assert dw[:, 0].sum() < 0.9 * dw[:, 1].sum() and dw[:, 0].sum() < 0.9 * dw[:, 2].sum()
    brown = torch.tensor([63, 42, 20]).view(1, 3, 1, 1) / 255
    changed = dm.abs().amax(dim=1, keepdim=True) > 1e-6
    assert changed.float().mean() > 0.01
    # a splashed pixel is x * (1 - m) + brown * m with m >= 0.8: at least 80% of the way to mud brown
    assert ((mud - brown).abs() <= 0.2 * (x - brown).abs() + 1e-6)[changed.expand_as(x)].all()
