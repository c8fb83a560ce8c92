"""Training order that survives an interruption: epoch ``k`` serves the same samples in the same order whether or
not the run was stopped and resumed, and a run resumed part-way through an epoch continues with that epoch's
remaining samples.

* :class:`EpochSampler`: indices in an order that depends only on ``(seed, epoch)`` (Lightning calls ``set_epoch``
  at every epoch start, also through its DDP wrapper); :meth:`EpochSampler.resume_at` starts one epoch part-way.
  (A ``DataLoader(shuffle=True, generator=...)`` draws each epoch's order from one generator, so a resumed run
  restarts from epoch 0's order.)
* :class:`ResumableTrainOrder`: a DataModule mixin that records the training position in the checkpoint
  (``state_dict``: ``{"epoch", "batches"}``, the next batch to train on) and hands it to the sampler of the next
  training loader (single process: under DDP Lightning wraps the sampler and resumes at epoch starts only).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from ``(seed, epoch)`` (numpy's SeedSequence: well mixed, stable across versions)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2, np.uint64)[0] >> 1)


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by ``(seed, epoch)`` (or in order with ``shuffle=False``).

    ``len()`` is always ``n``; after :meth:`resume_at` the next iteration yields the order from position ``start``
    on (the samples of that epoch not trained on yet), later ones yield whole epochs again.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: Optional[int] = None) -> torch.Tensor:
        """The full order of ``epoch`` (default: the current one), int64 ``[n]``."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch if epoch is None else epoch))
        return torch.randperm(self.n, generator=g)

    def resume_at(self, epoch: int, start: int) -> None:
        """Serve ``epoch``'s order from position ``start`` on, once."""
        self.epoch = int(epoch)
        self._start = max(0, min(int(start), self.n))

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.order()[start:].tolist())

    def __len__(self) -> int:
        return self.n


def sampler_of(loader: Any) -> Any:
    """The index sampler of a DataLoader (its batch sampler's sampler, else its sampler), unwrapping Lightning's
    DDP wrapper; ``None`` if there is none."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # DistributedSamplerWrapper
    return wrapped if wrapped is not None else sampler


def train_position(trainer: Optional["pl.Trainer"]) -> Optional[Dict[str, int]]:
    """``{"epoch": e, "batches": b}``: the next training batch is batch ``b`` of epoch ``e`` (``None`` outside fit)."""
    if trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
        return None
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
    total = trainer.num_training_batches
    epoch = int(trainer.current_epoch)
    if isinstance(total, (int, float)) and math.isfinite(total) and done >= total:
        return {"epoch": epoch + 1, "batches": 0}
    return {"epoch": epoch, "batches": done}


class ResumableTrainOrder:
    """Mixin for a LightningDataModule whose training loader uses :meth:`train_sampler` (see the module docstring)."""

    _resume_position: Optional[Dict[str, int]] = None

    def train_sampler(self, n: int, seed: int, shuffle: bool, batch_size: int) -> EpochSampler:
        """An :class:`EpochSampler` for ``n`` samples, positioned where a restored checkpoint left off."""
        sampler = EpochSampler(n, seed, shuffle)
        position, self._resume_position = self._resume_position, None
        trainer = getattr(self, "trainer", None)
        if position is not None:
            single = trainer is None or trainer.world_size == 1
            sampler.resume_at(position["epoch"], position["batches"] * batch_size if single else 0)
        return sampler

    def state_dict(self) -> Dict[str, Any]:
        position = train_position(getattr(self, "trainer", None))
        return {"train_position": position} if position is not None else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._resume_position = state_dict.get("train_position")


__all__ = ["EpochSampler", "ResumableTrainOrder", "epoch_seed", "sampler_of", "train_position"]
