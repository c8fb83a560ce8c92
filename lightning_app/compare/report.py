"""The comparison report of a ``python -m lightning_app.compare`` study.

Each backbone's run is summarised from its own files (:func:`summarize_run`): ``reports/history.csv``
(train / val metrics, wall time and throughput per epoch, unfrozen layer groups), the ``test_*`` row of
``metrics.csv`` and ``reports/confusion_matrix.csv`` (both from testing the best checkpoint). The report
(:func:`write_report`) puts them side by side:

* ``compare.csv`` / ``compare.md`` / ``compare_table.png``: one row per backbone: input size, parameters,
  epochs, the best epoch (the checkpoint that was tested), train / val accuracy and loss at that epoch, test
  accuracy and loss, the train-test accuracy gap, fit wall time (training and validation, all sessions),
  training images/s (median over epochs);
* ``curves.png``: accuracy and loss per epoch, train (solid) and val (dashed), every backbone, unfreeze
  epochs marked;
* ``confusion_matrices.png``: the test confusion matrices side by side (row-normalised);
* ``per_class.csv`` / ``per_class.png``: test accuracy per class and backbone;
* ``compare.html``: all of it in one self-contained page (images inlined as base64).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lightning_app.atomic import atomic_write, save_figure
from lightning_app.reports import style_epoch_axis, unfreeze_epochs

PathLike = Union[str, os.PathLike]

#: (key, CSV header, Markdown header, format) of the comparison table
COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("backbone", "backbone", "{}"),
    ("image_size", "input size", "{}"),
    ("params", "parameters", "{:,}"),
    ("epochs", "epochs", "{}"),
    ("best_epoch", "best epoch", "{}"),
    ("train_acc", "train acc %", "pct"),
    ("val_acc", "val acc %", "pct"),
    ("test_acc", "test acc %", "pct"),
    ("train_loss", "train loss", "{:.4f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("test_loss", "test loss", "{:.4f}"),
    ("train_test_gap", "train-test gap (pp)", "pp"),
    ("fit_time_s", "fit wall time (s)", "{:.1f}"),
    ("images_per_s", "train images/s", "{:.1f}"),
)


# ----------------------------------------------------------------------------- reading a run
def _number(v: Any) -> Optional[float]:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_history(path: PathLike) -> List[Dict[str, float]]:
    """``reports/history.csv`` as a list of ``{column: float}`` (empty cells dropped)."""
    with open(path, newline="") as f:
        rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


def read_test_metrics(path: PathLike) -> Dict[str, float]:
    """The last row of a CSVLogger ``metrics.csv`` that holds ``test_acc``: its ``test_*`` columns."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("test_acc") not in (None, "")]
    if not rows:
        raise RuntimeError(f"{path} has no test metrics: was the run tested (test_after_fit)?")
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("test_") and v not in ("", None)}


def read_confusion_matrix(path: PathLike) -> Tuple[List[str], List[List[int]]]:
    """``(class names, counts[true][predicted])`` of a ``confusion_matrix.csv``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], [[int(v) for v in r[1:]] for r in rows[1:]]


def best_epoch(history: Sequence[Dict[str, float]], monitor: Optional[str], mode: str = "max") -> int:
    """The epoch whose checkpoint ModelCheckpoint kept as best: the first extremum of ``monitor`` (the last epoch
    without a monitor)."""
    rows = [h for h in history if monitor and monitor in h]
    if not rows:
        return int(history[-1]["epoch"]) if history else 0
    pick = max if mode == "max" else min
    target = pick(h[monitor] for h in rows)
    return int(next(h["epoch"] for h in rows if h[monitor] == target))


def summarize_run(run_dir: Path, spec: Any, trainer: Any, model: Any, session_time_s: float = 0.0) -> Dict[str, Any]:
    """What the report needs from one finished backbone run (from its files; parameters from the module)."""
    history = read_history(run_dir / "reports" / "history.csv")
    test = read_test_metrics(run_dir / "metrics.csv")
    names, cm = read_confusion_matrix(run_dir / "reports" / "confusion_matrix.csv")
    ckpt = trainer.checkpoint_callback
    monitor = getattr(ckpt, "monitor", None)
    size = getattr(getattr(trainer, "datamodule", None), "image_size", None) or spec.image_size
    return {
        "label": spec.label,
        "backbone": spec.name,
        "image_size": list(size) if isinstance(size, (tuple, list)) else size,
        "params": int(sum(p.numel() for p in model.parameters())),
        "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "monitor": monitor,
        "best_epoch": best_epoch(history, monitor, getattr(ckpt, "mode", "max")),
        "best_checkpoint": str(getattr(ckpt, "best_model_path", "") or ""),
        "history": history,
        "test": test,
        "class_names": names,
        "confusion_matrix": cm,
        "session_time_s": session_time_s,
        "run_dir": str(run_dir),
    }


# ----------------------------------------------------------------------------- the table
def table_row(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """One row of the comparison table (see :data:`COLUMNS`)."""
    history = summary["history"]
    at_best = next((h for h in history if int(h["epoch"]) == summary["best_epoch"]), history[-1] if history else {})
    size = summary.get("image_size")
    test = summary["test"]
    ips = [h["train_images_per_s"] for h in history if "train_images_per_s" in h]
    row = {
        "backbone": summary["label"],
        "image_size": "x".join(str(s) for s in size) if isinstance(size, list) else size,
        "params": summary["params"],
        "epochs": len(history),
        "best_epoch": summary["best_epoch"],
        "train_acc": at_best.get("train_acc"),
        "val_acc": at_best.get("val_acc"),
        "test_acc": test.get("test_acc"),
        "train_loss": at_best.get("train_loss"),
        "val_loss": at_best.get("val_loss"),
        "test_loss": test.get("test_loss"),
        "fit_time_s": sum(h.get("epoch_time_s", 0.0) for h in history),
        "images_per_s": statistics.median(ips) if ips else None,
    }
    row["train_test_gap"] = (row["train_acc"] - row["test_acc"]) if None not in (row["train_acc"], row["test_acc"]) else None
    return row


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "pct":
        return f"{100 * value:.2f}"
    if fmt == "pp":
        return f"{100 * value:+.2f}"
    return fmt.format(value)


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([k for k, _, _ in COLUMNS])
    for r in rows:
        w.writerow(["" if r.get(k) is None else (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k, _, _ in COLUMNS])
    return out.getvalue()


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def per_class_accuracy(summary: Mapping[str, Any]) -> Dict[str, Optional[float]]:
    """``{class: test accuracy}`` from the confusion matrix (``None`` for a class absent from the test split)."""
    cm = np.asarray(summary["confusion_matrix"], dtype=np.int64)
    totals = cm.sum(axis=1)
    return {n: (float(cm[i, i] / totals[i]) if totals[i] else None) for i, n in enumerate(summary["class_names"])}


def per_class_table(summaries: Mapping[str, Mapping[str, Any]]) -> Tuple[List[str], Dict[str, Dict[str, Optional[float]]]]:
    classes: List[str] = []
    acc = {label: per_class_accuracy(s) for label, s in summaries.items()}
    for a in acc.values():
        classes += [c for c in a if c not in classes]
    return classes, acc


def per_class_csv(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    classes, acc = per_class_table(summaries)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["class", *summaries])
    for c in classes:
        w.writerow([c] + ["" if acc[m].get(c) is None else f"{acc[m][c]:.6f}" for m in summaries])
    return out.getvalue()


# ----------------------------------------------------------------------------- figures
def _colors(n: int) -> List[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_overlaid_curves(summaries: Mapping[str, Mapping[str, Any]], path: PathLike) -> Path:
    """Accuracy and loss per epoch: one colour per backbone, train solid, val dashed; unfreeze epochs marked."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(13, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    colors = _colors(len(summaries))
    unfreezes: List[Tuple[int, int]] = []
    for s in summaries.values():
        for u in unfreeze_epochs(s["history"]):
            if u not in unfreezes:
                unfreezes.append(u)
    for ax, metric in zip(axes, ("acc", "loss")):
        for color, (label, s) in zip(colors, summaries.items()):
            for split, style in (("train", "-"), ("val", "--")):
                pts = sorted((h["epoch"], h[f"{split}_{metric}"]) for h in s["history"] if f"{split}_{metric}" in h)
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, marker="o" if split == "train" else "s", markersize=3.5, color=color)
            best = next((h for h in s["history"] if int(h["epoch"]) == s["best_epoch"]), None)
            if best is not None and f"val_{metric}" in best:
                ax.plot([best["epoch"]], [best[f"val_{metric}"]], marker="*", markersize=13, color=color,
                        markeredgecolor="black", linestyle="none")
        ax.set_title("accuracy" if metric == "acc" else "loss")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        if metric == "acc":
            ax.set_ylim(0, 1.02)
        style_epoch_axis(ax, sorted(unfreezes))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, linewidth=2.5, label=lbl) for c, lbl in zip(colors, summaries)]
    handles += [Line2D([], [], color="0.3", linestyle="-", marker="o", markersize=3.5, label="train"),
                Line2D([], [], color="0.3", linestyle="--", marker="s", markersize=3.5, label="val"),
                Line2D([], [], color="0.3", marker="*", markersize=11, markeredgecolor="black", linestyle="none",
                       label="best epoch (tested)")]
    if unfreezes:
        handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=1, label="unfreeze"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), frameon=False)
    return save_figure(fig, path)


def plot_confusion_matrices(summaries: Mapping[str, Mapping[str, Any]], path: PathLike) -> Path:
    """The test confusion matrices side by side, row-normalised (counts written for up to 15 classes)."""
    from matplotlib.figure import Figure

    n = len(summaries)
    k = max(len(s["class_names"]) for s in summaries.values())
    side = min(3.0 + 0.3 * k, 9.0)
    fig = Figure(figsize=(side * n + 1.0, side + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    im = None
    for ax, (label, s) in zip(axes, summaries.items()):
        cm = np.asarray(s["confusion_matrix"], dtype=np.int64)
        names = s["class_names"]
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        fs = max(4, 9 - len(names) // 12)
        ticks = range(len(names)) if len(names) <= 40 else range(0, len(names), max(1, len(names) // 20))
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
        ax.set_xticklabels([names[i] for i in ticks], rotation=90, fontsize=fs)
        ax.set_yticklabels([names[i] for i in ticks], fontsize=fs)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{label}: test accuracy {100 * acc:.2f}%", fontsize=10)
        if len(names) <= 15:
            for i in range(len(names)):
                for j in range(len(names)):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fs,
                                color="white" if norm[i, j] > 0.5 else "black")
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="fraction of the true class")
    return save_figure(fig, path)


def plot_per_class(summaries: Mapping[str, Mapping[str, Any]], path: PathLike) -> Path:
    """Test accuracy per class (rows) and backbone (columns) as a heat map, values written for up to 60 classes."""
    from matplotlib.figure import Figure

    classes, acc = per_class_table(summaries)
    labels = list(summaries)
    values = np.array([[np.nan if acc[m].get(c) is None else acc[m][c] for m in labels] for c in classes])
    height = min(2.0 + 0.28 * len(classes), 40)
    fig = Figure(figsize=(2.2 + 1.6 * len(labels), height), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20)
    ax.set_yticks(range(len(classes)))
    ax.set_yticklabels(classes, fontsize=max(4, 9 - len(classes) // 25))
    ax.xaxis.tick_top()
    if len(classes) <= 60:
        for i in range(len(classes)):
            for j in range(len(labels)):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{100 * values[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title("test accuracy per class (%)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.6)
    return save_figure(fig, path)


def plot_table(rows: Sequence[Mapping[str, Any]], path: PathLike, title: str = "") -> Path:
    """The comparison table as an image."""
    from matplotlib.figure import Figure

    cells = [[_fmt(r.get(k), f) for k, _, f in COLUMNS] for r in rows]
    headers = [h.replace(" ", "\n", 1) if len(h) > 9 else h for _, h, _ in COLUMNS]
    fig = Figure(figsize=(16, 0.9 + 0.4 * (len(rows) + 2)))
    ax = fig.subplots()
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=headers, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(9)
    tab.auto_set_column_width(list(range(len(COLUMNS))))
    tab.scale(1, 1.6)
    for (r, _), cell in tab.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#eeeeee")
            cell.set_height(cell.get_height() * 1.7)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the report
def _markdown(title: str, rows: Sequence[Mapping[str, Any]], summaries: Mapping[str, Mapping[str, Any]]) -> str:
    classes, acc = per_class_table(summaries)
    unfreezes = sorted({u for s in summaries.values() for u in unfreeze_epochs(s["history"])})
    lines = [f"# Backbone comparison: {title}", "", table_markdown(rows)]
    lines += ["Train / val values are those of the best epoch (the checkpoint that was tested); train accuracy is "
              "measured during training (augmentation and dropout on). Gap = train - test accuracy.", ""]
    if unfreezes:
        lines += ["Layer groups unfrozen at the start of epoch " + ", ".join(f"{e} (+{n})" for e, n in unfreezes) + ".", ""]
    lines += ["![curves](curves.png)", "", "![confusion matrices](confusion_matrices.png)", "",
              "## Test accuracy per class (%)", "", "| class | " + " | ".join(summaries) + " |",
              "|---|" + "|".join("---" for _ in summaries) + "|"]
    lines += [f"| {c} | " + " | ".join(_fmt(acc[m].get(c), "pct") for m in summaries) + " |" for c in classes]
    lines += ["", "![per class](per_class.png)", "",
              "Runs: " + ", ".join(f"`{s['run_dir']}`" for s in summaries.values()), ""]
    return "\n".join(lines)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html(title: str, rows: Sequence[Mapping[str, Any]], summaries: Mapping[str, Mapping[str, Any]],
          images: Mapping[str, Path]) -> str:
    classes, acc = per_class_table(summaries)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k), f))}</td>" for k, _, f in COLUMNS) + "</tr>"
                   for r in rows)
    pc_head = "<th>class</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in summaries)
    pc_body = "".join("<tr><td>" + html.escape(c) + "</td>" + "".join(
        f"<td>{_fmt(acc[m].get(c), 'pct')}</td>" for m in summaries) + "</tr>" for c in classes)
    style = ("body{font-family:sans-serif;margin:24px;max-width:1500px}table{border-collapse:collapse;margin:12px 0}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}img{max-width:100%;display:block;margin:12px 0}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        f"</head><body><h1>Backbone comparison: {html.escape(title)}</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        "<p>Train / val values are those of the best epoch (the checkpoint that was tested); train accuracy is measured "
        "during training (augmentation and dropout on). Gap = train - test accuracy.</p>"
        f"<h2>Learning curves</h2>{_img(images['curves'], 'curves')}"
        f"<h2>Confusion matrices (test)</h2>{_img(images['confusion'], 'confusion matrices')}"
        f"<h2>Test accuracy per class (%)</h2>{_img(images['per_class'], 'per class')}"
        f"<table><thead><tr>{pc_head}</tr></thead><tbody>{pc_body}</tbody></table>"
        "</body></html>"
    )


def write_report(summaries: Mapping[str, Mapping[str, Any]], out: PathLike, title: str = "") -> List[Path]:
    """Write the comparison report into ``out`` (see the module docstring); returns the files written."""
    out = Path(out)
    rows = [table_row(s) for s in summaries.values()]
    written = [atomic_write(out / "compare.csv", table_csv(rows)),
               atomic_write(out / "per_class.csv", per_class_csv(summaries))]
    images = {
        "table": plot_table(rows, out / "compare_table.png", title=title),
        "curves": plot_overlaid_curves(summaries, out / "curves.png"),
        "confusion": plot_confusion_matrices(summaries, out / "confusion_matrices.png"),
        "per_class": plot_per_class(summaries, out / "per_class.png"),
    }
    written += list(images.values())
    written.append(atomic_write(out / "compare.md", _markdown(title, rows, summaries)))
    written.append(atomic_write(out / "compare.html", _html(title, rows, summaries, images)))
    return written


__all__ = [
    "COLUMNS",
    "best_epoch",
    "per_class_accuracy",
    "plot_confusion_matrices",
    "plot_overlaid_curves",
    "plot_per_class",
    "read_confusion_matrix",
    "read_history",
    "read_test_metrics",
    "summarize_run",
    "table_markdown",
    "table_row",
    "write_report",
]
