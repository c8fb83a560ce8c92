"""Robustness benchmark in the test loop: ImageNet-C corruptions and FGSM / PGD attacks, one test dataloader
per (perturbation, severity), results table, chart, CE / mCE / relative mCE, multi-model comparison.

One model (your ``fit`` checkpoint; model settings come from the checkpoint)::

    python -m lightning_app fit  --config configs/quickstart.yaml
    python -m lightning_app test --config configs/robustness.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    # -> runs/robustness/version_N/reports/robustness.{csv,md,png}, metrics robustness/<perturbation>/top1|top5

Several models, one comparison (checkpoints, or zoo names with their Keras ImageNet top on ImageNet-labelled data)::

    python -m lightning_app.robustness --config configs/robustness.yaml \\
        --models a=runs/a/checkpoints/last.ckpt b=runs/b/checkpoints/last.ckpt --baseline a --out runs/robustness
    # -> runs/robustness/{comparison.csv,comparison.md,comparison.png,results.csv,<label>/reports/...}

Quick look: ``--data.init_args.limit_per_loader 200``, ``--data.init_args.severities '[1,3,5]'``,
``--data.init_args.attacks null`` (then ``trainer.inference_mode`` may stay true).
"""
from lightning_app.robustness.attack import INFERENCE_MODE_FIX, attack_batch
from lightning_app.robustness.callback import RobustnessReport, metric_name, results_from_metrics
from lightning_app.robustness.datamodule import RobustnessDataModule
from lightning_app.robustness.models import SEED_MODELS, imagenet_module, module_from_classifier
from lightning_app.robustness.plots import plot_accuracy_vs_severity, plot_comparison
from lightning_app.robustness.results import (
    Result,
    clean_error,
    comparison,
    corruption_error,
    mce,
    read_csv,
    relative_corruption_error,
    relative_mce,
    summary,
    to_markdown,
    write_csv,
)
from lightning_app.robustness.specs import DEFAULT_ATTACKS, Perturbation, build_suite, parse_attack

__all__ = [
    "DEFAULT_ATTACKS",
    "INFERENCE_MODE_FIX",
    "Perturbation",
    "Result",
    "RobustnessDataModule",
    "RobustnessReport",
    "SEED_MODELS",
    "attack_batch",
    "build_suite",
    "clean_error",
    "comparison",
    "corruption_error",
    "imagenet_module",
    "mce",
    "metric_name",
    "module_from_classifier",
    "parse_attack",
    "plot_accuracy_vs_severity",
    "plot_comparison",
    "read_csv",
    "relative_corruption_error",
    "relative_mce",
    "results_from_metrics",
    "summary",
    "to_markdown",
    "write_csv",
]
