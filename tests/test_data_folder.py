"""ImageFolderDataModule: layouts, stratified seeded splits, class names before setup, errors, fingerprints."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_app.data import DatasetLayoutError, ImageFolderDataModule
from test_data_helpers import make_folder, noise_image, write_bad_images

COUNTS = {"cat": 10, "dog": 20, "ant": 5}


def _dm(root, **kw):
    kw.setdefault("image_size", 16)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 8)
    return ImageFolderDataModule(str(root), **kw)


def _files(dm, split):
    ds = dm.dataset(split)
    return [ds.source.describe(int(i)) for i in ds.ids]


def test_classes_known_right_after_init(tmp_path):
    make_folder(tmp_path, COUNTS)
    dm = _dm(tmp_path)
    assert dm._splits is None  # nothing decoded or split yet
    assert dm.class_names == ["ant", "cat", "dog"]  # sorted by name
    assert dm.num_classes == 3


def test_stratified_split_sizes_and_disjoint(tmp_path):
    make_folder(tmp_path, COUNTS)
    dm = _dm(tmp_path, val_split=0.2, test_split=0.2)
    sizes = dm.split_sizes()
    assert sizes == {"train": 21, "val": 7, "test": 7}
    for split, per_class in (("val", [1, 2, 4]), ("test", [1, 2, 4])):
        assert np.bincount(dm.dataset(split).labels, minlength=3).tolist() == per_class
    files = {s: set(_files(dm, s)) for s in ("train", "val", "test")}
    assert not (files["train"] & files["val"]) and not (files["train"] & files["test"]) and not (files["val"] & files["test"])
    assert len(files["train"] | files["val"] | files["test"]) == 35
    # labels follow the folder names
    ds = dm.dataset("val")
    for f, y in zip(_files(dm, "val"), ds.labels):
        assert os.path.basename(os.path.dirname(f)) == dm.class_names[y]


def test_split_is_deterministic_and_seeded(tmp_path):
    make_folder(tmp_path, COUNTS)
    a, b, c = _dm(tmp_path, seed=1), _dm(tmp_path, seed=1), _dm(tmp_path, seed=2)
    assert _files(a, "val") == _files(b, "val")
    assert _files(a, "val") != _files(c, "val")
    assert a.dataset_fingerprint("val") == b.dataset_fingerprint("val") != c.dataset_fingerprint("val")


def test_train_val_test_folders(tmp_path):
    make_folder(tmp_path / "train", {"x": 6, "y": 6})
    make_folder(tmp_path / "val", {"x": 2, "y": 3})
    dm = _dm(tmp_path, test_split=0.5)  # no test/ folder: carved out of train
    assert dm.class_names == ["x", "y"]
    assert dm.split_sizes() == {"train": 6, "val": 5, "test": 6}
    assert all("/val/" in f for f in _files(dm, "val"))
    assert all("/train/" in f for f in _files(dm, "test"))

    make_folder(tmp_path / "test", {"y": 1})  # a class may be absent from test/
    dm = _dm(tmp_path)
    assert dm.split_sizes() == {"train": 12, "val": 5, "test": 1}
    assert dm.dataset("test").labels.tolist() == [1]


def test_unknown_class_in_val_folder(tmp_path):
    make_folder(tmp_path / "train", {"x": 2})
    make_folder(tmp_path / "val", {"x": 1, "zebra": 1})
    with pytest.raises(DatasetLayoutError, match="zebra"):
        _dm(tmp_path)


def test_empty_class_folder_is_an_error_at_init(tmp_path):
    make_folder(tmp_path, {"a": 3})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("not an image")
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "b")):
        _dm(tmp_path)


def test_no_images_at_all(tmp_path):
    with pytest.raises(DatasetLayoutError, match="no class subfolders"):
        _dm(tmp_path)
    noise_image(0).save(tmp_path / "loose.png")
    with pytest.raises(DatasetLayoutError, match="subfolder per class"):
        _dm(tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        _dm(tmp_path / "does-not-exist")


def test_class_with_only_unreadable_files_fails_in_setup(tmp_path):
    make_folder(tmp_path, {"good": 3})
    bad = write_bad_images(tmp_path / "broken")
    for kind, p in bad.items():
        if kind not in ("zero_byte", "not_an_image"):
            p.unlink()
    dm = _dm(tmp_path)
    assert dm.num_classes == 2
    with pytest.warns(UserWarning), pytest.raises(DatasetLayoutError, match="'broken'"):
        dm.setup()


def test_batches_and_loader_settings(tmp_path):
    make_folder(tmp_path, COUNTS, size=(40, 24))
    dm = _dm(tmp_path, image_size=(12, 20), batch_size=4, val_split=0.2)
    images, labels, indices = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 12, 20) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and indices.dtype == torch.int64
    tl = dm.train_dataloader()
    assert tl.generator is not None and not tl.drop_last
    assert [i for _, _, idx in dm.train_dataloader() for i in idx.tolist()] == \
        [i for _, _, idx in _dm(tmp_path, image_size=(12, 20), batch_size=4).train_dataloader() for i in idx.tolist()]
    vl = dm.val_dataloader()
    assert not vl.drop_last and not vl.pin_memory  # no CUDA trainer attached: nothing to pin for
    assert _dm(tmp_path, pin_memory=True).val_dataloader().pin_memory
    assert _dm(tmp_path, val_split=0.0).val_dataloader() == []
    with pytest.raises(DatasetLayoutError, match="test_split"):
        dm.test_dataloader()


def test_workers_are_persistent_and_work(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 3})
    dm = _dm(tmp_path, num_workers=1, val_split=0.0, batch_size=6)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    assert not _dm(tmp_path, num_workers=1, test_split=0.4).test_dataloader().persistent_workers  # run once
    assert not _dm(tmp_path, num_workers=0).train_dataloader().persistent_workers
    images, labels, _ = next(iter(loader))
    assert images.shape == (6, 3, 16, 16)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_predict_order_and_all_split(tmp_path):
    make_folder(tmp_path, COUNTS)
    dm = _dm(tmp_path, val_split=0.2, test_split=0.2, batch_size=5)
    dm.predict_split = "all"
    idx = torch.cat([b[2] for b in dm.predict_dataloader()])
    labels = torch.cat([b[1] for b in dm.predict_dataloader()])
    assert idx.tolist() == list(range(35))
    expected = np.concatenate([dm.dataset(s).labels for s in ("train", "val", "test")])
    assert labels.tolist() == expected.tolist()
    dm.predict_split = "val"
    first = next(iter(dm.predict_dataloader()))
    assert torch.equal(first[0][0], dm.dataset("val")[0][0])
    with pytest.raises(ValueError, match="split"):
        dm.dataset("validation")


def test_fingerprint_tracks_content_and_settings(tmp_path):
    files = make_folder(tmp_path, {"a": 4, "b": 4})
    base = _dm(tmp_path, val_split=0.25)
    fp = {s: base.dataset_fingerprint(s) for s in ("train", "val", "test", "all")}
    assert len(set(fp.values())) == 4 and all(len(v) == 64 for v in fp.values())
    assert _dm(tmp_path, val_split=0.25).dataset_fingerprint("train") == fp["train"]
    assert _dm(tmp_path, val_split=0.25, image_size=20).dataset_fingerprint("train") != fp["train"]
    assert _dm(tmp_path, val_split=0.25, resize="crop").dataset_fingerprint("train") != fp["train"]
    # a changed file changes the fingerprint of the split it is in
    train_files = _files(base, "train")
    Image.new("RGB", (33, 33)).save(train_files[0])
    os.utime(train_files[0], ns=(1, 1))
    assert _dm(tmp_path, val_split=0.25).dataset_fingerprint("train") != fp["train"]
    assert _dm(tmp_path, val_split=0.25).dataset_fingerprint("val") == fp["val"]
    assert files  # silence unused


def test_bad_arguments(tmp_path):
    make_folder(tmp_path, {"a": 2})
    with pytest.raises(ValueError, match="resize"):
        _dm(tmp_path, resize="stretch")
    with pytest.raises(ValueError, match="val_split"):
        _dm(tmp_path, val_split=0.7, test_split=0.5)
    with pytest.raises(ValueError, match="verify"):
        _dm(tmp_path, verify="deep")
