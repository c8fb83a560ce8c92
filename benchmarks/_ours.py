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
    """Host timestamps of every loop, epoch and batch.

    ``batches[stage]`` holds ``(run, dataloader_idx, images, start, end)`` where ``start`` is taken in
    ``on_<stage>_batch_start`` (the batch is fetched, moved to the device and through
    ``on_after_batch_transfer``) and ``end`` in ``on_<stage>_batch_end`` (the step returned). With
    ``sync_batches=True`` both wait for the GPU first (use it where the loop synchronises anyway, e.g. the
    feature writer's ``.cpu()``; never in training, where it would stall the pipeline). With ``"edges"`` only
    the first batch of each dataloader is synchronised (before and after it), so per-dataloader times are
    exact (see :meth:`loader_windows`) at the cost of two waits per dataloader. Epoch and loop boundaries
    always synchronise.
    """

    def __init__(self, sync_batches: Any = False) -> None:
        if sync_batches not in (True, False, "edges"):
            raise ValueError(f"sync_batches must be True, False or 'edges', got {sync_batches!r}")
        self.sync_batches = sync_batches
        self._current: Optional[Tuple[int, int]] = None
        self._edge = False
        self.marks: List[Tuple[str, float]] = []
        self.batches: Dict[str, List[Batch]] = {s: [] for s in ("train", "validation", "test", "predict")}
        self.epochs: List[Dict[str, float]] = []
        self._runs = {s: -1 for s in self.batches}
        self._start: Dict[str, float] = {}
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
    def _loop_start(self, stage: str) -> None:
        self._runs[stage] += 1
        self.mark(f"start:{stage}")

    def on_predict_start(self, trainer, pl_module):
        self._loop_start("predict")

    def on_predict_end(self, trainer, pl_module):
        self.mark("end:predict")

    def on_test_start(self, trainer, pl_module):
        self._loop_start("test")

    def on_test_end(self, trainer, pl_module):
        self.mark("end:test")

    def on_train_start(self, trainer, pl_module):
        self._loop_start("train")

    def on_train_end(self, trainer, pl_module):
        self.mark("end:train")

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
    def _batch_start(self, stage: str, dataloader_idx: int = 0) -> None:
        loader = (self._runs[stage], dataloader_idx)
        self._edge = loader != self._current
        self._current = loader
        if self.sync_batches is True or (self.sync_batches == "edges" and self._edge):
            sync()
        self._start[stage] = now()

    def _batch_end(self, stage: str, batch: Any, dataloader_idx: int) -> None:
        if self.sync_batches is True or (self.sync_batches == "edges" and self._edge):
            sync()
        self.batches[stage].append((self._runs[stage], dataloader_idx, batch_images(batch),
                                    self._start.pop(stage, float("nan")), now()))

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start("predict", dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end("predict", batch, dataloader_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start("test", dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end("test", batch, dataloader_idx)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batch_end("train", batch, 0)

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
        """Per dataloader of one loop run, for ``sync_batches="edges"``: ``wall_s`` from the synchronised start
        of its first batch (for dataloader 0: from the loop start) to the synchronised start of the next
        dataloader's first batch (for the last one: the loop end); ``img_s`` = all its images / ``wall_s``;
        ``steady_img_s`` = the images after its first batch / the time after its first batch (warm-up and
        compilation left out)."""
        rows = [b for b in self.batches[stage] if b[0] == run]
        loaders = sorted({b[1] for b in rows})
        starts = {k: min(b[3] for b in rows if b[1] == k) for k in loaders}
        ends = [starts[k] for k in loaders[1:]] + [self.all(f"end:{stage}")[run]]
        out = []
        for k, end in zip(loaders, ends):
            mine = [b for b in rows if b[1] == k]
            begin = self.all(f"start:{stage}")[run] if k == loaders[0] else starts[k]
            images = sum(b[2] for b in mine)
            later = images - mine[0][2]
            out.append({"dataloader_idx": k, "images": images, "wall_s": end - begin, "img_s": images / (end - begin),
                        "first_batch_s": mine[0][4] - begin,
                        "steady_img_s": later / (end - mine[0][4]) if later else float("nan")})
        return out

    def window(self, stage: str, run: int = 0, dataloader_idx: Optional[int] = None, skip: int = 1,
               full_only: bool = True) -> Dict[str, float]:
        """Steady-state figures of one loop run (and dataloader): the first ``skip`` batches (warm-up) and, with
        ``full_only``, a smaller last batch (a new shape, which may recompile) are left out.

        ``img_s``: images / wall time of the window (data waits included); ``step_s``: time inside the steps
        (batch start -> end); ``other_s``: the rest of the window (waiting for data, device-side batch
        preparation in ``on_after_batch_transfer``, other callbacks such as the feature writer).
        """
        rows = [b for b in self.batches[stage] if b[0] == run and (dataloader_idx is None or b[1] == dataloader_idx)]
        if full_only and len(rows) > 1 and rows[-1][2] < max(r[2] for r in rows):
            rows = rows[:-1]
        sizes, starts, ends = [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows]
        first = min(skip, max(len(rows) - 1, 0))
        if first == 0 or len(rows) <= first:
            return {"img_s": float("nan"), "images": 0, "batches": 0, "step_s": float("nan"),
                    "other_s": float("nan"), "window_s": float("nan")}
        wall = ends[-1] - ends[first - 1]
        step = sum(e - s for s, e in zip(starts[first:], ends[first:]))
        return {"img_s": window_rate(ends, sizes, first), "images": sum(sizes[first:]), "batches": len(rows) - first,
                "step_s": step, "other_s": wall - step, "window_s": wall}


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


__all__ = ["LoopTimer", "TimedCLI", "batch_images", "common_overrides", "env_info", "run_cli"]
