"""Safe image loading: every awkward file kind becomes RGB uint8 or is skipped with a warning naming it."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_app.data import ImageFolderDataModule
from lightning_app.data.images import ImageDecodeError, check_image, load_rgb, scan_images
from lightning_app.data.resize import resize_image
from test_data_helpers import make_folder, write_bad_images

DECODABLE = {"grayscale", "rgba", "cmyk", "16bit", "palette"}
UNREADABLE_HEADER = {"zero_byte", "not_an_image"}  # caught by the cheap up-front scan
UNREADABLE_DATA = {"truncated", "corrupt_png"}  # header fine, pixel data broken: caught at load time


@pytest.fixture
def bad(tmp_path):
    return write_bad_images(tmp_path / "bad")


def test_decodable_modes_become_rgb_uint8(bad):
    expected_first_pixel = {
        "grayscale": (100, 100, 100),
        "rgba": (200, 0, 0),  # alpha dropped, not composited (Keras / tf.io.decode_image behaviour)
        "cmyk": (255, 0, 0),
        "16bit": (255, 255, 255),  # 65535 -> 255
        "palette": (0, 255, 0),
    }
    for kind in DECODABLE:
        arr = load_rgb(bad[kind])
        assert arr.dtype == np.uint8 and arr.shape == (20, 30, 3), kind
        assert tuple(arr[0, 0]) == expected_first_pixel[kind], kind


def test_16bit_is_rescaled_not_clipped(tmp_path):
    p = tmp_path / "mid.png"
    Image.fromarray(np.full((4, 4), 25700, np.uint16)).save(p)  # 25700 / 257 = 100
    assert tuple(load_rgb(p)[0, 0]) == (100, 100, 100)  # PIL's convert("RGB") would give 255


@pytest.mark.parametrize("kind", sorted(UNREADABLE_HEADER | UNREADABLE_DATA))
def test_unreadable_files_raise_decode_error_naming_file(bad, kind):
    with pytest.raises(ImageDecodeError, match=bad[kind].name):
        load_rgb(bad[kind])


def test_scan_levels(bad):
    for kind in UNREADABLE_HEADER:
        assert check_image(bad[kind], "header") is not None
    for kind in DECODABLE | UNREADABLE_DATA:
        assert check_image(bad[kind], "header") is None, kind
    for kind in UNREADABLE_DATA:
        assert check_image(bad[kind], "full") is not None, kind
    assert check_image(bad["zero_byte"], "none") is None


def test_scan_warns_naming_each_skipped_file(bad):
    paths = [bad[k] for k in sorted(bad)]
    with pytest.warns(UserWarning) as rec:
        good, skipped = scan_images(paths, "header")
    msg = "\n".join(str(w.message) for w in rec)
    for kind in UNREADABLE_HEADER:
        assert str(bad[kind]) in msg
    assert {p for p, _ in skipped} == {str(bad[k]) for k in UNREADABLE_HEADER}
    assert len(good) == len(paths) - len(UNREADABLE_HEADER)


def _folder_with_bad_files(tmp_path):
    root = tmp_path / "ds"
    make_folder(root, {"a": 4, "b": 4})
    bad = write_bad_images(root / "b" / "odd")  # nested: found recursively
    return root, bad


def test_datamodule_survives_every_bad_kind(tmp_path):
    root, bad = _folder_with_bad_files(tmp_path)
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, num_workers=0, val_split=0.0)
    with pytest.warns(UserWarning) as rec:
        dm.setup("fit")
    scan_msg = "\n".join(str(w.message) for w in rec)
    for kind in UNREADABLE_HEADER:
        assert str(bad[kind]) in scan_msg
    n_expected = 8 + len(DECODABLE) + len(UNREADABLE_DATA)
    assert len(dm.dataset("train")) == n_expected

    seen = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for images, labels, indices in dm.train_dataloader():
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
            assert labels.dtype == torch.int64 and indices.dtype == torch.int64
            assert images.shape[0] == labels.shape[0] == indices.shape[0]
            seen.extend(indices.tolist())
    assert sorted(seen) == list(range(n_expected))  # every index served once, batch sizes intact
    load_msg = "\n".join(str(w.message) for w in rec)
    for kind in UNREADABLE_DATA:
        assert str(bad[kind]) in load_msg, kind


def test_replacement_is_deterministic_next_readable(tmp_path):
    root, bad = _folder_with_bad_files(tmp_path)
    with pytest.warns(UserWarning):
        dm = ImageFolderDataModule(str(root), image_size=16, num_workers=0, val_split=0.0)
        dm.setup()
    ds = dm.dataset("train")
    paths = [ds.source.describe(int(i)) for i in ds.ids]
    i = paths.index(str(bad["truncated"]))
    with pytest.warns(UserWarning, match="truncated.jpg"):
        image, label, index = ds[i]
    assert index == i
    j = i + 1
    while paths[j % len(paths)] in {str(bad[k]) for k in UNREADABLE_DATA}:
        j += 1
    ref_image, ref_label, _ = ds[j % len(paths)]
    assert torch.equal(image, ref_image) and label == ref_label


def test_full_verify_drops_broken_data_up_front(tmp_path):
    root, bad = _folder_with_bad_files(tmp_path)
    dm = ImageFolderDataModule(str(root), image_size=16, num_workers=0, val_split=0.0, verify="full")
    with pytest.warns(UserWarning) as rec:
        dm.setup()
    msg = "\n".join(str(w.message) for w in rec)
    for kind in UNREADABLE_HEADER | UNREADABLE_DATA:
        assert str(bad[kind]) in msg
    assert len(dm.dataset("train")) == 8 + len(DECODABLE)


def test_resize_modes():
    # 60 wide x 20 high: red | green | blue thirds
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:40, 1] = 255
    arr[:, 40:, 2] = 255
    squash = resize_image(arr, (16, 16), "squash")
    crop = resize_image(arr, (16, 16), "crop")
    assert squash.shape == crop.shape == (3, 16, 16) and squash.dtype == torch.uint8
    assert squash[0, :, 0].min() == 255 and squash[2, :, -1].min() == 255  # all three colours kept
    assert (crop[1] == 255).all() and (crop[0] == 0).all() and (crop[2] == 0).all()  # centre square only
    assert resize_image(arr, (10, 30), "squash").shape == (3, 10, 30)
    assert torch.equal(resize_image(arr, (20, 60)), torch.from_numpy(arr).permute(2, 0, 1))  # no-op size
