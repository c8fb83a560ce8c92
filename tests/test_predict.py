"""Predictions you can use (issue 9, case 3): predictions.csv names each file, its predicted class, probability and
top-5; an unreadable file gets a row with its error (never another file's prediction); a folder of unlabelled images
(recursive) or a list of files can be predicted with only the checkpoint."""
import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image

from lightning_app.checkpoint import ModelCheckpoint
from lightning_app.cli import main as cli_main
from lightning_app.data import ImageFilesDataModule, ImageFolderDataModule
from lightning_app.entry import DEBUG_ENV
from lightning_app.errors import DatasetNotFoundError
from lightning_app.module import TransferModule
from lightning_app.reports import PredictionCSVWriter

CLASSES = ["apple", "bread", "cheese", "dates", "eggs", "figs", "grapes"]


def save_images(folder, n, rng, size=(18, 22)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a (barely) trained 7-class model at 24 px."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        save_images(root / "train" / c, 3, rng)
    dm = ImageFolderDataModule(str(root / "train"), image_size=24, batch_size=8, num_workers=0, val_split=0.0)
    model = TransferModule("test_resnet", num_classes=len(CLASSES), weights=None, stage="finetune", lr=1e-3)
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True)], default_root_dir=root,
               limit_val_batches=0).fit(model, datamodule=dm)
    return root, root / "ckpt" / "last.ckpt"


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_folder_and_files_with_only_the_checkpoint(trained, tmp_path, monkeypatch):
    root, ckpt = trained
    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    save_images(photos / "deep" / "er", 2, rng, size=(40, 30))  # unlabelled, nested: found recursively
    save_images(photos / "bread", 2, rng)  # a class folder: labelled
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")  # unreadable: its own row, with the error
    single = tmp_path / "one.png"
    save_images(tmp_path / "tmp1", 1, rng)
    (tmp_path / "tmp1" / "0.png").rename(single)
    out = tmp_path / "preds.csv"
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    cli_main(["predict", "--ckpt_path", str(ckpt), "--prediction.inputs", f"[{photos}, {single}]",
              "--prediction.output", str(out), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    expected = [str(photos / "broken.jpg"), str(photos / "bread" / "0.png"), str(photos / "bread" / "1.png"),
                str(photos / "deep" / "er" / "0.png"), str(photos / "deep" / "er" / "1.png"), str(single)]
    assert paths == expected  # one row per file, in input order, each folder's files then its sub-folders
    bad = rows[0]
    assert bad["pred"] == bad["prob"] == bad["top5"] == "" and bad["error"]  # no neighbour's prediction
    for r in rows[1:]:
        assert r["pred"] in CLASSES and not r["error"]
        top = [pair.split(":") for pair in r["top5"].split(";")]
        assert len(top) == 5 and top[0][0] == r["pred"] and float(top[0][1]) == pytest.approx(float(r["prob"]), 1e-3)
        probs = [float(p) for _, p in top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-3
    assert [r["label"] for r in rows] == ["", "bread", "bread", "", "", ""]


def test_predict_split_reports_unreadable_files_instead_of_substituting(trained, tmp_path):
    """The data's own predict split (verify: none, so the broken file is found at load time): its row has the error;
    training still substitutes (every index once per epoch)."""
    root, _ = trained
    rng = np.random.default_rng(2)
    for c in CLASSES[:2]:
        save_images(tmp_path / c, 3, rng)
    (tmp_path / "bread" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    dm = ImageFolderDataModule(str(tmp_path), image_size=24, batch_size=4, num_workers=0, val_split=0.0,
                               verify="none", predict_split="train")
    dm.predict_report_errors = True  # as `python -m lightning_app predict` sets it
    model = TransferModule("test_resnet", num_classes=2, weights=None, stage="head")
    writer = PredictionCSVWriter(str(tmp_path / "p.csv"))
    with pytest.warns(UserWarning, match="zz_truncated.png.*gets a row with the error"):
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer]).predict(
            model, datamodule=dm, return_predictions=False)
    rows = read_rows(tmp_path / "p.csv")
    assert len(rows) == 7 and len({r["path"] for r in rows}) == 7
    broken = next(r for r in rows if r["path"].endswith("zz_truncated.png"))
    assert broken["pred"] == "" and broken["error"] and broken["label"] == "bread"
    assert all(r["pred"] in ("apple", "bread") for r in rows if r is not broken)
    images, labels, index = dm.dataset("train")[6]  # training: the next readable sample in its place
    assert images.shape == (3, 24, 24) and index == 6


def test_files_datamodule_labels_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    save_images(tmp_path / "a" / "x" / "y", 1, rng)
    save_images(tmp_path / "b", 1, rng)
    (tmp_path / "notes.txt").write_text("not an image, not listed")
    dm = ImageFilesDataModule([str(tmp_path)], class_names=["a", "b"], image_size=8, num_workers=0)
    assert dm.labels == [0, 1] and len(dm.paths) == 2  # a/x/y/0.png is under class folder 'a'
    with pytest.raises(DatasetNotFoundError, match="neither an image file nor a folder"):
        ImageFilesDataModule([str(tmp_path / "missing")])


def test_predict_without_data_or_inputs_says_what_is_missing(trained, capsys, monkeypatch):
    _, ckpt = trained
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(["predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    assert exc.value.code == 2
    assert "predict needs a data section" in capsys.readouterr().err


def test_cli_test_checks_the_data_against_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    """Issue 9, case 2 through the CLI: trained at 24 px on 7 classes; testing at 32 px resizes to 24 px with a
    notice (before: accuracy silently collapsed), a renamed class folder is refused with the difference spelled out
    (before: accuracy 1.0 -> 0.0, no warning)."""
    import shutil

    root, ckpt = trained
    data = tmp_path / "data"
    shutil.copytree(root / "train", data)
    common = ["test", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "food.yaml"),
              "--ckpt_path", str(ckpt), "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
              "--data.init_args.val_split", "0.0", "--data.init_args.test_split", "0.5",
              "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path), "--report.grid_size", "0"]
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.warns(UserWarning, match="images are resized to 24x24, the size the checkpoint"):
        cli = cli_main([*common, "--data.init_args.root", str(data)])
    assert cli.datamodule.image_size == (24, 24) and "test_acc" in cli.trainer.callback_metrics

    (data / "apple").rename(data / "apples")
    with pytest.raises(SystemExit) as exc:
        cli_main([*common, "--data.init_args.root", str(data)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "data error: the data's classes are not the 7 classes the checkpoint" in err
    assert "missing from the data: 'apple'; not known to the model: 'apples'" in err and "Traceback" not in err
