"""Corruption API and invariants: registry, suite, input checks, shape / dtype / range,
per-sample determinism (batch-size independence), seeds."""
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from lightning_app.perturb import (
    BENCHMARK_CORRUPTIONS,
    CLEAN,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    TABLES,
    corrupt,
    corruption_params,
    resolve_table,
    suite,
)
from lightning_app.perturb.photos import frost_photo_dir

NAMES = list(CORRUPTIONS)
RANDOM = [n for n in NAMES if n not in ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate",
                                         "jpeg_compression", "gaussian_blur", "saturate")]


def photos(size: int, count: int) -> torch.Tensor:
    """Real photos (skimage.data), centre-cropped, resized, as [B, 3, size, size] in [0, 1]."""
    out = []
    for i in range(count):
        img = Image.fromarray([data.astronaut(), data.chelsea(), data.coffee(), data.rocket()][i % 4])
        s = min(img.size)
        img = img.crop(((img.size[0] - s) // 2, (img.size[1] - s) // 2, (img.size[0] + s) // 2, (img.size[1] + s) // 2))
        out.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def batch():
    x = photos(40, 8)
    return x[..., :32, :]  # non-square 32 x 40


# ----------------------------------------------------------------------------- registry / suite
def test_registry_lists_every_corruption_with_flags():
    assert set(BENCHMARK_CORRUPTIONS) == {
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"}
    assert set(EXTRA_CORRUPTIONS) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    approx = {n for n, c in CORRUPTIONS.items() if not c.exact}
    # frost is exact exactly when the reference's photographs are installed (the [imagenet-c] extra)
    assert approx == ({"snow"} if frost_photo_dir() is not None else {"snow", "frost"})
    for n in approx:
        assert "approximate" in CORRUPTIONS[n].note or "instead" in CORRUPTIONS[n].note
    groups = {c.category: set() for c in CORRUPTIONS.values()}
    for c in CORRUPTIONS.values():
        groups[c.category].add(c.name)
    assert groups == {  # ImageNet-C's four groups, extras included
        "noise": {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"},
        "blur": {"defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"},
        "weather": {"snow", "frost", "fog", "brightness", "spatter"},
        "digital": {"contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"},
    }
    assert corruption_params(CLEAN, 0) is None
    assert set(TABLES) == {"imagenet", "imagenet299", "cifar10"}
    for table in TABLES.values():
        assert set(table.params) == set(CORRUPTIONS)
        assert all(len(v) == 5 for v in table.params.values())


def test_tables_hold_the_reference_values():
    im, c10 = TABLES["imagenet"].params, TABLES["cifar10"].params
    assert im["gaussian_noise"] == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert im["jpeg_compression"] == (25, 18, 15, 10, 7)
    assert im["defocus_blur"][4] == (10, 0.5)
    assert c10["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert c10["jpeg_compression"] == (80, 65, 58, 50, 40)
    # elastic is scaled with the image size: reference constants at the table's size
    assert corruption_params("elastic_transform", 1, "imagenet", size=(224, 224)) == (488, 244 * 0.7, 244 * 0.1)
    assert corruption_params("elastic_transform", 1, "imagenet", size=(112, 150)) == pytest.approx((244, 122 * 0.7, 122 * 0.1))
    assert corruption_params("gaussian_blur", 2, "imagenet", size=(112, 112)) == 2  # others are not scaled
    # make_imagenet_c_inception.py (299 px)
    i299 = TABLES["imagenet299"].params
    assert TABLES["imagenet299"].size == 299
    assert i299["gaussian_noise"] == (0.09, 0.13, 0.19, 0.27, 0.40)
    assert i299["motion_blur"][4] == (22, 16) and i299["defocus_blur"][4] == (12, 0.5)
    assert i299["jpeg_compression"] == (23, 16, 13, 8, 5) and i299["pixelate"] == (0.5, 0.4, 0.3, 0.25, 0.2)
    assert i299["zoom_blur"] == im["zoom_blur"] and i299["snow"] == im["snow"] and i299["frost"] == im["frost"]
    assert corruption_params("elastic_transform", 1, "imagenet299", size=(299, 299)) == (720, 360 * 0.7, 360 * 0.1)
    assert im["spatter"][0] == (0.65, 0.3, 4, 0.69, 0.6, 0) and i299["spatter"][4] == (0.67, 0.4, 1.2, 0.65, 1.8, 1)
    assert c10["frost"][0] == (1, 0.2, 0.2) and im["frost"][0] == (1, 0.4, 1)  # CIFAR shrinks the photos to 0.2
    # "auto": the ImageNet-C table for the image size
    assert resolve_table("auto", (224, 224)).name == "imagenet" and resolve_table("auto", (261, 400)).name == "imagenet"
    assert resolve_table("auto", (299, 299)).name == "imagenet299" and resolve_table("auto", (331, 331)).name == "imagenet299"
    assert resolve_table("auto").name == "imagenet"
    assert corruption_params("gaussian_noise", 1, "auto", size=(299, 299)) == 0.09
    assert corruption_params("gaussian_noise", 1, "auto", size=(224, 224)) == 0.08


def test_suite():
    pairs = suite()
    assert pairs[0] == (CLEAN, 0)
    assert len(pairs) == 1 + 15 * 5
    assert pairs[1:6] == [("gaussian_noise", s) for s in range(1, 6)]
    assert suite(["fog", "saturate"], severities=(2, 5), clean=False) == [("fog", 2), ("fog", 5), ("saturate", 2), ("saturate", 5)]
    with pytest.raises(ValueError, match="unknown corruption 'fogg'.*'gaussian_noise'"):
        suite(["fogg"])
    with pytest.raises(ValueError, match="severity"):
        suite(["fog"], severities=(0,))


# ----------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_clear_errors(batch):
    idx = torch.arange(len(batch))
    with pytest.raises(ValueError, match=r"unknown corruption 'blurr'; known: 'clean', 'gaussian_noise'.*'saturate'"):
        corrupt(batch, "blurr", 1, idx)
    for bad in (0, 6, True, 2.0):
        with pytest.raises(ValueError, match="severity must be an int in 1..5"):
            corrupt(batch, "fog", bad, idx)
    with pytest.raises(ValueError, match="unknown table 'cifar100'.*'imagenet299'.*'auto'"):
        corrupt(batch, "fog", 1, idx, table="cifar100")
    with pytest.raises(ValueError, match=r"RGB NCHW \[B, 3, H, W\]"):
        corrupt(batch[0], "fog", 1, idx)
    with pytest.raises(ValueError, match=r"RGB NCHW"):
        corrupt(batch[:, :1], "fog", 1, idx)
    with pytest.raises(TypeError, match="floating point"):
        corrupt((batch * 255).to(torch.uint8), "fog", 1, idx)
    with pytest.raises(ValueError, match=r"indices must have shape \[8\]"):
        corrupt(batch, "fog", 1, idx[:3])
    with pytest.raises(TypeError, match="indices must be integers"):
        corrupt(batch, "fog", 1, idx.float())
    with pytest.raises(ValueError, match="at least 8x8"):
        corrupt(batch[..., :4, :4], "fog", 1, idx)


def test_clean_is_identity(batch):
    assert corrupt(batch, CLEAN, 0, torch.arange(len(batch))) is batch


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("table", ["imagenet", "cifar10"])
def test_shape_dtype_range_and_batch_size_independence(batch, table):
    """Every corruption, severities 1 and 5: the output for a sample is identical whether it
    is corrupted in a batch of 8 or alone (seeded by its dataset index), and stays in [0, 1]."""
    idx = torch.arange(100, 108)
    for name in NAMES:
        for severity in (1, 5):
            out = corrupt(batch, name, severity, idx, seed=3, table=table)
            assert out.shape == batch.shape and out.dtype == batch.dtype and out.device == batch.device
            assert out.min() >= 0 and out.max() <= 1, name
            assert not torch.equal(out, batch), (name, severity)
            for i in (0, 5):
                single = corrupt(batch[i : i + 1], name, severity, idx[i : i + 1], seed=3, table=table)
                torch.testing.assert_close(single[0], out[i], atol=2e-6, rtol=0, msg=f"{name} s{severity} sample {i}")


def test_cpu_chunking_changes_nothing(batch, monkeypatch):
    from lightning_app.perturb import registry

    whole = {name: corrupt(batch, name, 4, torch.arange(8), seed=1) for name in NAMES}
    monkeypatch.setattr(registry, "_CPU_CHUNK_BYTES", 3 * 4 * batch[0].numel())  # chunks of 3 images
    for name in NAMES:
        torch.testing.assert_close(corrupt(batch, name, 4, torch.arange(8), seed=1), whole[name], atol=2e-6, rtol=0, msg=name)


def test_seed_and_index_drive_the_randomness(batch):
    x = batch[:2]
    for name in RANDOM:
        a = corrupt(x, name, 3, [0, 1], seed=0)
        assert torch.equal(a, corrupt(x, name, 3, [0, 1], seed=0)), name
        assert not torch.equal(a, corrupt(x, name, 3, [0, 1], seed=1)), name
        same_image = x[:1].expand(2, -1, -1, -1)
        b = corrupt(same_image, name, 3, [7, 8])
        assert not torch.equal(b[0], b[1]), name  # same image, different dataset index


def test_other_float_dtypes_and_inference_mode(batch):
    x = batch[:2]
    for dtype in (torch.float64, torch.bfloat16):
        out = corrupt(x.to(dtype), "gaussian_blur", 2, [0, 1])
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), corrupt(x, "gaussian_blur", 2, [0, 1]), atol=1e-2, rtol=0)
    with torch.inference_mode():
        for name in NAMES:
            out = corrupt(x, name, 2, [0, 1])
            assert out.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_is_preserved(batch):
    x = batch.cuda()
    for name in NAMES:
        out = corrupt(x, name, 3, torch.arange(len(x)), table="imagenet")
        assert out.device == x.device and out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1
        single = corrupt(x[2:3], name, 3, [2])
        torch.testing.assert_close(single[0], out[2], atol=1e-5, rtol=0, msg=name)
        if name not in RANDOM:  # deterministic: the same numbers as on the CPU
            torch.testing.assert_close(out.cpu(), corrupt(batch, name, 3, torch.arange(len(x))), atol=1e-4, rtol=0, msg=name)
