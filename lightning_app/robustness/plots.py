"""Robustness charts (matplotlib object API on the Agg canvas; no pyplot, no global backend change).

Both charts have one panel per ImageNet-C corruption category (noise, blur, weather, digital), each
starting from the clean accuracy at severity 0 ("clean") and marking it with a dashed line, so a
reader sees at a glance which kind of corruption hurts and how much of the clean accuracy is left.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from lightning_app.atomic import save_figure
from lightning_app.perturb import CORRUPTIONS
from lightning_app.robustness.results import APPROX_MARK, Result, mean_corruption_accuracy

PathLike = Union[str, os.PathLike]
#: ImageNet-C's four corruption groups, in the paper's order.
CATEGORIES = ("noise", "blur", "weather", "digital")
_SEVERITY_TICKS = (range(0, 6), ["clean", "1", "2", "3", "4", "5"])


def category(name: str) -> str:
    """The ImageNet-C group of a corruption (``other`` for names this version does not know)."""
    entry = CORRUPTIONS.get(name)
    return entry.category if entry is not None else "other"


def _by_category(rows: Sequence[Result]) -> Dict[str, Dict[str, List[Result]]]:
    """``{category: {corruption: rows sorted by severity}}`` in the paper's category order."""
    groups: Dict[str, Dict[str, List[Result]]] = {}
    for r in rows:
        if r.kind == "corruption":
            groups.setdefault(category(r.perturbation), {}).setdefault(r.perturbation, []).append(r)
    order = [c for c in CATEGORIES if c in groups] + sorted(c for c in groups if c not in CATEGORIES)
    return {c: {n: sorted(rs, key=lambda r: r.severity) for n, rs in groups[c].items()} for c in order}


def _severity_axis(ax, ylabel: bool) -> None:
    ax.set_xticks(list(_SEVERITY_TICKS[0]))
    ax.set_xticklabels(_SEVERITY_TICKS[1])
    ax.set_xlim(-0.2, 5.2)
    ax.set_ylim(-0.02, 1.02)  # an accuracy of 0 (a strong attack) stays visible above the axis
    ax.set_xlabel("severity")
    if ylabel:
        ax.set_ylabel("top-1 accuracy")
    ax.grid(alpha=0.3)


def _mark_clean(ax, top1: float, color: str = "black", label: Optional[str] = None) -> None:
    ax.axhline(top1, color=color, linestyle="--", linewidth=1, zorder=1,
               label=label if label is not None else f"clean {100 * top1:.1f}%")


def _grid(n_panels: int, width: float = 4.6, height: float = 3.9):
    from matplotlib.figure import Figure

    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def plot_accuracy_vs_severity(rows: Sequence[Result], path: PathLike, title: Optional[str] = None) -> Path:
    """One model: a panel per corruption category (top-1 against severity, one line per corruption,
    from clean at severity 0; the clean accuracy dashed), and a summary panel: the mean over the
    corruptions per severity and the attacks (dotted). Approximate corruptions are marked ``≈``."""
    from matplotlib import colormaps

    clean = next((r for r in rows if r.kind == "clean"), None)
    groups = _by_category(rows)
    attacks = [r for r in rows if r.kind == "attack"]
    panels = list(groups) + (["summary"] if groups or attacks else [])
    fig, axes = _grid(max(1, len(panels)))
    cmap = colormaps["tab10"]
    for k, (ax, cat) in enumerate(zip(axes, panels)):
        if cat == "summary":
            means = {s: [] for s in range(1, 6)}
            for r in rows:
                if r.kind == "corruption":
                    means.setdefault(r.severity, []).append(r.top1)
            xs = [s for s in sorted(means) if means[s]]
            ys = [sum(means[s]) / len(means[s]) for s in xs]
            if clean is not None:
                xs, ys = [0] + xs, [clean.top1] + ys
            if xs:
                ax.plot(xs, ys, "-o", color="black", markersize=4, label="mean over corruptions")
            for j, r in enumerate(attacks):
                ax.axhline(r.top1, color=cmap((j + 3) % 10), linestyle=":", linewidth=2,
                           label=f"{r.perturbation} {100 * r.top1:.1f}%")
            ax.set_title("all corruptions" + (" and attacks" if attacks else ""))
        else:
            for i, (name, rs) in enumerate(groups[cat].items()):
                xs, ys = [r.severity for r in rs], [r.top1 for r in rs]
                if clean is not None:
                    xs, ys = [0] + xs, [clean.top1] + ys
                label = name if rs[0].exact else f"{name} {APPROX_MARK}"
                ax.plot(xs, ys, "-o", markersize=4, color=cmap(i % 10), label=label)
            ax.set_title(cat)
        if clean is not None:
            _mark_clean(ax, clean.top1)
        _severity_axis(ax, ylabel=k % 3 == 0)
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
    fig.suptitle(title or "accuracy under corruption", fontsize=11)
    return save_figure(fig, path)


def plot_comparison(tables: Mapping[str, Sequence[Result]], path: PathLike, title: Optional[str] = None) -> Path:
    """Several models: a panel per corruption category (the category's mean top-1 against severity, one
    line per model from its clean accuracy, which is dashed in the model's colour), then grouped bars of
    clean, mean-corruption and attack top-1 per model."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    cats: List[str] = []
    for rows in tables.values():
        for c in _by_category(rows):
            if c not in cats:
                cats.append(c)
    cats = [c for c in CATEGORIES if c in cats] + [c for c in cats if c not in CATEGORIES]
    fig, axes = _grid(len(cats) + 1)
    for k, (ax, cat) in enumerate(zip(axes, cats)):
        for i, (model, rows) in enumerate(tables.items()):
            group = _by_category(rows).get(cat, {})
            per_sev: Dict[int, List[float]] = {}
            for rs in group.values():
                for r in rs:
                    per_sev.setdefault(r.severity, []).append(r.top1)
            xs = sorted(per_sev)
            ys = [sum(per_sev[s]) / len(per_sev[s]) for s in xs]
            clean = next((r for r in rows if r.kind == "clean"), None)
            if clean is not None:
                xs, ys = [0] + xs, [clean.top1] + ys
                _mark_clean(ax, clean.top1, color=cmap(i % 10), label="")
            if xs:
                ax.plot(xs, ys, "-o", markersize=4, color=cmap(i % 10), label=model)
        names = sorted({n for rows in tables.values() for n in _by_category(rows).get(cat, {})})
        ax.set_title(f"{cat} (mean)\n" + textwrap.fill(", ".join(names), 60), fontsize=9)
        _severity_axis(ax, ylabel=k % 3 == 0)
        ax.legend(loc="best", fontsize=8, framealpha=0.85)

    ax = axes[-1]
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
        xs = [j + i * width - 0.4 + width / 2 for j in range(len(groups))]
        ax.bar(xs, vals, width, color=cmap(i % 10), label=model)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20)
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("clean, corrupted and adversarial accuracy", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(title or f"robustness ({len(tables)} models)", fontsize=11)
    return save_figure(fig, path)


__all__ = ["CATEGORIES", "category", "plot_accuracy_vs_severity", "plot_comparison"]
