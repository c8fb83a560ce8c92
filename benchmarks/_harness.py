"""Driver side of the benchmarks: workers in subprocesses, offline data, results as a table and JSON.

Every measurement runs in its own subprocess (a *worker*): Keras needs ``KERAS_BACKEND`` set before it is
imported, TensorFlow and torch must not share a process, and a crash or a hang of one runner must not cost
the rows already measured. A worker is ``python <script> --worker <spec.json>``; the spec names the job and
the file the worker writes its result to. This module imports neither torch nor Keras.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import pickle
import platform
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: runner names, in table order
OURS, KERAS_JAX, KERAS_TF = "ours", "keras-jax", "keras-tensorflow"
KERAS_RUNNERS = {"jax": KERAS_JAX, "tensorflow": KERAS_TF}
LABELS = {OURS: "ours", KERAS_JAX: "Keras-JAX", KERAS_TF: "Keras-TF"}


def use_checkout() -> None:
    """Import ``lightning_app`` from this checkout (not from an installed copy elsewhere)."""
    for p in (str(HERE), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)


# ----------------------------------------------------------------------------- workers
def worker_main(jobs: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]], argv: Sequence[str]) -> bool:
    """If ``argv`` is ``--worker SPEC``: run ``jobs[spec["job"]](spec)``, write its result to ``spec["out"]``
    and return True (the caller exits); otherwise return False."""
    if len(argv) < 2 or argv[0] != "--worker":
        return False
    spec = json.loads(Path(argv[1]).read_text())
    sys.argv = sys.argv[:1]  # LightningCLI(args=...) warns when the process has command-line arguments too
    try:
        result = jobs[spec["job"]](spec)
    except BaseException as err:  # report, do not hide: the driver prints it in the table's notes
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    _write_json(Path(spec["out"]), result)
    return True


def run_worker(script: Path, spec: Dict[str, Any], workdir: Path, env: Optional[Dict[str, str]] = None,
               timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run ``script --worker`` on ``spec`` in a subprocess (cwd = repository root); return its result, or
    ``{"error": ...}`` with the end of its log when it failed, crashed or ran past ``timeout`` seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{spec['job']}-{spec.get('runner', '')}-{spec.get('model', '')}".strip("-").replace("/", "_")
    spec = dict(spec, out=str(workdir / f"{tag}.result.json"))
    spec_path, log_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.log"
    _write_json(spec_path, spec)
    Path(spec["out"]).unlink(missing_ok=True)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), "--worker", str(spec_path)], cwd=ROOT, env=full_env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return {"error": f"timed out after {timeout:.0f} s (log: {log_path})", "log_tail": _tail(log_path)}
    out = Path(spec["out"])
    if not out.is_file():
        return {"error": f"worker exited with code {proc.returncode} and no result (log: {log_path})",
                "log_tail": _tail(log_path)}
    result = json.loads(out.read_text())
    if "error" in result:
        result["log"] = str(log_path)
    return result


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically (a run cut short never leaves a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# ----------------------------------------------------------------------------- environment
def cuda_available() -> bool:
    """Whether torch sees a GPU (the driver imports torch, never TensorFlow)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def keras_backends(requested: Sequence[str], results: "Results") -> List[str]:
    """The requested Keras backends that are installed (a note for each one skipped)."""
    out = []
    if importlib.util.find_spec("keras") is None:
        results.note("Keras is not installed: no Keras columns (pip install -e '.[bench]').")
        return out
    for b in requested:
        if importlib.util.find_spec(b) is None:
            results.note(f"Keras-{'TF' if b == 'tensorflow' else b.upper()} skipped: {b} is not installed here"
                         + (" (the GPU machine has no TensorFlow wheel: the GPU reference is Keras-JAX)"
                            if b == "tensorflow" else "") + ".")
            continue
        out.append(b)
    return out


def keras_model_spec(entry: Any) -> Dict[str, Any]:
    """What a Keras runner needs to build and feed a zoo model (a ``lightning_app.zoo`` registry entry): its
    ``keras.applications`` name, native size, ``preprocess_input`` mode, and for models that normalise inside
    (EfficientNet, MobileNetV3, ConvNeXt: ``builtin_preprocessing``, fed 0..255 as they are) the mean / std their
    built-in Normalization layer must hold (a ``weights=None`` build leaves it at 0 / 1)."""
    return {"model": entry.keras_name, "application": entry.application, "keras_kwargs": dict(entry.keras_kwargs),
            "size": entry.input_size, "mode": entry.mode,
            "builtin_preprocessing": bool(entry.builtin_preprocessing), "mean": list(entry.mean), "std": list(entry.std)}


def keras_env(backend: str) -> Dict[str, str]:
    """Environment of a Keras worker: the backend fixed before Keras is imported."""
    return {"KERAS_BACKEND": backend}


def keras_policy(arg: str, device: str, ours_bf16: bool = False) -> str:
    """``auto``: ``mixed_bfloat16`` on a GPU and wherever ours runs bf16 (``ours_bf16``: e.g. the inference engine
    on a CPU with native bf16), else ``float32`` (ours training on a CPU); ``best`` is :func:`keras_policies`'
    (feature extraction's)."""
    if arg == "best":
        raise SystemExit("--keras-policy best runs Keras in both policies and keeps its faster one; only "
                         "extract.py has it (here choose float32 or mixed_bfloat16)")
    if arg != "auto":
        return arg
    return "mixed_bfloat16" if device == "cuda" or ours_bf16 else "float32"


def engine_runs_bf16(config: Path, device: str) -> bool:
    """Whether ours' inference engine runs bf16 with ``config`` (its ``model.inference``) on ``device`` (``auto``:
    where the device computes bf16 natively)."""
    from lightning_app.engine import as_inference_options

    options = as_inference_options(config_value(config, "model", "inference", default=None))
    return options.enabled and options.effective_precision(device) == "bf16"


def keras_policies(arg: str, device: str, ours_bf16: bool) -> List[str]:
    """The Keras dtype policies to run, Keras keeping its fastest: ``best``: float32 and ``mixed_bfloat16``;
    ``auto``: ``mixed_bfloat16`` on a GPU, and on the CPU float32 plus, where ours runs bf16 there (a CPU with
    native bf16, the inference engine's default), ``mixed_bfloat16`` too (Keras at its best: its bf16 need not be
    faster on a CPU; measured on the Zen 5 box, it was not)."""
    if arg == "best" or (arg == "auto" and device != "cuda" and ours_bf16):
        return ["float32", "mixed_bfloat16"]
    return [keras_policy(arg, device)]


def check_precision(results: "Results", what: str, ours_precision: Any, policy: Union[str, Sequence[str]]) -> None:
    """A note when ours and Keras did not compute in the same precision class (bf16 vs float32); ``policy``: the
    Keras policy, or the policies Keras ran (it kept its faster)."""
    if ours_precision is None:
        return
    policies = [policy] if isinstance(policy, str) else list(policy)
    if ("mixed_bfloat16" if "bf16" in str(ours_precision) else "float32") not in policies:
        results.note(f"{what}: ours ran {ours_precision}, Keras {' / '.join(policies)}: not the same precision "
                     "(set --keras-policy to match)")


def load_average() -> str:
    """1-minute load average (a quiet machine has about 0; each busy core adds 1)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def host_info() -> Dict[str, Any]:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "load_average_at_start": load_average()}


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags every benchmark has."""
    p.add_argument("--keras", nargs="*", default=["jax", "tensorflow"], choices=["jax", "tensorflow"],
                   help="Keras backends to compare against (installed ones; none: ours only)")
    p.add_argument("--keras-policy", default="auto", choices=["auto", "float32", "mixed_bfloat16", "best"],
                   help="Keras dtype policy (auto: mixed_bfloat16 on GPU, float32 on CPU; extract.py: both on a CPU "
                        "where ours runs bf16, and best: both anywhere, Keras keeping its faster)")
    p.add_argument("--tf-jit", default="auto", choices=["auto", "true", "false"],
                   help="Keras-TF jit_compile (auto is Keras's own choice: XLA on GPU, not on CPU); JAX always jits")
    p.add_argument("--json", type=Path, default=None, help="write results here as they come")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker before it is stopped")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, logs and specs here (default: a temp dir)")


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``) into SystemExit, so the driver still prints its table of finished rows."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def workdir(arg: Optional[Path], name: str) -> Tuple[Path, Optional[tempfile.TemporaryDirectory]]:
    if arg is not None:
        arg.mkdir(parents=True, exist_ok=True)
        return arg.resolve(), None
    tmp = tempfile.TemporaryDirectory(prefix=f"bench-{name}-")
    return Path(tmp.name), tmp


# ----------------------------------------------------------------------------- results
class Results:
    """Rows (one per runner and case), notes and environment; the JSON file is rewritten after every change."""

    def __init__(self, name: str, path: Optional[Path], config: Dict[str, Any]) -> None:
        self.path = path
        self.doc: Dict[str, Any] = {"benchmark": name, "host": host_info(), "config": config, "env": {},
                                    "rows": [], "notes": []}
        self._save()

    @property
    def rows(self) -> List[Dict[str, Any]]:
        return self.doc["rows"]

    def add(self, row: Dict[str, Any]) -> Dict[str, Any]:
        env = row.pop("env", None)
        if env:
            self.doc["env"][row.get("runner", "?")] = env
        self.rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if not isinstance(v, (list, dict)) and k not in ("traceback", "log_tail")}
        print("row:", json.dumps(shown), flush=True)
        if "error" in row:
            print(row.get("log_tail", "") or row.get("traceback", ""), file=sys.stderr, flush=True)
        self._save()
        return row

    def note(self, text: str) -> None:
        if text not in self.doc["notes"]:
            self.doc["notes"].append(text)
            print("note:", text, flush=True)
            self._save()

    def find(self, runner: str, **match: Any) -> Optional[Dict[str, Any]]:
        for r in self.rows:
            if r.get("runner") == runner and all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(self.path, self.doc)

    def print_table(self, title: str, keys: Sequence[str], metric: str, unit: str, higher_is_better: bool,
                    extra: Sequence[Tuple[str, str, str, str]] = ()) -> None:
        """Markdown table: one line per case (``keys``), ``metric`` per runner, speed-up of ours per Keras backend.

        ``extra``: (header, runner, field, format) columns appended at the end.
        """
        runners = [r for r in (OURS, KERAS_JAX, KERAS_TF) if any(x.get("runner") == r for x in self.rows)]
        refs = [r for r in runners if r != OURS]
        cases: List[Tuple[Any, ...]] = []
        for r in self.rows:
            case = tuple(r.get(k) for k in keys)
            if case not in cases:
                cases.append(case)
        head = [*keys] + [f"{LABELS[r]} {unit}" for r in runners] + [f"ours vs {LABELS[r]}" for r in refs]
        head += [h for h, *_ in extra]
        lines = [f"\n### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for case in cases:
            match = dict(zip(keys, case))
            cells = [str(c) for c in case]
            values = {}
            for runner in runners:
                row = self.find(runner, **match)
                values[runner] = _num(row, metric)
                cells.append(_fmt(values[runner]) if row and "error" not in row else ("failed" if row else "-"))
            for ref in refs:
                a, b = values.get(OURS), values.get(ref)
                ok = a is not None and b is not None and a > 0 and b > 0
                cells.append(f"{(a / b if higher_is_better else b / a):.2f}x" if ok else "-")
            for _, runner, field, fmt in extra:
                cells.append(_cell(self.find(runner, **match), field, fmt))
            lines.append("| " + " | ".join(cells) + " |")
        speed = "higher is faster" if higher_is_better else "lower is faster"
        lines.append(f"\n{metric} in {unit} ({speed}); 'ours vs X' is the speed-up of ours over X (> 1: ours faster). "
                     f"Load average {self.doc['host']['load_average_at_start']} at the start, {load_average()} at "
                     f"the end ({self.doc['host']['cpus']} CPUs).")
        for n in self.doc["notes"]:
            lines.append(f"- {n}")
        text = "\n".join(lines)
        print(text, flush=True)
        self.doc.setdefault("tables", {})[title] = text
        self._save()


def _num(row: Optional[Dict[str, Any]], field: str) -> Optional[float]:
    if not row or "error" in row:
        return None
    v = row.get(field)
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    return None


def _cell(row: Optional[Dict[str, Any]], field: str, fmt: str) -> str:
    if not row or "error" in row or row.get(field) is None:
        return "-"
    v = row[field]
    if isinstance(v, str):
        return v
    n = _num(row, field)
    return format(n, fmt) if n is not None else "-"


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def best_round(rows: List[Dict[str, Any]], metric: str, higher_is_better: bool) -> Dict[str, Any]:
    """The round with the best ``metric`` (a failed round only if every round failed), with every round's value
    in ``rounds_<metric>`` when there were several (``--rounds``: runners alternate, so a slow spell of a shared or
    virtual machine hits each of them alike, and each reports its fastest round, as ``timeit`` does)."""
    ok = [r for r in rows if "error" not in r and r.get(metric) is not None]
    if not ok:
        return rows[-1]
    best = dict((max if higher_is_better else min)(ok, key=lambda r: r[metric]))
    if len(rows) > 1:
        best[f"rounds_{metric}"] = [r.get(metric) for r in rows]
    return best


def rel_diff(ours: Iterable, ref: Iterable) -> float:
    """max |ours - ref| / max |ref| (the sanity guard when both sides ran the same weights on the same images)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------- offline data
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
           "cat", "stereo_motorcycle")


def photo_crops(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct uint8 ``[size, size, 3]`` crops (random position and scale, random flip) of the RGB
    photographs bundled with scikit-image: real-image statistics, offline."""
    from PIL import Image
    from skimage import data

    photos = []
    for name in _PHOTOS:
        img = getattr(data, name)()
        img = img[0] if isinstance(img, tuple) else img
        photos.append(Image.fromarray(np.ascontiguousarray(img[..., :3])))
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        s = int(min(w, h) * rng.uniform(0.25, 1.0))
        left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
        arr = np.asarray(crop)
        out[i] = arr[:, ::-1] if rng.random() < 0.5 else arr
    return out


def tiled(pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` images cycling through ``pool``."""
    return pool[np.arange(n) % len(pool)]


def write_cifar10(root: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray) -> Path:
    """Write ``root/cifar-10-batches-py`` in the official python-pickle format (5 train batches + test)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        entry = {"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1)),
                 "labels": [int(v) for v in y]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=4)

    for i, idx in enumerate(np.array_split(np.arange(len(x_train)), 5), 1):
        dump(f"data_batch_{i}", x_train[idx], y_train[idx])
    dump("test_batch", x_test, y_test)
    return root


def read_cifar10_train(root: Path) -> Tuple[np.ndarray, np.ndarray]:
    """What a Keras user does with the files: the five training batches as uint8 ``[N, 32, 32, 3]``, labels."""
    xs, ys = [], []
    for i in range(1, 6):
        with open(root / "cifar-10-batches-py" / f"data_batch_{i}", "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(entry["labels"], np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def class_names(images: int, per_class: int = 2) -> List[str]:
    """Names of 10 classes (fewer for tiny runs: every class folder needs ``per_class`` images)."""
    return [f"class{i}" for i in range(min(10, max(2, images // per_class)))]


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                       quality: int = 90) -> Path:
    """``root/<class>/<i>.jpg`` (Keras ``image_dataset_from_directory`` layout)."""
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / classes[int(y)] / f"{i:06d}.jpg", quality=quality)
    return root


def read_image_folder(root: Path, classes: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Decode every image of ``root/<class>/`` (sorted) into one uint8 array (all the same size)."""
    from PIL import Image

    xs, ys = [], []
    for label, c in enumerate(classes):
        for path in sorted((root / c).iterdir()):
            with Image.open(path) as img:
                xs.append(np.asarray(img.convert("RGB")))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, np.int64)


def config_value(config: Path, *keys: str, default: Any = None) -> Any:
    """A value from a YAML config (``config_value(path, "data", "init_args", "batch_size")``)."""
    import yaml

    node: Any = yaml.safe_load(Path(config).read_text())
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node if node is not None else default


__all__ = [
    "KERAS_JAX", "KERAS_RUNNERS", "KERAS_TF", "OURS", "ROOT", "Results", "add_common_args", "class_names",
    "check_precision", "config_value", "exit_on_sigterm",
    "cuda_available", "engine_runs_bf16", "keras_backends", "keras_env", "keras_model_spec", "keras_policies",
    "keras_policy", "photo_crops", "read_cifar10_train",
    "read_image_folder", "rel_diff", "run_worker", "tiled", "use_checkout", "worker_main", "workdir",
    "write_cifar10", "write_image_folder",
]
