"""Backbone comparison: ``python -m lightning_app.compare --config configs/food.yaml --backbones VGG16 ResNet50 ...``
trains every backbone with the same configuration (split, seed, schedule) through the normal ``fit`` path and writes
one report (table, learning curves, confusion matrices, per-class accuracy; CSV, Markdown, PNG and one HTML page).
See :mod:`lightning_app.compare.runner` and :mod:`lightning_app.compare.report`."""
from lightning_app.compare.report import summarize_run, table_row, write_report
from lightning_app.compare.runner import BackboneSpec, fit_args, main, native_size, parse_backbone

__all__ = ["BackboneSpec", "fit_args", "main", "native_size", "parse_backbone", "summarize_run", "table_row",
           "write_report"]
