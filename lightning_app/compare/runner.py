"""Several backbones, one fine-tuning study: ``python -m lightning_app.compare``.

Every backbone is trained by the normal command path, ``python -m lightning_app fit`` (the
:class:`~lightning_app.cli.TransferCLI`, in this process), with the same configuration files and overrides,
hence the same data split, seed, augmentation and schedule; only ``model.backbone`` and (for zoo models)
``data.init_args.image_size`` differ. ``test_after_fit`` tests the best checkpoint on the held-out split.

Layout of ``--out``::

    <label>/                    one run per backbone: metrics.csv, config.yaml, checkpoints/, reports/
    <label>.args.json           the exact fit arguments (and config digests) of that run
    <label>/summary.json        written when the run finished (fit and test): what the report needs
    compare.{csv,md,html}, *.png    the report (:mod:`lightning_app.compare.report`)

Resumable: a backbone with a ``summary.json`` is not trained again; one with ``checkpoints/last.ckpt`` but no
summary (interrupted) resumes from it. Either is refused when its ``<label>.args.json`` differs from the
arguments this invocation would use (another configuration must go to another ``--out``).

Multi-GPU / multi-node: ``--trainer.devices N --trainer.strategy ddp`` (Lightning re-executes this command for
the other ranks) or torchrun / SLURM with ``--trainer.num_nodes``: every rank runs the same backbones in the same
order, each on all devices; rank 0 writes the summaries and the report. ``--out`` must be on a filesystem that
all nodes share.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from lightning_app.atomic import atomic_write
from lightning_app.errors import ConfigError

SUMMARY = "summary.json"
ARGS_SUFFIX = ".args.json"
LAST_CKPT = "last.ckpt"
#: ``--<key>`` forms that set the image size for every backbone (then no native size is applied)
_SIZE_KEYS = ("--data.init_args.image_size", "--data.image_size")


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone of the study: ``name`` (zoo or timm), ``image_size`` (``None``: the config's), ``label``."""

    name: str
    image_size: Optional[int]
    label: str


def parse_backbone(text: str, native: bool = True) -> BackboneSpec:
    """``"VGG16"`` (zoo models at their Keras input size when ``native``) or ``"VGG16@160"``."""
    name, _, size = text.partition("@")
    if not name:
        raise ConfigError(f"--backbones entry {text!r} has no model name; write NAME or NAME@SIZE")
    if size:
        try:
            value = int(size)
        except ValueError:
            raise ConfigError(f"--backbones entry {text!r}: the size after '@' must be an integer") from None
        if value < 8:
            raise ConfigError(f"--backbones entry {text!r}: the image size must be at least 8")
        return BackboneSpec(name, value, text)
    return BackboneSpec(name, native_size(name) if native else None, name)


def native_size(name: str) -> Optional[int]:
    """The zoo entry's Keras input size (InceptionV3 299, VGG16 224, ...); ``None`` for other timm models."""
    from lightning_app.zoo import get_entry

    try:
        return int(get_entry(name).input_size)
    except KeyError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_app.compare",
        allow_abbrev=False,
        description="Fine-tune several backbones with one configuration (same split, seed and schedule) and write one "
                    "comparison report (table, curves, confusion matrices, per-class accuracy: CSV, Markdown, PNG, "
                    "HTML). Other arguments (--trainer.*, --data.*, --model.*) go to every fit.",
    )
    p.add_argument("--config", action="append", required=True, metavar="YAML",
                   help="fit configuration (repeatable, as for python -m lightning_app fit)")
    p.add_argument("--backbones", nargs="+", required=True, metavar="NAME[@SIZE]",
                   help="zoo (VGG16, ResNet50, InceptionV3, Xception, ...) or timm models; zoo models run at their "
                        "Keras input size unless NAME@SIZE or --data.init_args.image_size says otherwise")
    p.add_argument("--out", default=None, help="output directory (default runs/compare/<first config's name>)")
    return p


def _config_digests(configs: Sequence[str]) -> Dict[str, str]:
    out = {}
    for c in configs:
        path = Path(c)
        if not path.is_file():
            raise ConfigError(f"config {c} not found")
        out[c] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fit_args(configs: Sequence[str], extra: Sequence[str], spec: BackboneSpec, run_dir: Path) -> List[str]:
    """The ``python -m lightning_app fit`` arguments of one backbone (without ``--ckpt_path``)."""
    args = ["fit"]
    for c in configs:
        args += ["--config", c]
    args += list(extra)
    args += ["--model.backbone", spec.name]
    if spec.image_size is not None:
        args += ["--data.init_args.image_size", str(spec.image_size)]
    args += [
        "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(run_dir.parent), "--trainer.logger.name", run_dir.name,
        "--trainer.logger.version", "",
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--test_after_fit", "true",
    ]
    return args


def args_file(run_dir: Path) -> Path:
    """Where the fit arguments of a run are kept: beside its log directory (Lightning's CSVLogger warns about, and
    clears, a log directory that is not empty when the run starts)."""
    return run_dir.with_name(run_dir.name + ARGS_SUFFIX)


def _arg_pairs(args: Sequence[str]) -> Dict[str, str]:
    """``{"--key": "value"}`` of a command line (repeated keys such as ``--config`` joined with commas)."""
    out: Dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            key, sep, value = a.partition("=")
            if not sep and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            out[key] = f"{out[key]},{value}" if key in out else value
        i += 1
    return out


def _check_same_run(run_dir: Path, record: Dict[str, Any]) -> None:
    path = args_file(run_dir)
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if old != record:
        before, now = _arg_pairs(old.get("args", [])), _arg_pairs(record["args"])
        diff = [f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
                for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        changed = sorted(c for c in set(old.get("configs", {})) | set(record["configs"])
                         if old.get("configs", {}).get(c) != record["configs"].get(c))
        what = "; ".join(diff[:6] + ([f"config file changed: {', '.join(changed)}"] if changed else []))
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({what or 'argument order'}). A comparison uses one "
            f"configuration: write this one to another --out, or delete {run_dir} to train it again."
        )


def _preserve_metrics(run_dir: Path) -> None:
    """Lightning's CSVLogger deletes ``metrics.csv`` of a non-empty log directory: keep the interrupted
    session's file under another name (``history.csv`` in ``reports/`` has every epoch anyway)."""
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        n = 1
        while (run_dir / f"metrics.before_resume{n}.csv").exists():
            n += 1
        os.replace(metrics, run_dir / f"metrics.before_resume{n}.csv")


def train_one(configs: Sequence[str], extra: Sequence[str], spec: BackboneSpec, out: Path) -> Optional[Dict[str, Any]]:
    """Fit and test one backbone through the TransferCLI (resuming from ``last.ckpt`` when there is one);
    returns its summary (rank 0) or ``None`` when the run did not finish."""
    from lightning_app.cli import TransferCLI
    from lightning_app.compare.report import summarize_run

    run_dir = out / spec.label
    args = fit_args(configs, extra, spec, run_dir)
    record = {"args": args, "configs": _config_digests(configs)}
    _check_same_run(run_dir, record)
    last = run_dir / "checkpoints" / LAST_CKPT
    resume = last.is_file()
    if rank_zero_only.rank == 0:
        atomic_write(args_file(run_dir), json.dumps(record, indent=1))
        if resume:
            _preserve_metrics(run_dir)
    rank_zero_info(f"compare: {'resuming' if resume else 'training'} {spec.label}"
                   f"{f' at {spec.image_size} px' if spec.image_size else ''}"
                   f"{f' from {last}' if resume else ''}")
    start = time.perf_counter()
    with warnings.catch_warnings():
        # sys.argv stays as it is (DDP re-executes this command for the other ranks), so LightningCLI sees both
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
        cli = TransferCLI(args=args + (["--ckpt_path", str(last)] if resume else []))
    trainer, model = cli.trainer, cli.model
    if trainer.interrupted or not trainer.state.finished:
        return None
    summary = None
    if trainer.is_global_zero:
        summary = summarize_run(run_dir, spec, trainer, model, session_time_s=time.perf_counter() - start)
        atomic_write(run_dir / SUMMARY, json.dumps(summary, indent=1))
    del cli, trainer, model
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return summary


def load_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Entry point; returns ``{label: summary}`` (on rank 0; other ranks return what they trained)."""
    args, extra = build_parser().parse_known_args(argv)
    configs = list(args.config)
    _config_digests(configs)
    native = not any(a.split("=", 1)[0] in _SIZE_KEYS for a in extra)
    specs = [parse_backbone(b, native=native) for b in args.backbones]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--backbones lists a backbone twice: {labels}")
    out = Path(args.out or Path("runs") / "compare" / Path(configs[0]).stem)
    summaries: Dict[str, Dict[str, Any]] = {}
    for spec in specs:
        done = load_summary(out / spec.label)
        if done is not None:
            _check_same_run(out / spec.label, {"args": fit_args(configs, extra, spec, out / spec.label),
                                               "configs": _config_digests(configs)})
            rank_zero_info(f"compare: {spec.label} already finished ({out / spec.label / SUMMARY}), not trained again")
            summaries[spec.label] = done
            continue
        summary = train_one(configs, extra, spec, out)
        if summary is None and rank_zero_only.rank == 0:
            raise SystemExit(f"compare: {spec.label} did not finish; run the same command again to resume it")
        if summary is not None:
            summaries[spec.label] = summary
    if rank_zero_only.rank == 0:
        from lightning_app.compare.report import write_report

        written = write_report(summaries, out, title=f"{Path(configs[0]).stem}: {', '.join(labels)}")
        rank_zero_info("compare report: " + ", ".join(str(p) for p in written))
        sys.stdout.flush()
    return summaries


__all__ = ["BackboneSpec", "build_parser", "fit_args", "main", "native_size", "parse_backbone", "train_one"]
