"""Robustness runs end to end on tiny models trained for a few steps on 32 px digits: the whole suite through
``trainer.test``, determinism across batch sizes, attacks, the multi-model command and configs/robustness.yaml."""
import csv
import math
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger

from lightning_app.data import DigitsDataModule
from lightning_app.module import TransferModule
from lightning_app.robustness import RobustnessDataModule, RobustnessReport, write_csv
from lightning_app.robustness import runner

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "robustness.yaml")
ATTACKS = [{"name": "fgsm", "eps": "8/255"}, {"name": "pgd", "eps": "8/255", "alpha": "2/255", "steps": 5}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    yield
    torch.set_num_threads(n)


def quiet_trainer(**kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, **kw)


def digits(batch_size=8) -> DigitsDataModule:
    return DigitsDataModule(image_size=32, batch_size=batch_size, num_workers=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny models trained on digits (a few dozen steps), saved as fit checkpoints."""
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for label, steps in (("strong", 60), ("weak", 20)):
        pl.seed_everything(0 if label == "strong" else 1, verbose=False)
        model = TransferModule("test_resnet", num_classes=10, weights=None, stage="finetune", lr=3e-3)
        trainer = quiet_trainer(max_steps=steps, limit_val_batches=0)
        trainer.fit(model, DigitsDataModule(image_size=32, batch_size=32, num_workers=0))
        paths[label] = str(out / f"{label}.ckpt")
        trainer.save_checkpoint(paths[label])
    return paths


class Collect(pl.Callback):
    """Perturbed images and predictions per (dataloader, dataset index)."""

    def __init__(self):
        self.images, self.preds = {}, {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for img, pred, i in zip(batch[0], outputs["preds"], batch[2].tolist()):
            self.images[dataloader_idx, i] = img.detach().clone()
            self.preds[dataloader_idx, i] = int(pred)


def run_suite(ckpt, tmp_path, batch_size=8, collect=None, **dm_kwargs):
    model = TransferModule.load_from_checkpoint(ckpt, weights=None)
    dm = RobustnessDataModule(digits(batch_size), **dm_kwargs)
    report = RobustnessReport(warn_untrained=False)
    logger = CSVLogger(str(tmp_path), name="rb", version=0)
    trainer = quiet_trainer(logger=logger, inference_mode=False, callbacks=[report] + ([collect] if collect else []))
    trainer.test(model, datamodule=dm, verbose=False)
    return report, Path(logger.log_dir)


@pytest.fixture(scope="module")
def full_run(checkpoints, tmp_path_factory):
    """All 19 corruptions at severities 1 and 5, FGSM and PGD, 16 images per loader."""
    return run_suite(checkpoints["strong"], tmp_path_factory.mktemp("full"), corruptions="all", severities=[1, 5],
                     attacks=ATTACKS, table="cifar10", limit_per_loader=16)


def test_whole_suite_writes_table_and_chart(full_run):
    report, log_dir = full_run
    rows = report.results
    assert len(rows) == 1 + 19 * 2 + 2 and rows[0].perturbation == "clean"
    assert rows[0].top1 >= 0.75, "the tiny model should have learned the digits"
    assert all(r.n == 16 and 0 <= r.top1 <= 1 and r.top1 <= r.top5 <= 1 for r in rows)
    reports = log_dir / "reports"
    for name in ("robustness.csv", "robustness.md", "robustness.png"):
        assert (reports / name).stat().st_size > 200, name
    assert (reports / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(reports / "robustness.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    from lightning_app.perturb.photos import frost_photo_dir

    photos = frost_photo_dir() is not None  # frost is exact with the reference's photographs
    assert {r["exact"] for r in table if r["perturbation"] == "snow"} == {"false"}
    assert {r["exact"] for r in table if r["perturbation"] == "frost"} == {"true" if photos else "false"}
    md = (reports / "robustness.md").read_text()
    assert "| snow ≈ | 5 |" in md and "| contrast | 5 |" in md and "| spatter | 5 |" in md
    assert ("| frost | 1 |" if photos else "| frost ≈ | 1 |") in md


def test_single_run_scores_against_a_baseline_csv(full_run, tmp_path):
    report, log_dir = full_run
    base = str(log_dir / "reports" / "robustness.csv")
    md = RobustnessReport(baseline=base).write(tmp_path / "all", report.results)[1].read_text()
    assert "- mCE vs test_resnet: n/a (the baseline makes no errors on some corruption)" in md  # 16 images only
    hard = {r.perturbation for r in report.results if r.kind == "corruption" and r.error > 0}
    rows = [r for r in report.results if r.kind != "corruption" or r.perturbation in hard]
    write_csv(rows, tmp_path / "base.csv")
    md = RobustnessReport(baseline=str(tmp_path / "base.csv")).write(tmp_path / "hard", rows)[1].read_text()
    assert "- mCE vs test_resnet: 100.00%" in md and "- relative mCE vs test_resnet: 100.00%" in md


def test_named_metrics_per_dataloader(full_run):
    report, log_dir = full_run
    for key in ("clean", "gaussian_noise_s1", "jpeg_compression_s5", "snow_s5", "fgsm", "pgd"):
        assert f"robustness/{key}/top1" in report.metrics and f"robustness/{key}/top5" in report.metrics
    with open(log_dir / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    values = {k: float(v) for row in logged for k, v in row.items() if v not in ("", None)}
    assert values["robustness/contrast_s5/top1"] == pytest.approx(next(
        r.top1 for r in report.results if r.perturbation == "contrast" and r.severity == 5))
    assert "test_acc/dataloader_idx_38" in values


def test_attacks_lower_accuracy(full_run):
    res = {r.perturbation: r.top1 for r in full_run[0].results if r.kind != "corruption"}
    assert res["fgsm"] <= res["clean"] - 0.3
    assert res["pgd"] <= res["fgsm"]
    worst = min(r.top1 for r in full_run[0].results if r.kind == "corruption")
    assert worst < res["clean"]


def test_results_do_not_depend_on_batch_size(checkpoints, tmp_path):
    kw = dict(corruptions=["gaussian_noise", "glass_blur", "impulse_noise"], severities=[3], table="cifar10",
              attacks=[{"name": "pgd", "eps": "4/255", "alpha": "1/255", "steps": 3}], limit_per_loader=8)
    c1, c4 = Collect(), Collect()
    one, _ = run_suite(checkpoints["weak"], tmp_path / "bs1", batch_size=1, collect=c1, **kw)
    four, _ = run_suite(checkpoints["weak"], tmp_path / "bs4", batch_size=4, collect=c4, **kw)
    assert c1.images.keys() == c4.images.keys() and len(c1.images) == 5 * 8
    for key, img in c1.images.items():  # the same perturbed image for each sample, whatever its batch
        assert torch.allclose(img, c4.images[key], atol=1e-6, rtol=0), key
    assert c1.preds == c4.preds
    assert [(r.perturbation, r.severity) for r in one.results] == [(r.perturbation, r.severity) for r in four.results]
    assert [r.top1 for r in one.results] == [r.top1 for r in four.results]
    assert [r.top5 for r in one.results] == [r.top5 for r in four.results]
    assert len({r.top1 for r in one.results}) > 1, "perturbations should change something"


TINY = ["--data.init_args.limit_per_loader", "12", "--data.init_args.severities", "[4, 5]",
        "--data.init_args.corruptions", "[contrast, impulse_noise]", "--data.init_args.table", "imagenet",
        "--data.init_args.attacks", '[{"name": "fgsm", "eps": "8/255"}]',
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def test_multi_model_command_writes_one_comparison(checkpoints, tmp_path):
    out = tmp_path / "cmp"
    tables = runner.main(["--config", CONFIG, "--models", f"strong={checkpoints['strong']}",
                          f"weak={checkpoints['weak']}", "--baseline", "weak", "--out", str(out), *TINY])
    assert list(tables) == ["strong", "weak"]
    for name in ("comparison.csv", "comparison.md", "comparison.png", "results.csv",
                 "strong/reports/robustness.csv", "weak/reports/robustness.png"):
        assert (out / name).is_file(), name
    with open(out / "comparison.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"strong", "weak"}
    assert float(rows["weak"]["mCE"]) == pytest.approx(1.0)
    assert float(rows["weak"]["CE_contrast"]) == pytest.approx(1.0)
    assert not math.isnan(float(rows["strong"]["mCE"]))
    assert float(rows["strong"]["clean_top1"]) > float(rows["strong"]["fgsm_top1"])
    with open(out / "results.csv") as f:
        assert {r["model"] for r in csv.DictReader(f)} == {"strong", "weak"}
    assert "CE and mCE relative to weak" in (out / "comparison.md").read_text()
    with pytest.raises(SystemExit, match="neither one of the models"):
        runner.main(["--config", CONFIG, "--models", checkpoints["strong"], "--baseline", "nope", "--out", str(out)])


def test_config_prints_and_runs_with_tiny_overrides(checkpoints, tmp_path, capsys, monkeypatch):
    from lightning_app.cli import TransferCLI

    monkeypatch.setattr(sys, "argv", ["lightning_app"])
    with pytest.raises(SystemExit) as done:
        TransferCLI(args=["test", "--config", CONFIG, "--print_config"])
    assert done.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["inference_mode"] is False
    assert cfg["data"]["class_path"] == "lightning_app.robustness.RobustnessDataModule"
    assert cfg["data"]["init_args"]["corruptions"] is None and len(cfg["data"]["init_args"]["attacks"]) == 2

    cli = TransferCLI(args=["test", "--config", CONFIG, "--ckpt_path", checkpoints["strong"], *TINY,
                            "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.model.backbone_name == "test_resnet"  # model settings come from the checkpoint
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RobustnessReport))
    assert [r.perturbation for r in report.results] == ["clean", "contrast", "contrast", "impulse_noise",
                                                        "impulse_noise", "fgsm"]
    assert report.results[0].top1 >= 0.75
    assert (Path(cli.trainer.log_dir) / "reports" / "robustness.md").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_counts_every_image_once_and_matches_one_process(checkpoints, tmp_path):
    """Two CPU ranks (gloo) through the CLI: no deadlock in the report, no padding repeats in the accuracies."""
    import os
    import signal
    import subprocess

    from lightning_app.cli import TransferCLI

    args = ["--config", CONFIG, "--ckpt_path", checkpoints["strong"], *TINY,
            "--data.init_args.limit_per_loader", "15", "--data.init_args.datamodule.init_args.batch_size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "lightning_app", "test", *args, "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.logger.init_args.save_dir", str(tmp_path / "ddp")]
    proc = subprocess.Popen(cmd, env=env, cwd=str(Path(CONFIG).parents[1]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's rank-1 child is in the same session
        log, _ = proc.communicate()
        pytest.fail(f"DDP robustness test hung:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    ddp = {(r["perturbation"], r["severity"]): r for r in
           csv.DictReader(open(next((tmp_path / "ddp").rglob("robustness.csv"))))}

    monkey_argv, sys.argv = sys.argv, ["lightning_app"]
    try:
        cli = TransferCLI(args=["test", *args, "--trainer.logger.init_args.save_dir", str(tmp_path / "one")])
    finally:
        sys.argv = monkey_argv
    one = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RobustnessReport)).results
    assert len(ddp) == len(one) == 6
    for r in one:
        d = ddp[(r.perturbation, str(r.severity))]
        assert int(d["n"]) == 15
        if r.kind != "attack":  # attacks: gradients differ in the last bits with the batch composition
            assert float(d["top1"]) == pytest.approx(r.top1, abs=1e-6), r.perturbation
            assert float(d["top5"]) == pytest.approx(r.top5, abs=1e-6), r.perturbation
