"""The CLI and every config: --print_config, fast_dev_run of food / cifar10 on tiny local data, and the
full quickstart (held-out accuracy), then test / validate / predict from its checkpoint."""
import csv
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lightning_app.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: held-out accuracy the quickstart promises (configs/quickstart.yaml, README)
QUICKSTART_MIN_TEST_ACC = 0.90

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def run(*args):
    return main([str(a) for a in args])


def common(tmp_path):
    return ["--trainer.default_root_dir", tmp_path, "--trainer.logger.init_args.save_dir", tmp_path / "runs",
            "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("name", ["quickstart", "food", "cifar10"])
def test_print_config(name, capsys):
    with pytest.raises(SystemExit) as exc:
        run("fit", "--config", CONFIGS / f"{name}.yaml", "--print_config")
    assert exc.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["backbone"] and cfg["data"]["class_path"].startswith("lightning_app.data.")
    assert cfg["checkpoint"]["monitor"] == "val_acc"
    assert "optimizer" not in cfg or cfg["optimizer"] is None  # the module builds its own param groups
    assert "num_classes" not in cfg["model"]  # linked from data.num_classes


def test_food_config_fast_dev_run(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("apple", "bread", "cheese"):
        d = tmp_path / "food" / "train" / cls
        d.mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    (tmp_path / "food" / "train" / "bread" / "broken.jpg").write_bytes(b"")  # skipped with a warning
    cli = run("fit", "--config", CONFIGS / "food.yaml", *common(tmp_path),
              "--data.init_args.root", tmp_path / "food", "--data.init_args.image_size", 32,
              "--data.init_args.batch_size", 4, "--data.init_args.num_workers", 0,
              "--model.backbone", "test_resnet", "--model.weights", "null", "--trainer.fast_dev_run", "true")
    assert cli.model.num_classes == 3  # linked from the data
    assert cli.model.stage == "finetune"
    assert any(type(cb).__name__ == "LayerwiseUnfreezing" for cb in cli.trainer.callbacks)
    assert "test_acc" in cli.trainer.callback_metrics  # test_after_fit ran
    reports = tmp_path / "reports"  # fast_dev_run has no logger: reports go to default_root_dir
    assert (reports / "confusion_matrix.csv").is_file() and (reports / "test_predictions.png").is_file()


def _fake_cifar(root, n_train=20, n_test=12):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        entry = {"data": (rng.random((n, 3072)) * 255).astype(np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


def test_cifar10_config_extract_stage(tmp_path):
    _fake_cifar(tmp_path / "data")
    args = ["fit", "--config", CONFIGS / "cifar10.yaml", *common(tmp_path),
            "--data.init_args.root", tmp_path / "data", "--data.init_args.image_size", 32,
            "--data.init_args.num_workers", 0, "--data.init_args.batch_size", 16,
            "--model.backbone", "test_resnet", "--model.weights", "null", "--features.cache_dir", tmp_path / "cache",
            "--trainer.max_epochs", 2, "--trainer.limit_test_batches", 1]
    cli = run(*args)
    assert cli.model.stage == "extract"
    assert type(cli.datamodule).__name__ == "FeatureDataModule"  # the head trained on cached features
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 2  # train + val caches
    assert "test_acc" in cli.trainer.callback_metrics  # tested on images with the full model
    cli2 = run(*args)  # second run: features come from the cache
    assert cli2.datamodule.sets["train"].path == cli.datamodule.sets["train"].path


def test_cifar10_config_fast_dev_run_does_not_cache(tmp_path):
    _fake_cifar(tmp_path / "data")
    with pytest.warns(UserWarning, match="without caching"):
        cli = run("fit", "--config", CONFIGS / "cifar10.yaml", *common(tmp_path),
                  "--data.init_args.root", tmp_path / "data", "--data.init_args.image_size", 32,
                  "--data.init_args.num_workers", 0, "--data.init_args.batch_size", 16,
                  "--model.backbone", "test_resnet", "--model.weights", "null",
                  "--features.cache_dir", tmp_path / "cache", "--trainer.fast_dev_run", "true")
    assert len(cli.datamodule.sets["train"]) == 16  # one batch
    assert not list((tmp_path / "cache").rglob("meta.json"))
    assert not list((tmp_path / "cache").rglob("*.shards"))


def test_quickstart_reaches_stated_accuracy_and_writes_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_ZOO_CACHE", str(tmp_path / "zoo"))  # from random init even where weights are cached
    with pytest.warns(UserWarning, match="RANDOM initialisation"):  # offline: says so plainly
        cli = run("fit", "--config", CONFIGS / "quickstart.yaml", *common(tmp_path))
    acc = cli.trainer.callback_metrics["test_acc"].item()
    assert acc >= QUICKSTART_MIN_TEST_ACC, f"held-out accuracy {acc:.3f}"
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    for name in ("curves.png", "history.csv", "confusion_matrix.png", "confusion_matrix.csv", "test_predictions.png"):
        assert (run_dir / "reports" / name).is_file(), name
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "config.yaml").is_file()
    with open(run_dir / "reports" / "confusion_matrix.csv") as f:
        counts = [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]
    assert sum(map(sum, counts)) == 359  # every held-out digit, once

    # The other subcommands on the saved checkpoint.
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    test_cli = run("test", "--config", CONFIGS / "quickstart.yaml", *common(tmp_path), "--ckpt_path", ckpt)
    assert test_cli.trainer.callback_metrics["test_acc"].item() >= QUICKSTART_MIN_TEST_ACC - 0.05
    val_cli = run("validate", "--config", CONFIGS / "quickstart.yaml", *common(tmp_path), "--ckpt_path", ckpt)
    assert "val_acc" in val_cli.trainer.callback_metrics
    pred_cli = run("predict", "--config", CONFIGS / "quickstart.yaml", *common(tmp_path), "--ckpt_path", ckpt,
                   "--data.init_args.predict_split", "test")
    pred_csv = Path(pred_cli.trainer.log_dir) / "reports" / "predictions.csv"
    with open(pred_csv) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "pred", "prob", "top5", "label", "error"] and len(rows) == 1 + 359
    digits = [str(d) for d in range(10)]
    assert all(r[1] in digits and r[4] in digits and not r[5] for r in rows[1:])
    assert sum(r[1] == r[4] for r in rows[1:]) / 359 >= QUICKSTART_MIN_TEST_ACC - 0.05  # the test accuracy again


def _checkpoint_with_weights(tmp_path, backbone, weights, fit=False):
    """A checkpoint of ``backbone`` (random init) whose hyper-parameters say ``weights`` (as after a fit from
    ImageNet weights)."""
    import pytorch_lightning as pl
    import torch

    from lightning_app.data import DigitsDataModule
    from lightning_app.module import TransferModule

    model = TransferModule(backbone, num_classes=10, weights=None, stage="head")
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    if fit:
        trainer.fit(model, DigitsDataModule(image_size=32, batch_size=8, num_workers=0))
    else:
        trainer.strategy.connect(model)
    path = tmp_path / f"{backbone}.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"]["weights"] = weights
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("weights", ["imagenet", "imagenet_if_cached"])
def test_ckpt_path_does_not_resolve_imagenet_weights(weights, tmp_path, monkeypatch):
    """``test --ckpt_path`` of a model fitted from ImageNet weights, offline with an empty weight cache: the
    checkpoint supplies every weight, so nothing is downloaded and nothing warns about random init."""
    import lightning_app.zoo.weights as zw

    ckpt = _checkpoint_with_weights(tmp_path, "ResNet50", weights)
    monkeypatch.setenv("KERAS_ZOO_CACHE", str(tmp_path / "empty_cache"))
    assert not zw.is_cached("ResNet50", include_top=False)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download ImageNet weights")

    monkeypatch.setattr(zw, "download", no_download)
    monkeypatch.setattr(zw, "resolve_imagenet", no_download)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*RANDOM initialisation.*")
        cli = run("test", "--config", CONFIGS / "quickstart.yaml", *common(tmp_path), "--ckpt_path", ckpt,
                  "--model.weights", "imagenet", "--trainer.limit_test_batches", 1,
                  "--data.init_args.batch_size", 4, "--report.grid_size", 0)
    assert cli.model.backbone_name == "ResNet50" and cli.model.weights_used is None
    assert cli.model.hparams["weights"] == weights  # the configured value is kept for the record
    assert "test_acc" in cli.trainer.callback_metrics


def test_fit_resume_from_ckpt_path_ignores_weights(tmp_path):
    """``fit --ckpt_path`` resumes (one more step) even though the checkpoint's ``weights`` cannot be resolved
    (test_resnet has no ImageNet weights: building it with weights='imagenet' would raise)."""
    from lightning_app.cli import checkpoint_supplies_weights

    assert checkpoint_supplies_weights("a.ckpt") and checkpoint_supplies_weights("s3://bucket/a.ckpt")
    assert not any(checkpoint_supplies_weights(p) for p in (None, "", "last", "best", "hpc", "registry:m:v1"))
    ckpt = _checkpoint_with_weights(tmp_path, "test_resnet", "imagenet", fit=True)
    cli = run("fit", "--config", CONFIGS / "quickstart.yaml", *common(tmp_path), "--ckpt_path", ckpt,
              "--trainer.max_steps", 2, "--trainer.limit_val_batches", 1, "--test_after_fit", "false",
              "--data.init_args.batch_size", 8)
    assert cli.model.backbone_name == "test_resnet" and cli.model.weights_used is None
    assert cli.trainer.global_step == 2  # resumed at step 1


def test_precision_chosen_by_device_unless_set(tmp_path, monkeypatch):
    """trainer.precision unset: bf16-mixed on a CUDA GPU with bf16, 32-true elsewhere; resolved when the Trainer is
    built and written into the run's saved config.yaml. A precision the user sets is kept."""
    import torch

    from lightning_app.cli import auto_precision

    assert auto_precision("cpu") == "32-true"
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert auto_precision("auto") == auto_precision("gpu") == auto_precision("cuda") == "bf16-mixed"
        assert auto_precision("cpu") == "32-true"
        m.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        assert auto_precision("auto") == "32-true"
    quick = ["fit", "--config", CONFIGS / "quickstart.yaml", *common(tmp_path), "--trainer.max_epochs", 1,
             "--trainer.limit_train_batches", 1, "--trainer.limit_val_batches", 1, "--test_after_fit", "false"]
    cli = run(*quick)
    assert cli.trainer.precision == "32-true"  # this machine's CPU
    saved = yaml.safe_load(next((tmp_path / "runs").rglob("config.yaml")).read_text())
    assert saved["trainer"]["precision"] == "32-true"
    cli = run(*quick, "--trainer.precision", "bf16-mixed")
    assert cli.trainer.precision == "bf16-mixed"
