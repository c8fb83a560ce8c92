"""``python -m lightning_app.compare``: two tiny backbones on the bundled digits, end to end.

* the report (CSV, Markdown, PNG, self-contained HTML) is written and its table holds exactly the values of each
  backbone's own run files, and of a separate ``python -m lightning_app fit`` of the same backbone;
* finished backbones are not trained again, an interrupted one resumes from ``last.ckpt``, other settings for the
  same ``--out`` are refused;
* under DDP (2 CPU processes, gloo) Lightning re-executes the command and each backbone trains on both ranks.
"""
import base64
import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml

from lightning_app.compare import runner
from lightning_app.compare.report import read_history, read_test_metrics, table_row
from lightning_app.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ["test_resnet", "test_efficientnet"]
#: tiny schedule: 2 epochs of 4 batches, unfreezing the top layer group at epoch 1
OVERRIDES = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
             "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "32"]


class InterruptOnce(pl.Callback):
    """Stops the run like Ctrl+C at the start of epoch ``epoch`` while ``flag`` exists (and removes ``flag``)."""

    def __init__(self, flag: str, epoch: int = 1) -> None:
        self.flag, self.epoch = Path(flag), epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and self.flag.exists():
            self.flag.unlink()
            raise KeyboardInterrupt


def study_config(tmp_path, extra_callbacks=()):
    """The quickstart config plus layer-wise unfreezing (finetune stage), as a file of its own."""
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning_app.finetune.LayerwiseUnfreezing", "init_args": {"schedule": {1: 1}}},
        *extra_callbacks,
    ]
    cfg["model"]["scheduler"] = None
    cfg["data"]["init_args"]["num_workers"] = 0
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_module(args, timeout=300, env=None):
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env or subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{out[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # DDP children are in the same session
        except ProcessLookupError:
            pass
    return proc.returncode, out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    config = study_config(tmp)
    out = tmp / "out"
    argv = ["--config", str(config), "--backbones", *BACKBONES, "--out", str(out), *OVERRIDES]
    summaries = runner.main(argv)
    return {"argv": argv, "out": out, "config": config, "summaries": summaries, "tmp": tmp}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files(study):
    out = study["out"]
    for name in ("compare.csv", "compare.md", "compare.html", "per_class.csv", "compare_table.png", "curves.png",
                 "confusion_matrices.png", "per_class.png"):
        assert (out / name).stat().st_size > 100, name
    rows = read_rows(out / "compare.csv")
    assert [r["backbone"] for r in rows] == BACKBONES
    assert all(r["image_size"] == "32x32" and int(r["epochs"]) == 2 for r in rows)
    md = (out / "compare.md").read_text()
    assert "| test_resnet | 32x32 |" in md and "![curves](curves.png)" in md
    assert "unfrozen at the start of epoch 1 (+1)" in md
    page = (out / "compare.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "<td>test_efficientnet</td>" in page and "src=\"curves.png\"" not in page  # self-contained
    per_class = read_rows(out / "per_class.csv")
    assert [r["class"] for r in per_class] == [str(d) for d in range(10)]


def test_table_values_are_the_runs_own_metrics(study):
    """Every number of the table comes from the backbone's own run files (history.csv, metrics.csv, confusion
    matrix): the best epoch is the one ModelCheckpoint kept (max val_acc) and the one that was tested."""
    out = study["out"]
    rows = {r["backbone"]: r for r in read_rows(out / "compare.csv")}
    for name in BACKBONES:
        run = out / name
        history = read_history(run / "reports" / "history.csv")
        test = read_test_metrics(run / "metrics.csv")
        best = max(history, key=lambda h: h["val_acc"])
        row = rows[name]
        assert int(row["best_epoch"]) == int(best["epoch"])
        for key in ("train_acc", "val_acc", "train_loss", "val_loss"):
            assert float(row[key]) == pytest.approx(best[key], abs=1e-6), key
        assert float(row["test_acc"]) == pytest.approx(test["test_acc"], abs=1e-6)
        assert float(row["test_loss"]) == pytest.approx(test["test_loss"], abs=1e-6)
        assert float(row["train_test_gap"]) == pytest.approx(best["train_acc"] - test["test_acc"], abs=1e-6)
        assert float(row["fit_time_s"]) == pytest.approx(sum(h["epoch_time_s"] for h in history), abs=1e-6)  # CSV keeps 6 decimals
        assert float(row["images_per_s"]) > 0
        ckpt = Path(study["summaries"][name]["best_checkpoint"])
        assert ckpt.is_file() and f"epoch{int(best['epoch']):03d}" in ckpt.name
        # per-class accuracy from the confusion matrix of that test
        cm = [[int(v) for v in r[1:]] for r in list(csv.reader(open(run / "reports" / "confusion_matrix.csv")))[1:]]
        correct = sum(cm[i][i] for i in range(10))
        assert correct / sum(map(sum, cm)) == pytest.approx(test["test_acc"], abs=1e-6)
        assert [h["unfrozen_groups"] for h in history] == [0, 1]
    assert rows["test_resnet"]["params"] != rows["test_efficientnet"]["params"]


def test_table_matches_a_separate_fit_of_the_same_backbone(study, tmp_path):
    """Same config, seed and schedule: `python -m lightning_app fit` of one backbone gives the compare row's numbers."""
    from lightning_app.cli import TransferCLI

    TransferCLI(args=["fit", "--config", str(study["config"]), *OVERRIDES, "--model.backbone", "test_efficientnet",
                      "--trainer.logger.init_args.save_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck")])
    run = next(tmp_path.rglob("history.csv")).parent.parent
    history = read_history(run / "reports" / "history.csv")
    test = read_test_metrics(run / "metrics.csv")
    row = table_row(study["summaries"]["test_efficientnet"])
    best = max(history, key=lambda h: h["val_acc"])
    assert row["best_epoch"] == int(best["epoch"])
    for key in ("train_acc", "val_acc", "train_loss", "val_loss"):
        assert row[key] == pytest.approx(best[key], abs=1e-6), key
    assert row["test_acc"] == pytest.approx(test["test_acc"], abs=1e-6)
    assert row["test_loss"] == pytest.approx(test["test_loss"], abs=1e-6)


def test_finished_backbones_are_not_trained_again(study, monkeypatch):
    out = study["out"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.ckpt")}
    summary = (out / "test_resnet" / "summary.json").read_text()
    (out / "compare.csv").unlink()
    monkeypatch.setattr(runner, "train_one", lambda *a, **k: pytest.fail("a finished backbone was trained again"))
    again = runner.main(study["argv"])
    assert set(again) == set(BACKBONES)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.ckpt")} == stamps  # no checkpoint written
    assert (out / "test_resnet" / "summary.json").read_text() == summary
    assert [r["backbone"] for r in read_rows(out / "compare.csv")] == BACKBONES  # the report is written again


def test_other_settings_for_the_same_out_are_refused(study):
    argv = [a if a != "2" else "3" for a in study["argv"]]  # max_epochs 3
    with pytest.raises(ConfigError, match="holds a run with other settings.*--trainer.max_epochs"):
        runner.main(argv)


def test_backbone_sizes_and_names():
    assert runner.parse_backbone("InceptionV3").image_size == 299
    assert runner.parse_backbone("VGG16").image_size == 224
    assert runner.parse_backbone("VGG16", native=False).image_size is None
    assert runner.parse_backbone("Xception@160") == runner.BackboneSpec("Xception", 160, "Xception@160")
    assert runner.parse_backbone("test_resnet").image_size is None  # not a zoo model: the config's size
    with pytest.raises(ConfigError, match="must be an integer"):
        runner.parse_backbone("VGG16@big")
    with pytest.raises(ConfigError, match="twice"):
        runner.main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--backbones", "a", "a"])
    args = runner.fit_args(["c.yaml"], ["--trainer.max_epochs", "1"], runner.parse_backbone("ResNet50"), Path("o/ResNet50"))
    assert args[:5] == ["fit", "--config", "c.yaml", "--trainer.max_epochs", "1"]
    assert args[args.index("--data.init_args.image_size") + 1] == "224" and "--test_after_fit" in args


def test_interrupted_backbone_resumes_from_last_checkpoint(tmp_path):
    flag = tmp_path / "interrupt"
    flag.touch()
    config = study_config(tmp_path, [{"class_path": "tests.test_compare.InterruptOnce", "init_args": {"flag": str(flag)}}])
    out = tmp_path / "out"
    args = ["lightning_app.compare", "--config", str(config), "--backbones", "test_resnet", "--out", str(out), *OVERRIDES]
    rc, log = run_module(args)
    assert rc != 0 and not flag.exists(), log[-3000:]
    assert (out / "test_resnet" / "checkpoints" / "last.ckpt").is_file() and not (out / "test_resnet" / "summary.json").exists()
    rc, log = run_module(args)
    assert rc == 0, log[-4000:]
    assert "resuming test_resnet" in log and "Restoring states from the checkpoint path" in log
    history = read_history(out / "test_resnet" / "reports" / "history.csv")
    assert [int(h["epoch"]) for h in history] == [0, 1]  # epoch 0 from the first session, kept in the checkpoint
    assert (out / "test_resnet" / "metrics.before_resume1.csv").is_file()  # the first session's metrics kept
    assert json.loads((out / "test_resnet" / "summary.json").read_text())["best_epoch"] in (0, 1)
    assert (out / "compare.html").is_file()


def test_ddp_each_backbone_on_both_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = study_config(tmp_path)
    out = tmp_path / "out"
    env = dict(subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rc, log = run_module(["lightning_app.compare", "--config", str(config), "--backbones", *BACKBONES, "--out", str(out),
                          *OVERRIDES, "--trainer.max_epochs", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                          "--trainer.accelerator", "cpu"], timeout=400, env=env)
    assert rc == 0, log[-6000:]
    assert log.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 1  # rank 1 started once, reused
    rows = read_rows(out / "compare.csv")
    assert [r["backbone"] for r in rows] == BACKBONES
    for name in BACKBONES:
        cm = [[int(v) for v in r[1:]] for r in list(csv.reader(open(out / name / "reports" / "confusion_matrix.csv")))[1:]]
        assert sum(map(sum, cm)) == 359  # the whole test split, every image once (both ranks gathered)
        # 4 batches of 32 per rank and epoch: both ranks trained
        assert float(read_history(out / name / "reports" / "history.csv")[0]["train_images_per_s"]) > 0
