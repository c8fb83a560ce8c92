"""Robustness charts (matplotlib object API on the Agg canvas; no pyplot, no global backend change)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from lightning_app.atomic import save_figure
from lightning_app.robustness.results import APPROX_MARK, Result, accuracy_by_severity, mean_corruption_accuracy

PathLike = Union[str, os.PathLike]
_STYLES = ("-", "--", "-.", ":")


def plot_accuracy_vs_severity(rows: Sequence[Result], path: PathLike, title: Optional[str] = None) -> Path:
    """Top-1 accuracy against severity, one line per corruption (starting from clean at severity 0
    when present); attacks as horizontal dotted lines. Approximate corruptions are marked ``≈``."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    clean = next((r for r in rows if r.kind == "clean"), None)
    corruptions: dict = {}
    for r in rows:
        if r.kind == "corruption":
            corruptions.setdefault(r.perturbation, []).append(r)
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    cmap = colormaps["tab20"]
    for i, (name, rs) in enumerate(corruptions.items()):
        rs = sorted(rs, key=lambda r: r.severity)
        xs, ys = [r.severity for r in rs], [r.top1 for r in rs]
        if clean is not None:
            xs, ys = [0] + xs, [clean.top1] + ys
        label = name if rs[0].exact else f"{name} {APPROX_MARK}"
        color = cmap((2 * i) % 20 + (i // 10) % 2)  # dark tab20 shades first, then the light ones
        ax.plot(xs, ys, _STYLES[(i // 20) % len(_STYLES)], marker="o", markersize=3, color=color, label=label)
    if clean is not None:
        ax.axhline(clean.top1, color="black", linestyle="--", linewidth=1, label=f"clean ({100 * clean.top1:.1f}%)")
    for j, r in enumerate(r for r in rows if r.kind == "attack"):
        ax.axhline(r.top1, color=str(0.25 + 0.2 * (j % 3)), linestyle=":", linewidth=1.5,
                   label=f"{r.perturbation} ({100 * r.top1:.1f}%)")
    ax.set_xticks(range(0, 6))
    ax.set_xticklabels(["clean", "1", "2", "3", "4", "5"])
    ax.set_xlabel("severity")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy under corruption")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return save_figure(fig, path)


def plot_comparison(tables: Mapping[str, Sequence[Result]], path: PathLike, title: Optional[str] = None) -> Path:
    """Left: mean top-1 over corruptions against severity, one line per model (0 = clean).
    Right: clean, mean-corruption and attack top-1 per model, as grouped bars."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    cmap = colormaps["tab10"]
    for i, (model, rows) in enumerate(tables.items()):
        by_sev = accuracy_by_severity(rows)
        if by_sev:
            left.plot(list(by_sev), list(by_sev.values()), "-o", markersize=4, color=cmap(i % 10), label=model)
    left.set_xticks(range(0, 6))
    left.set_xticklabels(["clean", "1", "2", "3", "4", "5"])
    left.set_xlabel("severity")
    left.set_ylabel("mean top-1 over corruptions")
    left.set_ylim(0, 1.02)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("accuracy against severity")

    groups: list = []
    for rows in tables.values():
        for r in rows:
            g = "clean" if r.kind == "clean" else (r.perturbation if r.kind == "attack" else "corruptions (mean)")
            if g not in groups:
                groups.append(g)
    width = 0.8 / max(len(tables), 1)
    for i, (model, rows) in enumerate(tables.items()):
        vals = []
        for g in groups:
            if g == "corruptions (mean)":
                vals.append(mean_corruption_accuracy(rows))
            else:
                vals.append(next((r.top1 for r in rows if r.perturbation == g and r.kind != "corruption"), float("nan")))
        xs = [k + i * width - 0.4 + width / 2 for k in range(len(groups))]
        right.bar(xs, vals, width, color=cmap(i % 10), label=model)
    right.set_xticks(range(len(groups)))
    right.set_xticklabels(groups, rotation=20)
    right.set_ylabel("top-1 accuracy")
    right.set_ylim(0, 1.02)
    right.grid(alpha=0.3, axis="y")
    right.set_title("clean, corrupted and adversarial accuracy")
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


__all__ = ["plot_accuracy_vs_severity", "plot_comparison"]
