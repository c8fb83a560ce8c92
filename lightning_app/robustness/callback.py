"""``RobustnessReport``: at the end of a robustness ``trainer.test``, name the per-dataloader metrics and write
the results table (CSV, Markdown) and the accuracy-against-severity chart."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_app.atomic import atomic_write
from lightning_app.reports import report_dir
from lightning_app.robustness.plots import plot_accuracy_vs_severity
from lightning_app.robustness.results import Result, Table, read_csv, summary, summary_markdown, to_markdown, write_csv
from lightning_app.robustness.specs import Perturbation

#: prefix of the named per-perturbation metrics sent to the loggers: ``robustness/<key>/top1``
METRIC_PREFIX = "robustness"


def metric_name(p: Perturbation, metric: str) -> str:
    """``robustness/gaussian_noise_s3/top1``."""
    return f"{METRIC_PREFIX}/{p.key}/{metric}"


def results_from_metrics(
    perturbations: Sequence[Perturbation],
    metrics: Mapping[str, Any],
    n: int = 0,
    model: str = "",
    top1_metric: str = "test_acc",
    top5_metric: str = "test_top5",
) -> Table:
    """One :class:`Result` per test dataloader from the logged epoch metrics (``test_acc/dataloader_idx_k``;
    Lightning adds no suffix when there is a single dataloader)."""
    rows: Table = []
    many = len(perturbations) > 1
    for k, p in enumerate(perturbations):
        suffix = f"/dataloader_idx_{k}" if many else ""
        if f"{top1_metric}{suffix}" not in metrics:
            logged = sorted(m for m in metrics if not m.startswith(METRIC_PREFIX))[:8]
            raise RuntimeError(
                f"the LightningModule did not log {top1_metric + suffix!r} for test dataloader {k} ({p.key}); "
                f"logged: {logged}. RobustnessReport(top1_metric=...) names the top-1 accuracy metric."
            )
        top5 = metrics.get(f"{top5_metric}{suffix}")
        rows.append(Result(
            perturbation=p.key if p.kind == "attack" else p.name, kind=p.kind, severity=p.severity,
            top1=float(metrics[f"{top1_metric}{suffix}"]), top5=None if top5 is None else float(top5), n=n,
            exact=p.exact, params=p.describe_params(), model=model,
        ))
    return rows


def named_metrics(perturbations: Sequence[Perturbation], rows: Sequence[Result]) -> Dict[str, float]:
    """``{"robustness/<key>/top1": ..., "robustness/<key>/top5": ...}``."""
    out: Dict[str, float] = {}
    for p, r in zip(perturbations, rows):
        out[metric_name(p, "top1")] = r.top1
        if r.top5 is not None:
            out[metric_name(p, "top5")] = r.top5
    return out


def _model_name(pl_module: pl.LightningModule) -> str:
    hp = getattr(pl_module, "hparams", {}) or {}
    return str(hp.get("backbone") or type(pl_module).__name__)


class RobustnessReport(Callback):
    """Writes ``<log_dir>/<dirname>/robustness.{csv,md,png}`` after ``trainer.test`` on a
    :class:`~lightning_app.robustness.RobustnessDataModule` and logs ``robustness/<key>/top1|top5``.

    Args:
        dirname: sub-directory of the log directory (the one :class:`~lightning_app.reports.TrainingReport` uses).
        baseline: a ``robustness.csv`` of a baseline model (same suite) for CE / mCE / relative mCE.
        baseline_model: the model to take from ``baseline`` when it holds several (a comparison ``results.csv``).
        model_name: label of the model in the table (default: the module's ``backbone`` hyper-parameter).
        top1_metric, top5_metric: names the LightningModule logs its test accuracies under.
        warn_untrained: warn when testing weights that come neither from ``--ckpt_path`` nor from training.
    """

    def __init__(
        self,
        dirname: str = "reports",
        baseline: Optional[str] = None,
        baseline_model: Optional[str] = None,
        model_name: Optional[str] = None,
        top1_metric: str = "test_acc",
        top5_metric: str = "test_top5",
        warn_untrained: bool = True,
    ) -> None:
        super().__init__()
        self.dirname = dirname
        self.baseline = baseline
        self.baseline_model = baseline_model
        self.model_name = model_name
        self.top1_metric = top1_metric
        self.top5_metric = top5_metric
        self.warn_untrained = warn_untrained
        self.results: Table = []
        self.metrics: Dict[str, float] = {}
        self.written: List[Path] = []

    @staticmethod
    def _robustness_dm(trainer: "pl.Trainer") -> Optional[Any]:
        from lightning_app.robustness.datamodule import RobustnessDataModule

        dm = getattr(trainer, "datamodule", None)
        return dm if isinstance(dm, RobustnessDataModule) else None

    def on_test_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        dm = self._robustness_dm(trainer)
        if dm is None:
            return
        rank_zero_info(f"robustness: {dm.describe()}, {len(dm.test_dataset())} images each")
        if self.warn_untrained and trainer.ckpt_path is None and trainer.global_step == 0:
            rank_zero_warn(
                "robustness test without a checkpoint: the weights were neither loaded with --ckpt_path nor trained "
                "in this run, so a fresh head gives chance-level accuracy. Pass --ckpt_path <your fit checkpoint>."
            )

    def on_test_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        dm = self._robustness_dm(trainer)
        if dm is None:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, (torch.Tensor, float, int))}
        name = self.model_name or _model_name(pl_module)
        self.results = results_from_metrics(dm.perturbations, metrics, n=len(dm.test_dataset()), model=name,
                                            top1_metric=self.top1_metric, top5_metric=self.top5_metric)
        self.metrics = named_metrics(dm.perturbations, self.results)
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)
        out = report_dir(trainer, self.dirname)  # on every rank: trainer.log_dir broadcasts under DDP
        if trainer.is_global_zero:
            self.written = self.write(out, self.results, title=f"{name}: {dm.describe()}")

    def write(self, out: Path, rows: Sequence[Result], title: str = "robustness") -> List[Path]:
        """Write ``robustness.csv``, ``robustness.md`` and ``robustness.png`` into ``out``."""
        baseline = read_csv(self.baseline, model=self.baseline_model) if self.baseline else None
        base_name = (baseline[0].model or Path(str(self.baseline)).stem) if baseline else "baseline"
        md = f"# {title}\n\n{summary_markdown(rows, baseline, base_name)}\n{to_markdown(rows)}"
        written = [write_csv(rows, out / "robustness.csv"), atomic_write(out / "robustness.md", md),
                   plot_accuracy_vs_severity(rows, out / "robustness.png", title=title)]
        s = summary(rows, baseline)
        brief = ", ".join(f"{k} {100 * v:.1f}%" if not math.isnan(v) else f"{k} n/a"
                          for k, v in s.items() if not k.startswith("CE_"))
        rank_zero_info(f"robustness: {brief}; table and chart in {out}")
        return written


__all__ = ["METRIC_PREFIX", "RobustnessReport", "metric_name", "named_metrics", "results_from_metrics"]
