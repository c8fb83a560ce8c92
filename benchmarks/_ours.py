"""Our side of the benchmarks: the CLI exactly as ``python -m lightning_app`` builds and runs it, plus a timer.

:class:`TimedCLI` is :class:`lightning_app.cli.TransferCLI` with one extra callback (:class:`LoopTimer`, first in
the Trainer's list, so its epoch-end hook runs before checkpointing), an optional hook called at the start of
``before_fit`` and optionally without named configured callbacks. Nothing else differs: configs, defaults,
precision, data loading, feature cache and every optimisation the product ships are those of
``python -m lightning_app <subcommand> --config ...``.
"""
from __future__ import annotations

import os
import platform
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch

from _timing import now, sync, window_rate
from lightning_app.cli import TransferCLI

Batch = Tuple[int, int, int, float, float]  # (loop run, dataloader_idx, images, start, end)


def batch_images(batch: Any) -> int:
    """Images (rows) in a batch ``(x, y, ...)``, a list of such mini-batches, or a feature chunk
    (:class:`lightning_app.data.feature_loader.FeatureChunk`: the rows of ``steps_per_execution`` mini-batches)."""
    if hasattr(batch, "batch_sizes"):
        return len(batch)
    if isinstance(batch, (list, tuple)) and batch:
        if isinstance(batch[0], torch.Tensor) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
            return int(batch[1].shape[0])
        if isinstance(batch[0], torch.Tensor):
            return int(batch[0].shape[0])
        return sum(batch_images(b) for b in batch)
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return 0


class LoopTimer(pl.Callback):
    """Timestamps of every loop, epoch and batch, without adding any wait for the device inside a loop.

    ``batches[stage]`` holds ``(run, dataloader_idx, images, start, end)``: ``start`` is taken in
    ``on_<stage>_batch_start`` (the batch is fetched, on the device, through ``on_after_batch_transfer``),
    ``end`` in ``on_<stage>_batch_end`` (the step returned). When the module runs on a CUDA device both are
    CUDA events recorded on the current stream, turned into seconds on the host clock when the loop ends
    (origin: the loop start, where the device is idle): they say when the *device* got there, so a step's
    interval is its device time and the gaps between steps are the device waiting for data, with no
    synchronisation inside the loop. On the CPU everything is synchronous and they are host times. ``host[stage]``
    holds the host clock at the same two points (on a GPU the step's host time is its launch time: close to its
    device time means the step is launch-bound). Loop, epoch and validation boundaries synchronise. ``sync_batches=True`` also waits for the device at every
    batch start and end (costs the pipeline its overlap; for checks only).
    """

    def __init__(self, sync_batches: bool = False) -> None:
        self.sync_batches = bool(sync_batches)
        self.marks: List[Tuple[str, float]] = []
        self.batches: Dict[str, List[Batch]] = {s: [] for s in ("train", "validation", "test", "predict")}
        self.host: Dict[str, List[Tuple[float, float]]] = {s: [] for s in self.batches}  # host (start, end)
        self.epochs: List[Dict[str, float]] = []
        self._runs = {s: -1 for s in self.batches}
        self._start: Dict[str, Any] = {}
        self._ref: Dict[Tuple[str, int], Tuple[float, Any]] = {}  # (stage, run) -> (host time, CUDA event)
        self._cuda = False  # the running loop's module is on a CUDA device: stamp batches with CUDA events
        self._val_start: Optional[float] = None

    # -- marks
    def mark(self, name: str) -> float:
        sync()
        t = now()
        self.marks.append((name, t))
        return t

    def first(self, name: str) -> Optional[float]:
        return next((t for n, t in self.marks if n == name), None)

    def all(self, name: str) -> List[float]:
        return [t for n, t in self.marks if n == name]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.mark(f"setup:{getattr(stage, 'value', stage)}")  # a str enum: its str() is 'TrainerFn.FITTING'

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.mark(f"teardown:{getattr(stage, 'value', stage)}")

    # -- loops
    def _loop_start(self, stage: str, pl_module: pl.LightningModule) -> None:
        self._runs[stage] += 1
        t = self.mark(f"start:{stage}")
        event = None
        if _on_cuda(pl_module):  # the device is idle here (mark() waited): this event is the clock's origin
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._ref[(stage, self._runs[stage])] = (t, event)
        self._cuda = event is not None

    def _loop_end(self, stage: str) -> None:
        self.mark(f"end:{stage}")
        self._resolve(stage)

    def _resolve(self, stage: str) -> None:
        """Turn recorded CUDA events into host-clock seconds (after the device finished them)."""
        rows = self.batches[stage]
        if not any(isinstance(r[3], torch.cuda.Event) or isinstance(r[4], torch.cuda.Event) for r in rows):
            return
        sync()
        for i, (run, dl, n, start, end) in enumerate(rows):
            t0, ref = self._ref[(stage, run)]
            conv = [t0 + ref.elapsed_time(e) / 1e3 if isinstance(e, torch.cuda.Event) else e for e in (start, end)]
            rows[i] = (run, dl, n, conv[0], conv[1])

    def on_predict_start(self, trainer, pl_module):
        self._loop_start("predict", pl_module)

    def on_predict_end(self, trainer, pl_module):
        self._loop_end("predict")

    def on_test_start(self, trainer, pl_module):
        self._loop_start("test", pl_module)

    def on_test_end(self, trainer, pl_module):
        self._loop_end("test")

    def on_train_start(self, trainer, pl_module):
        self._loop_start("train", pl_module)

    def on_train_end(self, trainer, pl_module):
        self._loop_end("train")

    # -- epochs (training), validation time inside them
    def on_train_epoch_start(self, trainer, pl_module):
        sync()
        self.epochs.append({"start": now(), "val_s": 0.0})

    def on_train_epoch_end(self, trainer, pl_module):
        sync()
        if self.epochs:
            self.epochs[-1]["end"] = now()

    def on_validation_start(self, trainer, pl_module):
        sync()
        self._val_start = now()

    def on_validation_end(self, trainer, pl_module):
        sync()
        if self._val_start is not None and self.epochs and "end" not in self.epochs[-1]:
            self.epochs[-1]["val_s"] += now() - self._val_start
        self._val_start = None

    # -- batches
    def _stamp(self, pl_module: pl.LightningModule) -> Any:
        if self.sync_batches:
            sync()
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return now()

    def _batch_start(self, stage: str, pl_module: pl.LightningModule) -> None:
        self._start[stage] = (self._stamp(pl_module), now())

    def _batch_end(self, stage: str, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> None:
        end, host_end = self._stamp(pl_module), now()
        start, host_start = self._start.pop(stage, (float("nan"), float("nan")))
        self.batches[stage].append((self._runs[stage], dataloader_idx, batch_images(batch), start, end))
        self.host[stage].append((host_start, host_end))

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start("predict", pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end("predict", pl_module, batch, dataloader_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start("test", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end("test", pl_module, batch, dataloader_idx)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start("train", pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batch_end("train", pl_module, batch, 0)

    # -- summaries
    def epoch_train_seconds(self) -> List[float]:
        """Seconds of each finished training epoch, validation excluded."""
        return [e["end"] - e["start"] - e["val_s"] for e in self.epochs if "end" in e]

    def between_epochs_seconds(self) -> List[float]:
        """Seconds from the end of each epoch (``on_train_epoch_end`` of this callback, which runs first) to the
        start of the next: the other callbacks' epoch-end work (checkpointing, reports) and the loop's own."""
        done = [e for e in self.epochs if "end" in e]
        return [b["start"] - a["end"] for a, b in zip(done, done[1:])]

    def loader_windows(self, stage: str, run: int = 0) -> List[Dict[str, float]]:
        """Per dataloader of one loop run: ``wall_s`` from the end of the previous dataloader's last batch (for the
        first: the loop start) to the end of its own last batch; ``img_s`` = its images / ``wall_s``;
        ``first_batch_s`` up to the end of its first batch; ``steady_img_s`` = the images after its first batch /
        the time after it (warm-up and compilation left out)."""
        self._resolve(stage)
        rows = [b for b in self.batches[stage] if b[0] == run]
        out: List[Dict[str, float]] = []
        begin = self.all(f"start:{stage}")[run]
        for k in sorted({b[1] for b in rows}):
            mine = [b for b in rows if b[1] == k]
            end, images = mine[-1][4], sum(b[2] for b in mine)
            later = images - mine[0][2]
            out.append({"dataloader_idx": k, "images": images, "wall_s": end - begin, "img_s": images / (end - begin),
                        "first_batch_s": mine[0][4] - begin,
                        "steady_img_s": later / (end - mine[0][4]) if later else float("nan")})
            begin = end
        return out

    def window(self, stage: str, run: int = 0, dataloader_idx: Optional[int] = None, skip: int = 1,
               full_only: bool = True) -> Dict[str, float]:
        """Steady-state figures of one loop run (and dataloader): the first ``skip`` batches (warm-up) and, with
        ``full_only``, a smaller last batch (a new shape, which may recompile) are left out.

        ``img_s``: images / wall time of the window (data waits included); ``step_s``: time inside the steps
        (batch start -> end; device time on a GPU); ``other_s``: the rest of the window (waiting for data,
        device-side batch preparation in ``on_after_batch_transfer``, other callbacks such as the feature writer).
        ``host_step_s`` / ``host_other_s``: the same split on the host clock (on a GPU, where the host runs ahead
        of the device, the host's own work: launching the steps, and everything between them).
        """
        self._resolve(stage)
        keep = [i for i, b in enumerate(self.batches[stage])
                if b[0] == run and (dataloader_idx is None or b[1] == dataloader_idx)]
        rows = [self.batches[stage][i] for i in keep]
        host = [self.host[stage][i] for i in keep]
        if full_only and len(rows) > 1 and rows[-1][2] < max(r[2] for r in rows):
            rows, host = rows[:-1], host[:-1]
        sizes, starts, ends = [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows]
        first = min(skip, max(len(rows) - 1, 0))
        if first == 0 or len(rows) <= first:
            return {"img_s": float("nan"), "images": 0, "batches": 0, "step_s": float("nan"),
                    "other_s": float("nan"), "window_s": float("nan")}
        wall = ends[-1] - ends[first - 1]
        step = sum(e - s for s, e in zip(starts[first:], ends[first:]))
        out = {"img_s": window_rate(ends, sizes, first), "images": sum(sizes[first:]), "batches": len(rows) - first,
               "step_s": step, "other_s": wall - step, "window_s": wall}
        out["host_step_s"] = sum(e - s for s, e in host[first:])
        out["host_other_s"] = host[-1][1] - host[first - 1][1] - out["host_step_s"]
        return out


class BatchProfiler(pl.Callback):
    """``torch.profiler`` over ``batches`` predict batches of loop run ``run`` (0: the first ``trainer.predict``;
    extraction's train split, whose steady window the benchmarks time, is run 0, so the default profiles the val
    split's run 1 and leaves the timed window alone), after its first ``skip`` batches: from the end of batch
    ``skip - 1`` to the end of the last profiled batch, so each profiled batch's data fetch is in. Host activity and,
    on a GPU, the device's. :attr:`summary` (after the loop) says per batch where the host's and the device's time
    went (:func:`profile_summary`); ``None`` if the run had no batch past ``skip``, ``{"error": ...}`` if the
    profiler failed (the run goes on)."""

    def __init__(self, batches: int, run: int = 1, skip: int = 1, top: int = 12) -> None:
        self.batches, self.run, self.skip, self.top = int(batches), int(run), max(1, int(skip)), int(top)
        self.summary: Optional[Dict[str, Any]] = None
        self._runs = -1
        self._prof: Any = None
        self._count = 0
        self._start = 0.0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._runs += 1

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._runs != self.run or self.summary is not None:
            return
        if self._prof is not None:
            self._count += 1
            if self._count >= self.batches:
                self._stop(pl_module)
        elif batch_idx == self.skip - 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if _on_cuda(pl_module):
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            sync()
            try:  # a profiler that cannot start (e.g. CUPTI busy) costs the profile, never the run
                prof = torch.profiler.profile(activities=activities)
                prof.__enter__()
            except Exception as err:  # noqa: BLE001 - reported in the row
                self.summary = {"error": f"{type(err).__name__}: {err}"}
                return
            self._prof, self._start = prof, now()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._prof is not None:
            self._stop(pl_module)

    def _stop(self, pl_module: pl.LightningModule) -> None:
        sync()
        wall = now() - self._start
        prof, self._prof = self._prof, None
        try:
            prof.__exit__(None, None, None)
            if self._count:
                self.summary = profile_summary(prof, self._count, wall, self.top)
        except Exception as err:  # noqa: BLE001 - reported in the row
            self.summary = {"error": f"{type(err).__name__}: {err}"}


def profile_summary(prof: Any, batches: int, wall_s: float, top: int = 12) -> Dict[str, Any]:
    """Per batch: the profiled wall time, the host's and the device's summed self times, and the ``top``
    operations by self time on each (aten operations; CUDA runtime calls such as kernel launches, copies,
    pinned-memory allocation and synchronisation; kernels on the device), from a finished ``torch.profiler``."""
    rows = [(e.key, e.count, float(e.self_cpu_time_total), float(e.self_device_time_total))
            for e in prof.key_averages()]

    def per_batch(us: float) -> float:
        return round(us / 1e3 / batches, 4)

    def ops(col: int) -> List[Dict[str, Any]]:
        chosen = sorted((r for r in rows if r[col] > 0), key=lambda r: -r[col])[:top]
        return [{"op": r[0], "calls_per_batch": round(r[1] / batches, 2), "self_ms_per_batch": per_batch(r[col])}
                for r in chosen]

    return {"batches": batches, "wall_ms_per_batch": round(1e3 * wall_s / batches, 4),
            "host_ms_per_batch": per_batch(sum(r[2] for r in rows)),
            "device_ms_per_batch": per_batch(sum(r[3] for r in rows)),
            "host_ops": ops(2), "device_ops": ops(3)}


def _on_cuda(pl_module: pl.LightningModule) -> bool:
    return pl_module is not None and pl_module.device.type == "cuda"


class TimedCLI(TransferCLI):
    """``TransferCLI`` + :class:`LoopTimer` (see the module docstring)."""

    def __init__(self, args: Sequence[str], timer: LoopTimer,
                 before_fit_hook: Optional[Callable[["TimedCLI"], None]] = None,
                 drop_callbacks: Sequence[str] = ()) -> None:
        self.timer = timer
        self._before_fit_hook = before_fit_hook
        self._drop = tuple(drop_callbacks)
        super().__init__(args=[str(a) for a in args])

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks[:] = [cb for cb in trainer.callbacks if type(cb).__name__ not in self._drop]
        trainer.callbacks.insert(0, self.timer)
        return trainer

    def before_fit(self) -> None:
        if self._before_fit_hook is not None:
            self._before_fit_hook(self)
        self.timer.mark("before_fit")
        super().before_fit()


def run_cli(args: Sequence[str], sync_batches: Any = False,
            before_fit_hook: Optional[Callable[[TimedCLI], None]] = None,
            drop_callbacks: Sequence[str] = ()) -> Tuple[TimedCLI, LoopTimer]:
    """Run ``python -m lightning_app <args>`` in this process with a :class:`LoopTimer` (and without the configured
    callbacks whose class names are in ``drop_callbacks``)."""
    timer = LoopTimer(sync_batches=sync_batches)
    timer.mark("cli")
    cli = TimedCLI(args, timer, before_fit_hook, drop_callbacks)
    timer.mark("done")
    return cli, timer


def env_info(trainer: Optional[pl.Trainer] = None) -> Dict[str, Any]:
    """torch / Lightning versions, threads, device and the precision the Trainer ran with."""
    info: Dict[str, Any] = {"torch": torch.__version__, "lightning": pl.__version__, "threads": torch.get_num_threads(),
                            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if trainer is not None:
        info["precision"] = str(trainer.precision)
        info["accelerator"] = type(trainer.accelerator).__name__.replace("Accelerator", "").lower()
    return info


def common_overrides(run_dir: str) -> List[str]:
    """Keep every file a benchmark run writes (logs, checkpoints, reports) under ``run_dir``; no progress bar."""
    return ["--trainer.default_root_dir", run_dir, "--trainer.logger.init_args.save_dir", run_dir,
            "--trainer.enable_progress_bar", "false"]


__all__ = ["BatchProfiler", "LoopTimer", "TimedCLI", "batch_images", "common_overrides", "env_info",
           "profile_summary", "run_cli"]
