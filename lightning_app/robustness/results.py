"""Result tables of robustness runs (CSV / Markdown) and the ImageNet-C scores: CE, mCE, relative mCE.

A result table is a list of :class:`Result` rows: one per (perturbation, severity) of one model.
Scores (Hendrycks & Dietterich 2019), with ``E`` the top-1 error:

* ``CE_c = sum_s E(model, c, s) / sum_s E(baseline, c, s)``;
* ``relative CE_c = sum_s (E(model, c, s) - E(model, clean)) / sum_s (E(baseline, c, s) - E(baseline, clean))``;
* ``mCE`` / ``relative mCE``: the mean over the benchmark corruptions (extras are reported, not averaged).

Undefined ratios (a zero denominator) are ``nan``.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from lightning_app.perturb import BENCHMARK_CORRUPTIONS
from lightning_app.atomic import atomic_write

PathLike = Union[str, os.PathLike]
APPROX_MARK = "≈"


@dataclass(frozen=True)
class Result:
    """Accuracy of one model on one perturbation (``severity`` 0 for clean and attacks)."""

    perturbation: str
    kind: str
    severity: int
    top1: float
    top5: Optional[float] = None
    n: int = 0
    exact: bool = True
    params: str = ""
    model: str = ""

    @property
    def error(self) -> float:
        return 1.0 - self.top1


Table = List[Result]


# ----------------------------------------------------------------------------- IO
_COLUMNS = ["model", "perturbation", "kind", "severity", "top1", "top5", "error", "n", "exact", "params"]


def to_csv(rows: Sequence[Result]) -> str:
    """CSV text, one row per result (``error`` = 1 - top1, ``exact`` false marks approximations)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(_COLUMNS)
    for r in rows:
        w.writerow([r.model, r.perturbation, r.kind, r.severity, f"{r.top1:.6f}",
                    "" if r.top5 is None else f"{r.top5:.6f}", f"{r.error:.6f}", r.n, str(r.exact).lower(), r.params])
    return out.getvalue()


def write_csv(rows: Sequence[Result], path: PathLike) -> Path:
    return atomic_write(path, to_csv(rows))


def read_csv(path: PathLike, model: Optional[str] = None) -> Table:
    """Rows of a results CSV (``model`` keeps only that model's rows; a file with several models needs it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"perturbation", "kind", "severity", "top1"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} is not a robustness results CSV: no columns {sorted(missing)}")
        rows = [Result(perturbation=d["perturbation"], kind=d["kind"], severity=int(d["severity"]),
                       top1=float(d["top1"]), top5=float(d["top5"]) if d.get("top5") else None, n=int(d.get("n") or 0),
                       exact=(d.get("exact", "true").lower() != "false"), params=d.get("params", ""),
                       model=d.get("model", "")) for d in reader]
    models = sorted({r.model for r in rows})
    if model is not None:
        rows = [r for r in rows if r.model == model]
        if not rows:
            raise ValueError(f"{path} has no rows for model {model!r}; it has {models}")
    elif len(models) > 1:
        raise ValueError(f"{path} holds several models {models}: say which one")
    return rows


def _pct(v: Optional[float]) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def to_markdown(rows: Sequence[Result]) -> str:
    """Markdown table (percentages); approximate corruptions are marked ``≈`` with a footnote."""
    lines = ["| perturbation | severity | top-1 % | top-5 % | error % | images | parameters |",
             "|---|---:|---:|---:|---:|---:|---|"]
    approx = False
    for r in rows:
        name = r.perturbation if r.exact else f"{r.perturbation} {APPROX_MARK}"
        approx |= not r.exact
        sev = str(r.severity) if r.kind == "corruption" else ""
        lines.append(f"| {name} | {sev} | {_pct(r.top1)} | {_pct(r.top5)} | {_pct(r.error)} | {r.n} | {r.params} |")
    if approx:
        lines.append("")
        lines.append(f"{APPROX_MARK} approximation of the ImageNet-C corruption "
                     "(see lightning_app.perturb.CORRUPTIONS[name].note)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- selections
def clean_error(rows: Sequence[Result]) -> float:
    """Top-1 error on clean data (error if the table has no clean row)."""
    clean = [r for r in rows if r.kind == "clean"]
    if len(clean) != 1:
        raise ValueError(f"expected exactly one clean row, found {len(clean)}: relative scores need the clean loader")
    return clean[0].error


def corruption_errors(rows: Sequence[Result]) -> Dict[str, Dict[int, float]]:
    """``{corruption: {severity: error}}`` in table order."""
    out: Dict[str, Dict[int, float]] = {}
    for r in rows:
        if r.kind == "corruption":
            sev = out.setdefault(r.perturbation, {})
            if r.severity in sev:
                raise ValueError(f"{r.perturbation} severity {r.severity} appears twice")
            sev[r.severity] = r.error
    return out


Errors = Dict[str, Dict[int, float]]


def _paired(model: Sequence[Result], baseline: Sequence[Result]) -> Tuple[Errors, Errors]:
    m, b = corruption_errors(model), corruption_errors(baseline)
    for c, sev in m.items():
        if c not in b:
            raise ValueError(f"the baseline has no results for corruption {c!r}: run it on the same suite")
        if set(sev) != set(b[c]):
            raise ValueError(f"{c}: severities {sorted(sev)} vs the baseline's {sorted(b[c])}: "
                             "run both on the same suite")
    return m, b


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


# ----------------------------------------------------------------------------- scores
def corruption_error(model: Sequence[Result], baseline: Sequence[Result]) -> Dict[str, float]:
    """``{c: CE_c}``, ``CE_c = sum_s err(model, c, s) / sum_s err(baseline, c, s)``."""
    m, b = _paired(model, baseline)
    return {c: _ratio(sum(m[c].values()), sum(b[c][s] for s in m[c])) for c in m}


def relative_corruption_error(model: Sequence[Result], baseline: Sequence[Result]) -> Dict[str, float]:
    """``{c: relative CE_c}``: like :func:`corruption_error` with each model's clean error subtracted first."""
    m, b = _paired(model, baseline)
    em, eb = clean_error(model), clean_error(baseline)
    return {c: _ratio(sum(e - em for e in m[c].values()), sum(b[c][s] - eb for s in m[c])) for c in m}


def mean_ce(ces: Mapping[str, float]) -> float:
    """Mean CE over the benchmark corruptions in ``ces`` (as ImageNet-C: extras such as speckle_noise
    do not count), or over all of them when none is a benchmark one; ``nan`` if empty or any is undefined."""
    bench = [v for c, v in ces.items() if c in BENCHMARK_CORRUPTIONS]
    vals = bench or list(ces.values())
    return sum(vals) / len(vals) if vals else math.nan


def mce(model: Sequence[Result], baseline: Sequence[Result]) -> float:
    """mCE: mean CE over the (benchmark) corruptions of ``model``."""
    return mean_ce(corruption_error(model, baseline))


def relative_mce(model: Sequence[Result], baseline: Sequence[Result]) -> float:
    """Relative mCE: mean relative CE over the (benchmark) corruptions of ``model``."""
    return mean_ce(relative_corruption_error(model, baseline))


def mean_corruption_accuracy(rows: Sequence[Result]) -> float:
    """Mean top-1 over all corruption rows (``nan`` if none)."""
    acc = [r.top1 for r in rows if r.kind == "corruption"]
    return sum(acc) / len(acc) if acc else math.nan


def accuracy_by_severity(rows: Sequence[Result]) -> Dict[int, float]:
    """``{severity: mean top-1 over corruptions}``, with severity 0 = clean when present."""
    out: Dict[int, List[float]] = {}
    for r in rows:
        if r.kind == "corruption" or r.kind == "clean":
            out.setdefault(r.severity, []).append(r.top1)
    return {s: sum(v) / len(v) for s, v in sorted(out.items())}


def with_model(rows: Sequence[Result], model: str) -> Table:
    """The rows with their ``model`` column set."""
    return [replace(r, model=model) for r in rows]


# ----------------------------------------------------------------------------- summaries
def summary(rows: Sequence[Result], baseline: Optional[Sequence[Result]] = None) -> Dict[str, float]:
    """``clean_top1``, ``corruption_top1`` (mean), ``<attack>_top1`` and, with a baseline, ``mCE`` and
    ``relative_mCE`` (and ``CE_<corruption>``)."""
    out: Dict[str, float] = {}
    clean = [r for r in rows if r.kind == "clean"]
    if clean:
        out["clean_top1"] = clean[0].top1
    if any(r.kind == "corruption" for r in rows):
        out["corruption_top1"] = mean_corruption_accuracy(rows)
    for r in rows:
        if r.kind == "attack":
            out[f"{r.perturbation}_top1"] = r.top1
    if baseline is not None and any(r.kind == "corruption" for r in rows):
        ces = corruption_error(rows, baseline)
        out["mCE"] = mean_ce(ces)
        if clean and any(r.kind == "clean" for r in baseline):
            out["relative_mCE"] = relative_mce(rows, baseline)
        out.update({f"CE_{c}": v for c, v in ces.items()})
    return out


def summary_markdown(rows: Sequence[Result], baseline: Optional[Sequence[Result]] = None,
                     baseline_name: str = "baseline") -> str:
    """A few lines: clean / mean corruption / attack accuracy and, with a baseline, mCE and relative mCE."""
    s = summary(rows, baseline)
    parts = [f"- {k.replace('_top1', '')} top-1: {_pct(v)}%" for k, v in s.items() if k.endswith("_top1")]
    for key, title in (("mCE", "mCE"), ("relative_mCE", "relative mCE")):
        if key in s:
            value = "n/a (the baseline makes no errors on some corruption)" if math.isnan(s[key]) else f"{_pct(s[key])}%"
            parts.append(f"- {title} vs {baseline_name}: {value}")
    return "\n".join(parts) + "\n"


def comparison(tables: Mapping[str, Sequence[Result]], baseline: Optional[str] = None,
               baseline_rows: Optional[Sequence[Result]] = None) -> Tuple[List[str], List[List[object]]]:
    """One row per model: summary metrics (fractions), CE per corruption when a baseline is given.

    ``baseline`` names one of ``tables`` (its CE is 1.0 everywhere), or pass ``baseline_rows``
    (e.g. read from an earlier run's CSV) with ``baseline`` as its display name.
    """
    if baseline_rows is None and baseline is not None:
        if baseline not in tables:
            raise ValueError(f"baseline {baseline!r} is not one of the models {list(tables)}")
        baseline_rows = tables[baseline]
    sums = {m: summary(rows, baseline_rows) for m, rows in tables.items()}
    keys: List[str] = []
    for s in sums.values():
        keys += [k for k in s if k not in keys]
    header = ["model"] + keys
    rows = [[m] + [sums[m].get(k, math.nan) for k in keys] for m in tables]
    return header, rows


def comparison_csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r[0]] + [f"{v:.6f}" if isinstance(v, float) else v for v in r[1:]])
    return out.getvalue()


def _column_title(key: str) -> str:
    if key.startswith("CE_"):
        return f"CE {key[3:]} %"
    if key.endswith("_top1"):
        return f"{key[:-5]} top-1 %"
    return {"mCE": "mCE %", "relative_mCE": "relative mCE %"}.get(key, key)


def comparison_markdown(header: Sequence[str], rows: Sequence[Sequence[object]], baseline: Optional[str] = None) -> str:
    """Markdown of :func:`comparison`: percentages; CE columns relative to ``baseline``."""
    lines = ["| " + " | ".join(_column_title(h) for h in header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    undefined = False
    for r in rows:
        cells = [str(r[0])]
        for v in r[1:]:
            nan = isinstance(v, float) and math.isnan(v)
            undefined |= nan
            cells.append("n/a" if nan else _pct(v) if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if baseline:
        lines.append("")
        lines.append(f"CE and mCE relative to {baseline} (= 100%); "
                     "relative mCE subtracts each model's clean error first.")
    if undefined:
        lines.append("n/a: undefined (the baseline makes no errors there, or the suite has no such entry).")
    return "\n".join(lines) + "\n"


__all__ = [
    "APPROX_MARK",
    "Result",
    "Table",
    "accuracy_by_severity",
    "clean_error",
    "comparison",
    "comparison_csv",
    "comparison_markdown",
    "corruption_error",
    "corruption_errors",
    "mce",
    "mean_ce",
    "mean_corruption_accuracy",
    "read_csv",
    "relative_corruption_error",
    "relative_mce",
    "summary",
    "summary_markdown",
    "to_csv",
    "to_markdown",
    "with_model",
    "write_csv",
]
