"""What a robustness run evaluates: a list of :class:`Perturbation` (clean, corruption x severity, attacks)."""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from lightning_app.perturb import BENCHMARK_CORRUPTIONS, CLEAN, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES

#: Attack names and their parameters with defaults (eps / alpha in [0, 1] pixel units).
ATTACK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "fgsm": {"eps": 8 / 255},
    "pgd": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "random_start": True},
}
#: The attacks of ``configs/robustness.yaml``.
DEFAULT_ATTACKS: List[Dict[str, Any]] = [
    {"name": "fgsm", "eps": "8/255"},
    {"name": "pgd", "eps": "8/255", "alpha": "2/255", "steps": 10},
]
KINDS = ("clean", "corruption", "attack")
CorruptionsArg = Union[Sequence[str], str, None]


@dataclass(frozen=True)
class Perturbation:
    """One test dataloader of a robustness run.

    ``kind``: ``clean``, ``corruption`` (``name`` from :data:`lightning_app.perturb.CORRUPTIONS`,
    ``severity`` 1..5) or ``attack`` (``name`` ``fgsm`` / ``pgd``, ``label`` unique, ``params``).
    ``exact`` is False for corruptions that are approximations (snow, frost).
    """

    kind: str
    name: str
    severity: int = 0
    label: str = ""
    params: Tuple[Tuple[str, Any], ...] = field(default_factory=tuple)
    exact: bool = True

    @property
    def key(self) -> str:
        """Unique, metric-name friendly id: ``clean``, ``gaussian_noise_s3``, ``pgd``."""
        if self.kind == "corruption":
            return f"{self.name}_s{self.severity}"
        return self.label or self.name

    @property
    def kwargs(self) -> Dict[str, Any]:
        """Attack parameters as keyword arguments."""
        return dict(self.params)

    def describe_params(self) -> str:
        """``eps=8/255 alpha=2/255 steps=10`` (fractions of 255 where exact)."""
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.params)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        n = v * 255
        return f"{round(n)}/255" if abs(n - round(n)) < 1e-9 else f"{v:.6g}"
    return str(v)


def parse_number(value: Any, what: str) -> float:
    """A float from a number or a fraction string such as ``"8/255"`` (YAML does not evaluate ``8/255``)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    raise ValueError(f"{what} must be a number or a fraction like '8/255', got {value!r}")


def resolve_corruptions(corruptions: CorruptionsArg) -> List[str]:
    """``None`` / ``"benchmark"``: the 15 ImageNet-C benchmark corruptions; ``"all"``: those plus the
    extras; a list: those names (checked)."""
    if corruptions is None or corruptions == "benchmark":
        return list(BENCHMARK_CORRUPTIONS)
    if corruptions == "all":
        return list(BENCHMARK_CORRUPTIONS) + list(EXTRA_CORRUPTIONS)
    if isinstance(corruptions, str):
        corruptions = [corruptions]
    names = list(corruptions)
    for n in names:
        if n not in CORRUPTIONS:
            raise ValueError(
                f"unknown corruption {n!r}; known: {', '.join(CORRUPTIONS)} (or 'benchmark' / 'all' for the whole list)"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"corruptions listed twice: {names}")
    return names


def parse_attack(spec: Mapping[str, Any]) -> Perturbation:
    """``{"name": "pgd", "eps": "8/255", "alpha": "2/255", "steps": 10, "label": "pgd10"}`` -> Perturbation."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"an attack is a mapping with a 'name' ({' / '.join(ATTACK_DEFAULTS)}), got {spec!r}")
    name = str(spec["name"]).lower()
    if name not in ATTACK_DEFAULTS:
        raise ValueError(f"unknown attack {spec['name']!r}; known: {', '.join(ATTACK_DEFAULTS)}")
    params = dict(ATTACK_DEFAULTS[name])
    for k, v in spec.items():
        if k in ("name", "label"):
            continue
        if k not in params:
            raise ValueError(f"attack {name!r} has no parameter {k!r}; its parameters: {', '.join(params)}")
        params[k] = v
    for k in ("eps", "alpha"):
        if k in params:
            params[k] = parse_number(params[k], f"{name}.{k}")
            if params[k] < 0 or (k == "alpha" and params[k] == 0):
                raise ValueError(f"{name}.{k} must be {'> 0' if k == 'alpha' else '>= 0'}, got {params[k]}")
    if "steps" in params:
        steps = params["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{name}.steps must be an int >= 0, got {steps!r}")
    if "random_start" in params:
        params["random_start"] = bool(params["random_start"])
    label = str(spec.get("label") or name)
    return Perturbation("attack", name, 0, label, tuple(params.items()))


def build_suite(
    corruptions: CorruptionsArg = None,
    severities: Sequence[int] = SEVERITIES,
    attacks: Optional[Sequence[Mapping[str, Any]]] = None,
    clean: bool = True,
) -> List[Perturbation]:
    """Clean first, then every corruption at every severity (corruption-major), then the attacks."""
    names = resolve_corruptions(corruptions)
    sevs = list(severities)
    for s in sevs:
        if isinstance(s, bool) or not isinstance(s, int) or s not in SEVERITIES:
            raise ValueError(f"severities must be ints in 1..5, got {sevs}")
    if len(set(sevs)) != len(sevs):
        raise ValueError(f"severities listed twice: {sevs}")
    out: List[Perturbation] = [Perturbation("clean", CLEAN, label=CLEAN)] if clean else []
    out += [Perturbation("corruption", n, s, exact=CORRUPTIONS[n].exact) for n in names for s in sorted(sevs)]
    out += [parse_attack(a) for a in (attacks or [])]
    keys = [p.key for p in out]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"perturbation names must be unique, {dupes} repeat: give repeated attacks a 'label'")
    if not out:
        raise ValueError("nothing to evaluate: no clean loader, corruptions or attacks")
    return out


__all__ = [
    "ATTACK_DEFAULTS",
    "DEFAULT_ATTACKS",
    "Perturbation",
    "build_suite",
    "parse_attack",
    "parse_number",
    "resolve_corruptions",
]
