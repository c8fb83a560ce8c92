"""Device side: uint8 -> float [0, 1], augmentation only while training, batch_transforms and per-dataloader hooks."""
from __future__ import annotations

from typing import List

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_app.data import ArrayDataModule, Augment, DigitsDataModule, ImageFolderDataModule
from lightning_app.data.base import to_float01
from test_data_helpers import make_folder


def _array_dm(**kw) -> ArrayDataModule:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(40) % 4
    kw.setdefault("image_size", 8)
    kw.setdefault("batch_size", 8)
    return ArrayDataModule(images, labels, ["a", "b", "c", "d"], val_split=0.2, test_split=0.2, **kw)


class Recorder(pl.LightningModule):
    """Checks every batch it receives against the raw split dataset."""

    def __init__(self, dm: ArrayDataModule) -> None:
        super().__init__()
        self.dm = dm
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.log_: List[tuple] = []
        self.indices: List[torch.Tensor] = []

    def _check(self, batch, split, dataloader_idx=0):
        x, y, idx = batch
        assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        raw = torch.stack([self.dm.dataset(split)[int(i)][0] for i in idx])
        self.log_.append((split, dataloader_idx, x.detach().clone(), to_float01(raw)))
        self.indices.append(idx.clone())

    def training_step(self, batch, batch_idx):
        self._check(batch, "train")
        return (self.w * batch[0].mean()).sum() + self.w.sum() ** 2

    def validation_step(self, batch, batch_idx):
        self._check(batch, "val")

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._check(batch, "test", dataloader_idx)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        self._check(batch, self.dm.predict_split)
        return batch[2]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


def test_augmentation_only_in_training_and_float01():
    dm = _array_dm(augment=Augment(hflip=1.0))  # always flip: detectable
    model = Recorder(dm)
    trainer = _trainer(limit_train_batches=2, limit_val_batches=2)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    trainer.predict(model, datamodule=dm)
    by_split = {}
    for split, _, x, raw in model.log_:
        by_split.setdefault(split, []).append((x, raw))
    assert set(by_split) == {"train", "val", "test", "all"}
    for x, raw in by_split["train"]:
        assert torch.allclose(x, raw.flip(-1))
        assert not torch.allclose(x, raw)
    for split in ("val", "test", "all"):
        for x, raw in by_split[split]:
            assert torch.equal(x, raw), split


def test_random_augmentations_keep_shape_and_range():
    dm = _array_dm(image_size=16, augment=Augment(hflip=0.5, vflip=0.5, crop_scale=(0.3, 1.0), rotation=20,
                                                  color_jitter=0.4))
    batch = next(iter(dm.train_dataloader()))
    x, y, idx = dm.prepare_batch(batch, train=True)
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert not torch.allclose(x, to_float01(batch[0]))
    assert torch.equal(y, batch[1]) and torch.equal(idx, batch[2])
    x_eval, _, _ = dm.prepare_batch(batch, train=False)
    assert torch.equal(x_eval, to_float01(batch[0]))
    assert _array_dm(augment=False).augmentation is None
    assert _array_dm(augment=True).augment == Augment()


def test_batch_transforms_applied_in_every_stage():
    dm = _array_dm(augment=False)
    dm.batch_transforms.append(lambda x, idx: torch.zeros_like(x) + (idx.view(-1, 1, 1, 1).float() / 100))
    dm.batch_transforms.append(lambda x, idx: x * 2)  # applied in order
    model = Recorder(dm)
    trainer = _trainer(limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    assert {s for s, *_ in model.log_} == {"train", "val", "test"}
    for (split, _, x, _), idx in zip(model.log_, model.indices):
        assert torch.allclose(x, (idx.view(-1, 1, 1, 1).float() / 100 * 2).expand_as(x)), split


class PerLoaderDM(ArrayDataModule):
    """What a robustness wrapper does: several test loaders, a different transform per dataloader_idx."""

    def test_dataloader(self):
        return [super().test_dataloader(), super().test_dataloader()]

    def transform_batch(self, images, indices, dataloader_idx=0):
        images = super().transform_batch(images, indices, dataloader_idx)
        return images if dataloader_idx == 0 else 1.0 - images


def test_per_dataloader_transform_hook():
    rng = np.random.default_rng(1)
    dm = PerLoaderDM(rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), np.arange(20) % 2, ["x", "y"],
                     image_size=8, batch_size=4, val_split=0.0, test_split=0.4)
    model = Recorder(dm)
    _trainer().test(model, datamodule=dm)
    loaders = {d for _, d, _, _ in model.log_}
    assert loaders == {0, 1}
    for _, d, x, raw in model.log_:
        assert torch.allclose(x, raw if d == 0 else 1.0 - raw)


def test_folder_fit_without_val_split(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 3})
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=3, num_workers=0, val_split=0.0)
    model = Recorder(dm)
    _trainer(limit_train_batches=2).fit(model, datamodule=dm)  # empty val split: no validation, no crash
    assert {s for s, *_ in model.log_} == {"train"}


def test_digits_through_predict_loop():
    dm = DigitsDataModule(image_size=16, batch_size=128, predict_split="test")
    model = Recorder(dm)
    out = _trainer().predict(model, datamodule=dm)
    assert torch.cat(out).tolist() == list(range(len(dm.dataset("test"))))


def test_to_float01():
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(to_float01(x), x)
    y = to_float01(torch.arange(256, dtype=torch.uint8))
    assert y.dtype == torch.float32 and y[0] == 0 and y[255] == 1.0
    assert torch.allclose(y, torch.arange(256) / 255.0, rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        _array_dm(predict_split="everything")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_pinned_augmented_on_device():
    # resize in the workers: the conversion is bit-identical on CUDA; the device resize (within one uint8 level of
    # the workers' kernel there) is tests/test_data_resize_device.py's
    dm = _array_dm(image_size=16, num_workers=2, resize_on="workers", augment=Augment(hflip=0.5, crop_scale=(0.5, 1.0), rotation=10,
                                                                  color_jitter=0.2))
    assert not dm.train_dataloader().pin_memory  # no trainer yet: CUDA merely existing pins nothing

    class OnDevice(Recorder):
        def training_step(self, batch, batch_idx):
            assert self.trainer.train_dataloader.pin_memory  # a CUDA trainer: pinned
            assert batch[0].is_cuda and batch[0].dtype == torch.float32 and batch[1].is_cuda
            return super().training_step(batch, batch_idx)

    model = OnDevice(dm)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    trainer.predict(model, datamodule=dm)
    for split, _, x, raw in model.log_:
        assert 0 <= float(x.min()) and float(x.max()) <= 1
        if split != "train":
            assert torch.equal(x.cpu(), raw)  # bit-identical to the CPU conversion
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_float01(u8.cuda()).cpu(), to_float01(u8))
