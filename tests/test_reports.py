"""Reports: confusion matrix numbers and files, curves, prediction grid, the callback end to end."""
import csv
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_app.data import ArrayDataModule
from lightning_app.module import TransferModule
from lightning_app.reports import (
    PredictionCSVWriter,
    TrainingReport,
    confusion_matrix,
    plot_curves,
    plot_prediction_grid,
    write_confusion_matrix,
)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_confusion_matrix_counts_and_files(tmp_path):
    cm = confusion_matrix(np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 2, 2, 0]), 3)
    np.testing.assert_array_equal(cm, [[1, 0, 1], [0, 1, 0], [0, 1, 2]])  # rows true, cols predicted
    c, p = write_confusion_matrix(cm, ["cat", "dog", "eel"], tmp_path / "cm.csv", tmp_path / "cm.png")
    rows = read_csv(c)
    assert rows[0] == ["true \\ predicted", "cat", "dog", "eel"]
    assert rows[3] == ["eel", "0", "1", "2"]
    assert p.read_bytes().startswith(PNG)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_curves_and_grid(tmp_path):
    hist = [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.2, "train_acc": 0.5, "val_acc": 0.4},
            {"epoch": 1, "train_loss": 0.5, "val_loss": 0.8, "train_acc": 0.8}]
    assert plot_curves(hist, tmp_path / "c.png").read_bytes().startswith(PNG)
    g = plot_prediction_grid(torch.rand(5, 3, 8, 8), [0, 1, 1, 0, 1], [0, 1, 0, 0, 1], ["a", "b"], tmp_path / "g.png")
    assert g.read_bytes().startswith(PNG)


def test_training_report_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    images = (rng.random((40, 8, 8, 3)) * 60 + labels[:, None, None, None] * 50).astype(np.uint8)
    dm = ArrayDataModule(images, labels, ["w", "x", "y", "z"], image_size=32, batch_size=8, val_split=0.2,
                         test_split=0.25, num_workers=0)
    model = TransferModule("test_resnet", 4, weights=None, stage="finetune", lr=1e-2)
    report = TrainingReport(grid_size=6)
    logger = CSVLogger(tmp_path, name="run")
    t = pl.Trainer(accelerator="cpu", max_epochs=2, logger=logger, callbacks=[report], enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False)
    t.fit(model, dm)
    t.test(model, dm, verbose=False)
    out = tmp_path / "run" / "version_0" / "reports"
    hist = read_csv(out / "history.csv")
    header = hist[0]
    assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"} <= set(header)
    assert [r[0] for r in hist[1:]] == ["0", "1"]
    assert all(r[header.index("train_acc")] and r[header.index("val_acc")] for r in hist[1:])
    for name in ("curves.png", "confusion_matrix.png", "test_predictions.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    cm = read_csv(out / "confusion_matrix.csv")
    assert cm[0][1:] == ["w", "x", "y", "z"]
    counts = np.array([[int(v) for v in r[1:]] for r in cm[1:]])
    assert counts.sum() == len(dm.dataset("test")) == 8
    np.testing.assert_array_equal(counts.sum(axis=1), np.bincount(dm.dataset("test").labels, minlength=4))
    acc = np.trace(counts) / counts.sum()
    assert abs(acc - t.callback_metrics["test_acc"].item()) < 1e-6
    metrics = read_csv(tmp_path / "run" / "version_0" / "metrics.csv")  # the CSVLogger's metrics file
    assert "val_acc" in metrics[0] and "train_loss" in metrics[0]
    # wall time and throughput per epoch: 24 training images per epoch (40 - 8 test - 8 val)
    for r in hist[1:]:
        assert float(r[header.index("epoch_time_s")]) > 0 and float(r[header.index("train_images_per_s")]) > 0
    assert len(dm.dataset("train")) == 24
    assert "unfrozen_groups" not in header  # no LayerwiseUnfreezing callback


def test_history_records_unfreezing_and_curves_mark_it(tmp_path):
    from lightning_app.finetune import LayerwiseUnfreezing
    from lightning_app.reports import unfreeze_epochs

    rng = np.random.default_rng(1)
    dm = ArrayDataModule((rng.random((24, 8, 8, 3)) * 255).astype(np.uint8), np.arange(24) % 2, ["a", "b"],
                         image_size=32, batch_size=8, val_split=0.25, test_split=0.0, num_workers=0)
    model = TransferModule("test_resnet", 2, weights=None, stage="finetune", lr=1e-2)
    report = TrainingReport(grid_size=0)
    t = pl.Trainer(accelerator="cpu", max_epochs=4, logger=CSVLogger(tmp_path, name="run"), enable_checkpointing=False,
                   callbacks=[LayerwiseUnfreezing({1: 1, 3: 2}), report], enable_progress_bar=False,
                   enable_model_summary=False)
    t.fit(model, dm)
    hist = read_csv(tmp_path / "run" / "version_0" / "reports" / "history.csv")
    col = hist[0].index("unfrozen_groups")
    assert [int(float(r[col])) for r in hist[1:]] == [0, 1, 1, 3]
    assert unfreeze_epochs(report.history) == [(1, 1), (3, 2)]
    assert unfreeze_epochs([{"epoch": 0}, {"epoch": 1}]) == []  # no unfreezing column: nothing to mark


def test_curve_axes_have_integer_epochs_and_unfreeze_lines(tmp_path, monkeypatch):
    from lightning_app import reports

    seen = {}
    real = reports.save_figure

    def spy(fig, path, **kw):
        seen["axes"] = fig.axes
        return real(fig, path, **kw)

    monkeypatch.setattr(reports, "save_figure", spy)
    hist = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.1 / (e + 1), "train_acc": e / 10, "val_acc": e / 11,
             "unfrozen_groups": [0, 0, 1, 1, 3, 3, 3, 3, 3, 3, 3][e]} for e in range(11)]
    plot_curves(hist, tmp_path / "c.png")
    for ax in seen["axes"]:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        lines = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert lines == [1.5, 3.5]  # between the last frozen epoch and the first unfrozen one
        assert [t.get_text() for t in ax.texts] == ["+1 group", "+2 groups"]


def test_report_drops_distributed_padding_repeats(tmp_path):
    """Duplicated dataset indices (DistributedSampler padding) are counted once."""
    report = TrainingReport(grid_size=0)

    class T:
        world_size, is_global_zero, log_dir, default_root_dir, datamodule = 1, True, str(tmp_path), str(tmp_path), None

    class M:
        num_classes = 2

    report.on_test_epoch_start(T, M)
    batch = (torch.zeros(3, 5), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    out = {"preds": torch.tensor([0, 1, 0]), "target": torch.tensor([0, 1, 0]), "index": torch.tensor([0, 1, 0])}
    report.on_test_batch_end(T, M, out, batch, 0)
    report.on_test_epoch_end(T, M)
    counts = np.array([[int(v) for v in r[1:]] for r in read_csv(tmp_path / "reports" / "confusion_matrix.csv")[1:]])
    assert counts.sum() == 2


def test_report_batches_stay_on_their_device_until_the_epoch_end(tmp_path, monkeypatch):
    """A copy to the host at every test batch would wait for the device there (on a GPU: the loop stalls each
    batch); the report keeps the batch outputs (and the grid's images) where they are and copies at the end."""
    report = TrainingReport(grid_size=4)

    class T:
        world_size, is_global_zero, log_dir, default_root_dir, datamodule = 1, True, str(tmp_path), str(tmp_path), None

    class M:
        num_classes = 2

    copies = []
    for name in ("cpu", "numpy", "tolist", "item"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, real=real, name=name, **k: (copies.append(name),
                                                                                             real(self, *a, **k))[1])
    report.on_test_epoch_start(T, M)
    for i in range(3):
        batch = (torch.rand(3, 3, 4, 4), torch.tensor([0, 1, 1]), torch.arange(3) + 3 * i)
        out = {"preds": torch.tensor([0, 1, 0]), "target": batch[1], "index": batch[2]}
        report.on_test_batch_end(T, M, out, batch, i)
    assert copies == []
    report.on_test_epoch_end(T, M)
    assert copies  # at the end, once
    counts = np.array([[int(v) for v in r[1:]] for r in read_csv(tmp_path / "reports" / "confusion_matrix.csv")[1:]])
    assert counts.tolist() == [[3, 0], [3, 3]]


def test_prediction_csv_writer(tmp_path):
    rng = np.random.default_rng(0)
    dm = ArrayDataModule((rng.random((12, 8, 8, 3)) * 255).astype(np.uint8), np.arange(12) % 3, ["a", "b", "c"],
                         image_size=32, batch_size=5, val_split=0.0, test_split=0.0, num_workers=0, predict_split="train")
    model = TransferModule("test_resnet", 3, weights=None)
    path = tmp_path / "pred.csv"
    t = pl.Trainer(accelerator="cpu", logger=False, callbacks=[PredictionCSVWriter(str(path))],
                   enable_progress_bar=False, enable_model_summary=False)
    t.predict(model, datamodule=dm, return_predictions=False)
    rows = read_csv(path)
    assert rows[0] == ["path", "pred", "prob", "top5", "label", "error"]
    assert [r[0] for r in rows[1:]] == [f"array[{i}]" for i in dm.dataset("train").ids]  # dataset order
    assert all(r[1] in "abc" and 0 < float(r[2]) <= 1 and len(r[3].split(";")) == 3 for r in rows[1:])
    assert [r[4] for r in rows[1:]] == ["abc"[y] for y in dm.dataset("train").labels]


def _two_loader_test(tmp_path, **report_kwargs):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    loaders = [DataLoader(TensorDataset(torch.rand(6, 3, 16, 16, generator=g), torch.arange(6) % 3), batch_size=4)
               for _ in range(2)]
    model = TransferModule("test_resnet", 3, weights=None)
    report = TrainingReport(grid_size=4, **report_kwargs)
    t = pl.Trainer(accelerator="cpu", logger=False, callbacks=[report], enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    t.test(model, dataloaders=loaders, verbose=False)
    return sorted(p.name for p in (tmp_path / "reports").iterdir())


def test_report_writes_loader_0_only_by_default(tmp_path):
    """Several test dataloaders (a robustness run has ~80): confusion matrix and grid of loader 0 only."""
    assert _two_loader_test(tmp_path / "default") == ["confusion_matrix_dl0.csv", "confusion_matrix_dl0.png",
                                                      "test_predictions_dl0.png"]
    assert _two_loader_test(tmp_path / "all", per_dataloader=True) == sorted(
        f"{stem}_dl{i}.{ext}" for i in (0, 1) for stem, ext in (("confusion_matrix", "csv"), ("confusion_matrix", "png"),
                                                                ("test_predictions", "png")))


def test_curves_redraw_is_throttled_and_the_last_epoch_always_drawn(tmp_path, monkeypatch):
    """``curves_every_s``: the first epoch is drawn, then at most one redraw per interval, and the end of training
    always draws what is not drawn yet (here an early stop at epoch 2 of 5, so no "last epoch" redraw)."""
    import lightning_app.reports as reports

    drawn = []
    real = reports.plot_curves
    monkeypatch.setattr(reports, "plot_curves", lambda hist, path: drawn.append(len(hist)) or real(hist, path))

    class StopAfter3(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch >= 2

    rng = np.random.default_rng(0)
    labels = np.arange(24) % 3
    dm = ArrayDataModule((rng.random((24, 8, 8, 3)) * 255).astype(np.uint8), labels, ["a", "b", "c"],
                         image_size=32, batch_size=8, val_split=0.25, test_split=0.0, num_workers=0)
    model = TransferModule("test_resnet", 3, weights=None, stage="finetune", lr=1e-2)
    t = pl.Trainer(accelerator="cpu", max_epochs=5, logger=CSVLogger(tmp_path, name="run"),
                   callbacks=[TrainingReport(grid_size=0, curves_every_s=1e9), StopAfter3()],
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    t.fit(model, dm)
    assert drawn == [1, 3]  # epoch 0, then the end of training with all 3 epochs
    assert (tmp_path / "run" / "version_0" / "reports" / "curves.png").read_bytes().startswith(PNG)
