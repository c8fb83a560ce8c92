"""Several models, one robustness suite, one comparison: ``python -m lightning_app.robustness``.

Every model is tested on the same data and suite (the ``data`` / ``trainer`` sections of the config, with any
``--data.*`` / ``--trainer.*`` overrides), each with a fresh Trainer built by the TransferCLI. Writes into ``--out``:

* ``<label>/reports/robustness.{csv,md,png}`` and ``<label>/metrics.csv``: each model's own run;
* ``results.csv``: all rows of all models (a ``model`` column);
* ``comparison.csv`` / ``comparison.md``: one row per model: clean, mean corruption and attack top-1, mCE,
  relative mCE and CE per corruption against ``--baseline``;
* ``comparison.png``: mean accuracy against severity per model, and grouped bars.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from lightning_app.atomic import atomic_write
from lightning_app.reports import TrainingReport
from lightning_app.robustness.callback import RobustnessReport
from lightning_app.robustness.datamodule import RobustnessDataModule
from lightning_app.robustness.models import SEED_MODELS, ModelSpec, load_module, parse_model_spec, unique_labels
from lightning_app.robustness.plots import plot_comparison
from lightning_app.robustness.results import (
    Table,
    comparison,
    comparison_csv,
    comparison_markdown,
    read_csv,
    to_csv,
)

DEFAULT_CONFIG = "configs/robustness.yaml"
DEFAULT_OUT = "runs/robustness"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_app.robustness",
        allow_abbrev=False,
        description="Test several models on one robustness suite and write one comparison table and chart. "
                    "Other arguments (--data.*, --trainer.*, --seed_everything) go to the Lightning config.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"robustness config (default {DEFAULT_CONFIG})")
    p.add_argument("--models", nargs="+", default=list(SEED_MODELS), metavar="MODEL",
                   help="fit checkpoints (path.ckpt or label=path.ckpt), or zoo names tested with their Keras "
                        "ImageNet top on ImageNet-labelled data (default: the seed's six)")
    p.add_argument("--baseline", default=None,
                   help="label of one of --models, or a robustness.csv / results.csv of an earlier run "
                        "(default: the first model)")
    p.add_argument("--baseline_model", default=None, help="model to take from a --baseline CSV holding several")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--native_size", action="store_true",
                   help="test each zoo model at its Keras input size (NASNetLarge 331, InceptionV3 299, ...) "
                        "instead of the data's image_size")
    return p


def native_size_args(backbone: str) -> List[str]:
    """``--data.init_args.datamodule.init_args.image_size N`` for a zoo model (nothing for other models)."""
    from lightning_app.zoo import get_entry

    try:
        size = get_entry(backbone).input_size
    except KeyError:
        return []
    return ["--data.init_args.datamodule.init_args.image_size", str(size)]


def _cli_args(config: str, extra: Sequence[str], spec: ModelSpec, out: Path) -> List[str]:
    return [
        "--config", config, *extra,
        # the module comes from the checkpoint or the ImageNet top; this only keeps the CLI's own model cheap
        "--model.backbone", spec.backbone, "--model.weights", "null",
        "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(out), "--trainer.logger.name", spec.label, "--trainer.logger.version", "",
    ]


def run_model(config: str, extra: Sequence[str], spec: ModelSpec, out: Path, native_size: bool = False) -> Table:
    """Test one model with a Trainer and data built from ``config``; returns its result rows."""
    from lightning_app.cli import TransferCLI

    if native_size:
        extra = [*extra, *native_size_args(spec.backbone)]
    argv, sys.argv = sys.argv, sys.argv[:1]  # args come from `args` only (LightningCLI warns about both)
    try:
        cli = TransferCLI(args=_cli_args(config, extra, spec, out), run=False)
    finally:
        sys.argv = argv
    dm, trainer = cli.datamodule, cli.trainer
    if not isinstance(dm, RobustnessDataModule):
        raise TypeError(f"{config}: data must be a lightning_app.robustness.RobustnessDataModule, "
                        f"got {type(dm).__name__}")
    # per-dataloader confusion matrices are not needed here (tens of loaders x models)
    trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, TrainingReport)]
    report = next((cb for cb in trainer.callbacks if isinstance(cb, RobustnessReport)), None)
    if report is None:
        report = RobustnessReport()
        trainer.callbacks.append(report)
    report.model_name, report.warn_untrained, report.baseline = spec.label, False, None
    module = load_module(spec, dm.num_classes)
    rank_zero_info(f"robustness: testing {spec.label} ({spec.checkpoint or 'Keras ImageNet top'})")
    trainer.test(module, datamodule=dm, verbose=False)
    rows = list(report.results)
    del cli, module, trainer
    gc.collect()
    return rows


def _baseline(args: argparse.Namespace, tables: Dict[str, Table]) -> tuple:
    if args.baseline is None:
        return next(iter(tables)), None
    if args.baseline in tables:
        return args.baseline, None
    if Path(args.baseline).is_file():
        rows = read_csv(args.baseline, model=args.baseline_model)
        return rows[0].model or Path(args.baseline).stem, rows
    raise ValueError(f"--baseline {args.baseline!r} is neither one of the models {list(tables)} nor a results CSV")


def write_comparison(tables: Dict[str, Table], out: Path, baseline: Optional[str],
                     baseline_rows: Optional[Table] = None) -> List[Path]:
    """``results.csv``, ``comparison.csv``, ``comparison.md`` and ``comparison.png`` in ``out``."""
    header, rows = comparison(tables, baseline, baseline_rows)
    all_rows = [r for t in tables.values() for r in t]
    md = (f"# Robustness comparison\n\n{comparison_markdown(header, rows, baseline)}\n"
          f"Per-model tables: `<model>/reports/robustness.md`; all rows: `results.csv`.\n")
    return [
        atomic_write(out / "results.csv", to_csv(all_rows)),
        atomic_write(out / "comparison.csv", comparison_csv(header, rows)),
        atomic_write(out / "comparison.md", md),
        plot_comparison(tables, out / "comparison.png", title=f"robustness ({len(tables)} models)"),
    ]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Table]:
    """Entry point; returns ``{label: rows}``."""
    args, extra = build_parser().parse_known_args(argv)
    if not Path(args.config).is_file():
        raise SystemExit(f"config {args.config} not found")
    specs = unique_labels([parse_model_spec(m) for m in args.models])
    labels = [s.label for s in specs]
    if args.baseline is not None and args.baseline not in labels and not Path(args.baseline).is_file():
        raise SystemExit(f"--baseline {args.baseline!r} is neither one of the models {labels} nor a results CSV")
    out = Path(args.out)
    tables: Dict[str, Table] = {}
    for spec in specs:
        tables[spec.label] = run_model(args.config, extra, spec, out, native_size=args.native_size)
    base_name, base_rows = _baseline(args, tables)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this script
        written = write_comparison(tables, out, base_name, base_rows)
        rank_zero_info("robustness comparison: " + ", ".join(str(p) for p in written))
    return tables


__all__ = ["build_parser", "main", "run_model", "write_comparison"]
