"""Per-run reports: learning curves, confusion matrix, a grid of test predictions, prediction CSVs.

Everything is drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend change, no display needed) and written atomically (temporary file + ``os.replace``).

:class:`TrainingReport` (a callback) writes into ``<log_dir>/reports/``:

* ``history.csv`` (rewritten each epoch) and ``curves.png`` (redrawn at most every ``curves_every_s`` seconds, and
  at the end of training: drawing costs ~0.7 s of CPU, ~8 % of the quickstart when done every epoch):
  train / val loss and accuracy per epoch, with
  per epoch its wall time (``epoch_time_s``: training and validation), the training throughput
  (``train_images_per_s``: images of all ranks over the training part of the epoch) and, with a
  :class:`~lightning_app.finetune.LayerwiseUnfreezing` callback, the number of backbone layer groups
  trainable (``unfrozen_groups``); the curves mark the epochs where more groups were unfrozen;
* at test: ``confusion_matrix.csv`` / ``.png`` and ``test_predictions.png`` (images with predicted
  and true labels, wrong ones in red). With several test dataloaders the files get the suffix
  ``_dl<i>`` and, by default, only dataloader 0 (the clean test split of a robustness run) gets
  them; ``per_dataloader=True`` (YAML: ``report.per_dataloader: true``) writes one set per
  dataloader (a robustness run has ~80 loaders: that many confusion matrices, 1000 x 1000 on
  ImageNet). Under DDP, predictions are gathered and de-duplicated by dataset index (the
  distributed sampler pads the last batch with repeats).

The metrics CSV itself is the CSVLogger's ``metrics.csv`` in the same log directory.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_app.atomic import atomic_write, save_figure
from lightning_app.checkpoint import display_name

# ----------------------------------------------------------------------------- io helpers
def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue()


# ----------------------------------------------------------------------------- plots
def unfreeze_epochs(history: Sequence[Dict[str, float]]) -> List[Tuple[int, int]]:
    """``[(epoch, groups unfrozen at its start), ...]`` from the ``unfrozen_groups`` column of a history."""
    out: List[Tuple[int, int]] = []
    before = 0
    for h in sorted(history, key=lambda r: r["epoch"]):
        n = h.get("unfrozen_groups")
        if n is None or n == "":
            continue
        n = int(n)
        if n > before:
            out.append((int(h["epoch"]), n - before))
        before = n
    return out


def style_epoch_axis(ax: Any, unfreezes: Sequence[Tuple[int, int]] = ()) -> None:
    """Integer epoch ticks and a dashed line (labelled ``+n groups``) where layer groups were unfrozen:
    between the last epoch before and the first epoch after (unfreezing happens at an epoch's start)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    for k, (epoch, n) in enumerate(unfreezes):
        ax.axvline(epoch - 0.5, color="0.35", linestyle="--", linewidth=1, zorder=0,
                   label="unfreeze" if k == 0 else None)
        ax.annotate(f"+{n} group{'s' if n > 1 else ''}", xy=(epoch - 0.5, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", ha="left", va="top", fontsize=8, color="0.25")


def plot_curves(history: Sequence[Dict[str, float]], path: Union[str, os.PathLike],
                unfreezes: Optional[Sequence[Tuple[int, int]]] = None) -> Path:
    """Loss and accuracy per epoch, train and val, side by side; integer epochs; unfreeze epochs
    (``unfreezes``, default: from the history's ``unfrozen_groups``) marked on both panels."""
    from matplotlib.figure import Figure

    if unfreezes is None:
        unfreezes = unfreeze_epochs(history)
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [(h["epoch"], h[f"{split}_{metric}"]) for h in history
                   if h.get(f"{split}_{metric}") not in (None, "")]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, style, label=split, markersize=4)
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.set_title("accuracy" if metric == "acc" else "loss")
        if metric == "acc":
            ax.set_ylim(0, 1.02)
        style_epoch_axis(ax, unfreezes)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.06), frameon=False)
    return save_figure(fig, path)


def confusion_matrix(preds: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, pred]``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(target, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def write_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], csv_path: Union[str, os.PathLike],
                           png_path: Union[str, os.PathLike]) -> Tuple[Path, Path]:
    """CSV (rows = true class, columns = predicted class) and a PNG (row-normalised colours, counts)."""
    from matplotlib.figure import Figure

    names = list(class_names)
    rows = [[names[i]] + cm[i].tolist() for i in range(len(names))]
    atomic_write(csv_path, _csv_text(["true \\ predicted"] + names, rows))

    n = len(names)
    size = min(4 + 0.45 * n, 30)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fs = max(4, 10 - n // 10)
    ax.set_xticklabels(names, rotation=90, fontsize=fs)
    ax.set_yticklabels(names, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"confusion matrix ({cm.sum()} images, accuracy {acc:.3f})")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fs,
                            color="white" if norm[i, j] > 0.5 else "black")
    return Path(csv_path), save_figure(fig, png_path)


def plot_prediction_grid(images: torch.Tensor, preds: Sequence[int], target: Sequence[int],
                         class_names: Sequence[str], path: Union[str, os.PathLike]) -> Path:
    """Images ``[N, 3, H, W]`` in [0, 1] with ``pred / true`` titles (red when wrong)."""
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(8, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(1.8 * cols, 2.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    names = list(class_names) or [str(i) for i in range(max(list(preds) + list(target)) + 1)]
    for ax, img, p, t in zip(axes, images, preds, target):
        arr = img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        ax.imshow(arr, interpolation="nearest")
        ok = int(p) == int(t)
        ax.set_title(f"pred {names[int(p)]}\ntrue {names[int(t)]}", fontsize=7, color="black" if ok else "red")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- callback
def _class_names(trainer: "pl.Trainer", num_classes: int) -> List[str]:
    """The model's class names (what it was trained on, from its checkpoint), else the data's, else indices."""
    for names in (getattr(getattr(trainer, "lightning_module", None), "class_names", None),
                  getattr(getattr(trainer, "datamodule", None), "class_names", None)):
        names = [display_name(str(n)) for n in (names or [])]
        if len(names) == num_classes:
            return names
    return [str(i) for i in range(num_classes)]


def report_dir(trainer: "pl.Trainer", dirname: str = "reports") -> Path:
    """``<log_dir>/<dirname>`` (the logger's directory, else ``default_root_dir``).

    Call it on every rank: ``trainer.log_dir`` is a broadcast under DDP."""
    base = trainer.log_dir or trainer.default_root_dir
    return Path(base) / dirname


def _batch_size(batch: Any) -> int:
    """Samples in a batch: ``(x, y, ...)``, a list of such mini-batches (``steps_per_execution``) or a tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        if isinstance(batch[0], torch.Tensor):
            return int(batch[0].shape[0])
        return sum(_batch_size(b) for b in batch)
    return 0


class TrainingReport(Callback):
    """Writes learning curves during fit and confusion matrix / prediction grid at test.

    Args:
        dirname: sub-directory of the log directory.
        grid_size: number of test images in the prediction grid (0 disables it).
        per_dataloader: with several test dataloaders, write a confusion matrix and a prediction grid for
            every one of them; ``False`` (default): for dataloader 0 only (files suffixed ``_dl0``), the
            others' predictions are not even collected.
        curves_every_s: least wall time between two redraws of ``curves.png`` during training (0: every epoch);
            the last epoch's curves are always drawn when training ends.
    """

    def __init__(self, dirname: str = "reports", grid_size: int = 32, per_dataloader: bool = False,
                 curves_every_s: float = 30.0) -> None:
        super().__init__()
        self.dirname = dirname
        self.grid_size = grid_size
        self.per_dataloader = per_dataloader
        self.curves_every_s = float(curves_every_s)
        self._curves_drawn: Optional[float] = None  # perf_counter of the last redraw
        self._curves_stale = False
        self.history: List[Dict[str, float]] = []
        self._test: Dict[int, Dict[str, List[torch.Tensor]]] = {}
        self.written: List[Path] = []
        self._epoch_start: Optional[float] = None
        self._train_end: Optional[float] = None
        self._images = 0

    # -- fit
    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # once per epoch: the time of the work, not of its launch
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._train_end, self._images = self._now(pl_module), None, 0

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += _batch_size(batch)

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if trainer.training and not trainer.sanity_checking and self._train_end is None:
            self._train_end = self._now(pl_module)

    def _timing(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> Dict[str, float]:
        if self._epoch_start is None:
            return {}
        end = self._now(pl_module)
        train_time = (self._train_end or end) - self._epoch_start
        out = {"epoch_time_s": end - self._epoch_start}
        if self._images and train_time > 0:
            # the distributed sampler gives every rank the same number of batches
            out["train_images_per_s"] = self._images * trainer.world_size / train_time
        return out

    @staticmethod
    def _unfrozen(trainer: "pl.Trainer") -> Dict[str, float]:
        from lightning_app.finetune import LayerwiseUnfreezing

        cb = next((c for c in trainer.callbacks if isinstance(c, LayerwiseUnfreezing)), None)
        return {} if cb is None else {"unfrozen_groups": cb.num_unfrozen}

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, (torch.Tensor, float, int))
             and (k.startswith("train_") or k.startswith("val_"))}
        row = {"epoch": trainer.current_epoch, **m, **self._timing(trainer, pl_module), **self._unfrozen(trainer)}
        self.history = [h for h in self.history if h["epoch"] != row["epoch"]] + [row]
        out = report_dir(trainer, self.dirname)  # collective: every rank
        if trainer.is_global_zero:
            keys = sorted({k for h in self.history for k in h if k != "epoch"})
            rows = [[h["epoch"]] + [h.get(k, "") for k in keys] for h in self.history]
            self.written.append(atomic_write(out / "history.csv", _csv_text(["epoch"] + keys, rows)))
            self._curves_stale = True
            last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
            due = self._curves_drawn is None or time.perf_counter() - self._curves_drawn >= self.curves_every_s
            if last or due:
                self._draw_curves(out)

    def _draw_curves(self, out: Path) -> None:
        self.written.append(plot_curves(self.history, out / "curves.png"))
        self._curves_drawn, self._curves_stale = time.perf_counter(), False

    def on_train_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        """Draw the curves of the epochs not drawn yet (early stopping, an interrupted run, a throttled redraw)."""
        out = report_dir(trainer, self.dirname)  # collective: every rank
        if trainer.is_global_zero and self._curves_stale and self.history:
            self._draw_curves(out)

    def state_dict(self) -> Dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # -- test
    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._test = {}

    def on_test_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, dict) or "preds" not in outputs:
            return
        if dataloader_idx != 0 and not self.per_dataloader:
            return
        # kept where they are (on a GPU: device memory, a few bytes per image) until the epoch's end: a copy to the
        # host here would wait for the device at every batch
        store = self._test.setdefault(dataloader_idx, {"preds": [], "target": [], "index": [], "images": []})
        store["preds"].append(outputs["preds"].detach())
        store["target"].append(outputs["target"].detach())
        if "index" in outputs:
            store["index"].append(outputs["index"].detach())
        x = batch[0]
        have = sum(len(i) for i in store["images"])
        if self.grid_size and x.ndim == 4 and have < self.grid_size:
            store["images"].append(x[: self.grid_size - have].detach().float().clone())

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        num_classes = int(getattr(pl_module, "num_classes", 0) or 0)
        # loaders of this test run (not only those collected: with per_dataloader=False that is loader 0 alone)
        n_loaders = max(len(getattr(trainer, "num_test_batches", None) or []), len(self._test), 1)
        out = report_dir(trainer, self.dirname)  # collective: every rank
        for dl in sorted(self._test):
            s = self._test[dl]
            preds, target = torch.cat(s["preds"]).cpu(), torch.cat(s["target"]).cpu()
            index = torch.cat(s["index"]).cpu() if s["index"] else None
            if trainer.world_size > 1:
                preds, target, index = self._gather(trainer, preds, target, index)
            if not trainer.is_global_zero:
                continue
            if index is not None:  # drop the distributed sampler's padding repeats
                _, first = np.unique(index.numpy(), return_index=True)
                preds, target = preds[first], target[first]
            k = num_classes or int(max(preds.max(), target.max())) + 1
            names = _class_names(trainer, k)
            suffix = f"_dl{dl}" if n_loaders > 1 else ""
            cm = confusion_matrix(preds.numpy(), target.numpy(), k)
            self.written += list(write_confusion_matrix(cm, names, out / f"confusion_matrix{suffix}.csv",
                                                        out / f"confusion_matrix{suffix}.png"))
            if s["images"]:
                imgs = torch.cat(s["images"]).cpu()
                n = len(imgs)
                local_p = torch.cat(s["preds"])[:n].cpu()
                local_t = torch.cat(s["target"])[:n].cpu()
                self.written.append(plot_prediction_grid(imgs, local_p.tolist(), local_t.tolist(), names,
                                                         out / f"test_predictions{suffix}.png"))

    @staticmethod
    def _gather(trainer: "pl.Trainer", preds: torch.Tensor, target: torch.Tensor,
                index: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        import torch.distributed as dist

        payload = (preds, target, index)
        gathered: List[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, payload)
        preds = torch.cat([g[0] for g in gathered])
        target = torch.cat([g[1] for g in gathered])
        index = torch.cat([g[2] for g in gathered]) if all(g[2] is not None for g in gathered) else None
        return preds, target, index


class PredictionCSVWriter(BasePredictionWriter):
    """``predictions.csv`` for ``predict`` runs: one row per sample, in dataset order (rank 0 merges all ranks).

    Columns: ``path`` (the image file; ``name[i]`` for in-memory data), ``pred`` (class name), ``prob`` (its
    probability), ``top5`` (``name:prob`` pairs, best first, ``;``-separated; fewer with fewer classes), ``label``
    (the true class when the data is labelled, else empty) and ``error`` (why an unreadable file has no
    prediction: such a file gets its own row with the error, never another file's prediction).
    """

    HEADER = ("path", "pred", "prob", "top5", "label", "error")

    def __init__(self, path: Optional[str] = None, top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.top_k = top_k
        self._rows: List[Tuple[int, List[int], List[float], int, bool]] = []
        self.written: Optional[Path] = None

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if not isinstance(prediction, dict) or "probs" not in prediction:
            return
        probs = prediction["probs"].detach().float().cpu()
        conf, pred = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        n = len(probs)
        index = prediction["index"].cpu().tolist() if "index" in prediction else list(batch_indices or range(n))
        target = prediction["target"].cpu().tolist() if "target" in prediction else [-1] * n
        ok = prediction["ok"].cpu().tolist() if "ok" in prediction else [True] * n
        self._rows += list(zip(index, pred.tolist(), conf.tolist(), target, ok))

    def on_predict_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        rows = self._rows
        default_path = report_dir(trainer) / "predictions.csv"  # collective: every rank
        if trainer.world_size > 1:
            import torch.distributed as dist

            gathered: List[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for g in gathered for r in g]
        if not trainer.is_global_zero:
            return
        rows = sorted(dict((r[0], r) for r in rows).values())  # by index; DDP padding repeats dropped
        num_classes = int(getattr(pl_module, "num_classes", 0) or 0) or 1 + max((r[1][0] for r in rows), default=0)
        names = _class_names(trainer, num_classes)
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        describe = getattr(dataset, "describe", None)
        out = []
        for index, top, conf, target, ok in rows:
            where = display_name(describe(index)) if describe else str(index)
            label = names[target] if 0 <= target < len(names) else ""
            if not ok:
                out.append((where, "", "", "", label, _unreadable_reason(describe(index) if describe else None)))
                continue
            top5 = ";".join(f"{names[c]}:{p:.4f}" for c, p in zip(top, conf))
            out.append((where, names[top[0]], f"{conf[0]:.6f}", top5, label, ""))
        path = Path(self.path) if self.path else default_path
        self.written = atomic_write(path, _csv_text(self.HEADER, out))
        failed = sum(1 for r in out if r[5])
        rank_zero_info(f"predictions for {len(out)} images in {self.written}"
                       + (f" ({failed} unreadable: see the error column)" if failed else ""))


def _unreadable_reason(path: Optional[str]) -> str:
    from lightning_app.data.images import check_image

    if path is None:
        return "unreadable image"
    return check_image(path, "full") or "unreadable image"


__all__ = [
    "PredictionCSVWriter",
    "TrainingReport",
    "atomic_write",
    "confusion_matrix",
    "plot_curves",
    "plot_prediction_grid",
    "report_dir",
    "style_epoch_axis",
    "unfreeze_epochs",
    "write_confusion_matrix",
]
