"""Valid input that used to crash (issue 9, case 4) and nonsense that used to be accepted silently (case 5)."""
import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image

from lightning_app.cli import main as cli_main
from lightning_app.data import ArrayDataModule, ImageFolderDataModule
from lightning_app.data.images import BadImageWarning, check_image, load_rgb
from lightning_app.entry import DEBUG_ENV
from lightning_app.errors import ConfigError
from lightning_app.finetune import LayerwiseUnfreezing
from lightning_app.module import TransferModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def save_images(folder, n, seed=0, size=(20, 24)):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))


def quiet_trainer(tmp_path, **kw):
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path, **kw)


# ----------------------------------------------------------------------------- case 4: valid input that crashed
def test_non_utf8_class_folder_and_file_names_train_test_and_report(tmp_path, monkeypatch):
    """A class folder and a file whose names are not UTF-8 (Latin-1 'café', 'crème'): extraction (the cache key
    hashes file names), training, test and its reports all work; reports show the names with \\x escapes."""
    root = os.fsencode(tmp_path / "food")
    for cls in (b"caf\xe9", b"tea"):
        save_images(os.path.join(root, cls).decode("utf-8", "surrogateescape"), 6)
    Image.new("RGB", (20, 24), (10, 20, 30)).save(os.path.join(root, b"tea", b"cr\xe8me.png"))
    config = tmp_path / "extract.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"backbone": "test_resnet", "weights": None, "stage": "extract"},
        "data": {"class_path": "lightning_app.data.ImageFolderDataModule",
                 "init_args": {"root": os.fsdecode(root), "image_size": 16, "num_workers": 0, "batch_size": 4,
                               "val_split": 0.2, "test_split": 0.2, "augment": False}},
        "features": {"cache_dir": str(tmp_path / "cache")},
        "test_after_fit": True,
    }))
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    cli = cli_main(["fit", "--config", str(config)])
    assert "test_acc" in cli.trainer.callback_metrics  # the test results are not lost
    reports = Path(cli.trainer.log_dir) / "reports"
    matrix = (reports / "confusion_matrix.csv").read_text(encoding="utf-8")
    assert "caf\\xe9" in matrix and (reports / "confusion_matrix.png").is_file()
    assert cli.model.class_names == ["caf\\xe9", "tea"]


def test_image_over_pillows_decompression_bomb_limit_is_decoded(tmp_path, monkeypatch):
    """Pillow refuses images over 2 x MAX_IMAGE_PIXELS (DecompressionBombError, which the header scan did not even
    catch); a big photo in one's own dataset is valid input: it is decoded (JPEG at reduced scale), with a notice."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands for Pillow's 89.5 MP: the same code path
    big = tmp_path / "big.png"
    Image.new("RGB", (120, 90), (200, 100, 50)).save(big)
    jpeg = tmp_path / "big.jpg"
    Image.new("RGB", (160, 120), (10, 200, 60)).save(jpeg, quality=95)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(big)
    assert check_image(big, "header") is None and check_image(big, "full") is None
    with pytest.warns(BadImageWarning, match="over Pillow's decompression-bomb limit"):
        arr = load_rgb(big)
    assert arr.shape == (90, 120, 3) and tuple(arr[0, 0]) == (200, 100, 50)
    arr = load_rgb(jpeg)
    assert arr.shape[0] * arr.shape[1] <= 2 * 1000 * 4 and abs(int(arr[5, 5, 1]) - 200) < 8  # a reduced decode
    monkeypatch.setenv("LIGHTNING_APP_MAX_IMAGE_PIXELS", "5000")
    assert "over the 5,000-pixel limit" in check_image(big, "full")


def test_last_training_batch_of_one_with_batchnorm_training(tmp_path):
    """25 training images, batch size 8: a last batch of one image, which BatchNorm in training mode rejects
    ("Expected more than 1 value per channel when training"): that batch is skipped, with a notice."""
    rng = np.random.default_rng(0)
    images = (rng.random((25, 12, 12, 3)) * 255).astype(np.uint8)
    dm = ArrayDataModule(images, np.arange(25) % 2, ["a", "b"], image_size=16, batch_size=8, val_split=0.0,
                         test_split=0.0)
    model = TransferModule("test_resnet", num_classes=2, weights=None, stage="finetune", lr=1e-3)
    assert any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    trainer = quiet_trainer(tmp_path, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 3 and trainer.train_dataloader.drop_last
    dm2 = ArrayDataModule(images[:24], np.arange(24) % 2, ["a", "b"], image_size=16, batch_size=8, val_split=0.0,
                          test_split=0.0)
    assert not dm2.train_dataloader().drop_last  # nothing to skip


def test_inception_v3_at_32_px_says_its_minimum_size(tmp_path):
    rng = np.random.default_rng(0)
    dm = ArrayDataModule((rng.random((8, 32, 32, 3)) * 255).astype(np.uint8), np.arange(8) % 2, ["a", "b"],
                         image_size=32, batch_size=4, val_split=0.0, test_split=0.0)
    model = TransferModule("InceptionV3", num_classes=2, weights=None, stage="head")
    with pytest.raises(ConfigError, match=r"InceptionV3 needs input images of at least 75x75 pixels.*got 32x32"):
        quiet_trainer(tmp_path, limit_val_batches=0, max_steps=1).fit(model, datamodule=dm)


# ----------------------------------------------------------------------------- case 5: silent nonsense
@pytest.mark.parametrize("lr", [-0.5, 0.0])
def test_learning_rate_must_be_positive(lr):
    with pytest.raises(ConfigError, match="must be > 0"):
        TransferModule("test_resnet", num_classes=2, weights=None, lr=lr)
    model = TransferModule("test_resnet", num_classes=2, weights=None,
                           optimizer=lambda params: torch.optim.SGD(params, lr=lr if lr else 0.0))
    with pytest.raises(ConfigError, match="must be > 0|could not build the optimizer"):
        model.configure_optimizers()


def test_unfreeze_schedule_beyond_the_backbone_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    dm = ArrayDataModule((rng.random((16, 12, 12, 3)) * 255).astype(np.uint8), np.arange(16) % 2, ["a", "b"],
                         image_size=16, batch_size=8, val_split=0.0, test_split=0.0)
    model = TransferModule("test_resnet", num_classes=2, weights=None, stage="finetune")
    n = len(model.layer_groups)
    with pytest.raises(ConfigError, match=f"unfreezes 50 layer groups.*test_resnet has {n}.*'all'"):
        quiet_trainer(tmp_path, callbacks=[LayerwiseUnfreezing({1: 20, 3: 30})]).fit(model, datamodule=dm)
    quiet_trainer(tmp_path, callbacks=[LayerwiseUnfreezing({1: "all"})], max_steps=1).fit(model, datamodule=dm)


def test_extract_stage_with_augmentation_is_a_logged_decision(tmp_path, monkeypatch):
    import pickle

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 10) for i in range(1, 6)] + [("test_batch", 10)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": (rng.random((n, 3072)) * 255).astype(np.uint8),
                         "labels": list(rng.integers(0, 10, n))}, f)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.warns(UserWarning, match="augmentation is not applied in stage 'extract'"):
        cli_main(["fit", "--config", str(CONFIGS / "cifar10.yaml"), "--data.init_args.root", str(tmp_path / "data"),
                  "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
                  "--data.init_args.augment", "true", "--model.backbone", "test_resnet", "--model.weights", "null",
                  "--features.cache_dir", str(tmp_path / "cache"), "--trainer.fast_dev_run", "true",
                  "--trainer.accelerator", "cpu",
                  "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false"])


def test_class_without_val_or_test_images_is_reported(tmp_path):
    for cls, n in (("many", 10), ("lonely", 1)):
        save_images(tmp_path / cls, n)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, num_workers=0, val_split=0.2, test_split=0.2)
    with pytest.warns(UserWarning, match=r"'lonely' \(1 image\) has no validation and no test image"):
        dm.setup()
    assert (dm.dataset("val").labels == 1).sum() == 2  # 'many' (label 1) is in val; 'lonely' (label 0) is not
    assert (dm.dataset("train").labels == 0).sum() == 1
