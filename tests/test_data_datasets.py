"""CIFAR-10 / Food-101 offline (tiny local files in the real formats, no network) and the bundled digits set."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch

from lightning_app.data import (
    CIFAR10_CLASSES,
    FOOD101_CLASSES,
    Cifar10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    Food101DataModule,
)
from test_data_helpers import CIFAR_NAMES, tar_folder, write_cifar10, write_food101


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails as it would offline (and never touches the network)."""
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    monkeypatch.setattr(tvu, "download_url", offline)


# ----------------------------------------------------------------------------- CIFAR-10
def test_cifar10_classes_before_any_file_exists(tmp_path):
    dm = Cifar10DataModule(root=str(tmp_path), download=False)
    assert dm.num_classes == 10 and dm.class_names == CIFAR10_CLASSES == CIFAR_NAMES


@pytest.mark.parametrize("download", [False, True])
def test_cifar10_missing_gives_actionable_error(tmp_path, download):
    dm = Cifar10DataModule(root=str(tmp_path), download=download)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert str(tmp_path / "cifar-10-python.tar.gz") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    if download:
        assert "download failed" in msg and "network disabled" in msg
    with pytest.raises(DatasetNotFoundError):
        dm.setup("fit")  # setup alone (no prepare_data) never downloads, same clear error


def test_cifar10_tiny_local_folder_loads_exact_pixels(tmp_path):
    content = write_cifar10(tmp_path, per_batch=10, test=10)
    dm = Cifar10DataModule(root=str(tmp_path), image_size=32, batch_size=8, num_workers=0, val_split=0.2,
                           download=False, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.split_sizes() == {"train": 40, "val": 10, "test": 10}
    assert np.bincount(dm.dataset("val").labels, minlength=10).tolist() == [1] * 10  # stratified
    images, labels, indices = next(iter(dm.test_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    data, ref_labels = content["test_batch"]
    expected = torch.from_numpy(data[:8].reshape(8, 3, 32, 32))  # CIFAR rows are CHW planes
    assert torch.equal(images, expected)
    assert labels.tolist() == ref_labels[:8] and indices.tolist() == list(range(8))
    # upsampled for an ImageNet backbone
    dm224 = Cifar10DataModule(root=str(tmp_path), image_size=64, num_workers=0, download=False)
    assert dm224.dataset("train")[0][0].shape == (3, 64, 64)
    # the md5 check of the official files rejects our fake ones, with a clear message
    with pytest.raises(RuntimeError, match="wrong md5"):
        Cifar10DataModule(root=str(tmp_path), download=False, verify_checksums=True).prepare_data()


def test_cifar10_local_archive_is_extracted(tmp_path):
    src = tmp_path / "src"
    write_cifar10(src, per_batch=4, test=3)
    root = tmp_path / "data"
    root.mkdir()
    tar_folder(src / "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
    dm = Cifar10DataModule(root=str(root), image_size=32, num_workers=0, val_split=0.0)  # download=True: unused
    dm.prepare_data()
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert dm.split_sizes() == {"train": 20, "val": 0, "test": 3}


def test_cifar10_malformed_batch(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    dm = Cifar10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(RuntimeError, match="data_batch_3"):
        dm.setup()


# ----------------------------------------------------------------------------- Food-101
def test_food101_tiny_layout_loads(tmp_path):
    classes = ["ramen", "apple_pie", "sushi"]
    write_food101(tmp_path, classes, n_train=5, n_test=2)
    dm = Food101DataModule(root=str(tmp_path), image_size=24, batch_size=4, num_workers=0, val_split=0.2,
                           download=False)
    assert dm.class_names == sorted(classes) and dm.num_classes == 3  # from meta/train.json, before setup
    dm.prepare_data()
    dm.setup("fit")
    assert dm.split_sizes() == {"train": 12, "val": 3, "test": 6}
    assert np.bincount(dm.dataset("test").labels).tolist() == [2, 2, 2]
    images, labels, indices = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and indices.dtype == torch.int64
    ds = dm.dataset("test")
    for i in range(len(ds)):
        path = ds.source.describe(int(ds.ids[i]))
        assert f"/images/{dm.class_names[ds.labels[i]]}/" in path
    assert len(dm.dataset_fingerprint("train")) == 64


def test_food101_missing_gives_actionable_error(tmp_path):
    dm = Food101DataModule(root=str(tmp_path), download=True)
    assert dm.num_classes == 101 and dm.class_names == FOOD101_CLASSES  # known without the files
    with pytest.raises(DatasetNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert str(tmp_path / "food-101") in msg and str(tmp_path / "food-101.tar.gz") in msg
    assert "meta/train.json" in msg


def test_food101_class_list_matches_torchvision_sorting():
    assert len(FOOD101_CLASSES) == 101 == len(set(FOOD101_CLASSES))
    assert FOOD101_CLASSES == sorted(FOOD101_CLASSES)
    assert FOOD101_CLASSES.index("cheese_plate") < FOOD101_CLASSES.index("cheesecake")


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_and_splits():
    dm = DigitsDataModule(image_size=32, batch_size=50)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    sizes = dm.split_sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=10) and sizes["val"] == pytest.approx(0.1 * 1797, abs=10)
    counts = np.bincount(dm.dataset("test").labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    images, labels, indices = next(iter(dm.test_dataloader()))
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # gray -> RGB
    assert images.max() > 200 and images.min() == 0  # real ink, full range
    assert dm.augment.is_identity()  # no flips on digits by default


def test_digits_split_seeded():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    assert np.array_equal(a.dataset("test").ids, b.dataset("test").ids)
    assert not np.array_equal(a.dataset("test").ids, c.dataset("test").ids)
    assert a.dataset_fingerprint("test") == b.dataset_fingerprint("test") != c.dataset_fingerprint("test")
    train, test = set(a.dataset("train").ids.tolist()), set(a.dataset("test").ids.tolist())
    assert not train & test
