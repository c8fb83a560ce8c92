"""Serving cached features to the head: device-resident rows, shuffled on the device, in chunks of many steps.

Head training on cached features is tiny per step (``[32, 2048] @ [2048, 256]``), so what costs is everything
around the step: copying batches, collating, one Lightning step per optimizer step. Here the split is moved to
the training device once (:class:`FeatureLoader` with ``resident=True``), every epoch's row order is drawn once
(:class:`EpochOrder`) and sent to the device, and each item the loader yields is a :class:`FeatureChunk`: the
rows of ``steps_per_execution`` mini-batches, gathered on the device by the step that uses them.

Row order (documented, reproducible, independent of the device): exactly
``torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)``
after ``set_epoch(epoch)``: ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))``, padded
by wrapping around to a multiple of ``world_size``, then every ``world_size``-th row from ``rank``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from lightning_app.errors import ConfigError

#: steps_per_execution chosen automatically: about this many Lightning steps per epoch, at most MAX_AUTO_STEPS
AUTO_CHUNKS_PER_EPOCH = 8
MAX_AUTO_STEPS = 128
#: rows per validation chunk (no shuffle, no optimizer: one forward per chunk)
EVAL_CHUNK_ROWS = 8192
#: a split is made device-resident automatically when it takes at most this fraction of the free memory
RESIDENT_MEMORY_FRACTION = 0.5


def auto_steps_per_execution(steps_per_epoch: int) -> int:
    """Optimizer steps per Lightning step when the user does not choose: ``steps_per_epoch // 8`` clipped to
    ``[1, 128]`` (about 8 progress updates per epoch; Lightning's per-step overhead amortised over up to 128 steps)."""
    return int(min(MAX_AUTO_STEPS, max(1, steps_per_epoch // AUTO_CHUNKS_PER_EPOCH)))


def epoch_order(n: int, epoch: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """Rows (int64, CPU) of ``rank`` in ``epoch``: the order of ``torch.utils.data.DistributedSampler`` with the
    same ``seed`` / ``shuffle`` / ``num_replicas`` / ``rank`` after ``set_epoch(epoch)`` (module docstring)."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(n)
    if world_size > 1:
        total = math.ceil(n / world_size) * world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        order = order[rank:total:world_size]
    return order


class EpochOrder:
    """A rank's row order per epoch (:func:`epoch_order`); Lightning calls ``set_epoch`` at every epoch start."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        return epoch_order(self.n, self.epoch, self.seed, self.shuffle, self.rank, self.world_size)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)


@dataclass
class FeatureChunk:
    """The rows of one Lightning step: ``len(rows)`` samples, ``ceil(len(rows) / batch_size)`` mini-batches.

    Attributes:
        features: ``[M, D]`` float32 rows the chunk indexes into (the whole device-resident split, or the
            chunk's own rows when the split is not resident).
        rows: ``[n]`` int64 rows of ``features`` in training order.
        labels: ``[n]`` int64 labels, in the same order.
        index: ``[n]`` int64 dataset indices, in the same order.
        batch_size: mini-batch size; the last mini-batch may be smaller.
    """

    features: torch.Tensor
    rows: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    batch_size: int

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def batch_sizes(self) -> Tuple[int, ...]:
        """Size of each mini-batch (all ``batch_size`` but maybe the last)."""
        n, b = len(self), self.batch_size
        return tuple(min(b, n - s) for s in range(0, n, b))

    def batch(self, j: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mini-batch ``j``: features ``[b, D]`` (gathered) and labels ``[b]``."""
        sl = slice(j * self.batch_size, (j + 1) * self.batch_size)
        return self.features.index_select(0, self.rows[sl]), self.labels[sl]

    def materialize(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole chunk as an ``(x, y, index)`` batch."""
        return self.features.index_select(0, self.rows), self.labels, self.index


def _fits_in_memory(nbytes: int, device: torch.device) -> bool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= RESIDENT_MEMORY_FRACTION * free
    free = _available_ram()
    return free is None or nbytes <= RESIDENT_MEMORY_FRACTION * free


def _available_ram() -> Optional[int]:
    """Bytes of RAM available to a new allocation (Linux ``MemAvailable``: free memory plus reclaimable page cache);
    ``None`` when unknown (then a split is assumed to fit: it is memory-mapped already)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def to_device(features: np.ndarray, device: torch.device, block_rows: int = 65536) -> torch.Tensor:
    """``[N, D]`` float32 array (possibly memory-mapped) -> one contiguous tensor on ``device``, copied in blocks
    (no full host copy on the way to a GPU)."""
    if device.type == "cpu":
        if isinstance(features, np.memmap) or not features.flags.writeable:
            return torch.from_numpy(np.array(features, dtype=np.float32, order="C"))  # read into RAM
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    out = torch.empty(features.shape, dtype=torch.float32, device=device)
    for start in range(0, len(features), block_rows):
        block = np.ascontiguousarray(features[start:start + block_rows], dtype=np.float32)
        out[start:start + len(block)].copy_(torch.from_numpy(block))
    return out


class FeatureLoader:
    """Iterable of :class:`FeatureChunk` over one split (module docstring).

    Args:
        features: ``[N, D]`` float32 (numpy, possibly memory-mapped, or a tensor).
        labels: ``[N]`` int labels.
        batch_size: mini-batch size.
        steps_per_execution: mini-batches per chunk (``None``: :func:`auto_steps_per_execution`).
        shuffle, seed, rank, world_size: the row order (:func:`epoch_order`).
        device: where the chunks are used.
        resident: keep the split on ``device`` (``None``: when it takes at most half the free memory there);
            otherwise each chunk's rows are read on the host and moved by Lightning.
        chunk_rows: rows per chunk instead of ``steps_per_execution * batch_size`` (validation).
    """

    batch_sampler = None  # Lightning inspects ``sampler`` / ``batch_sampler`` (set_epoch, shuffle detection)

    def __init__(self, features: Union[np.ndarray, torch.Tensor], labels: Union[np.ndarray, torch.Tensor],
                 batch_size: int, steps_per_execution: Optional[int] = None, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu",
                 resident: Optional[bool] = None, chunk_rows: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if steps_per_execution is not None and steps_per_execution < 1:
            raise ConfigError(f"steps_per_execution must be >= 1 (or null: automatic), got {steps_per_execution}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.sampler = EpochOrder(len(labels), shuffle, seed, rank, world_size)
        steps = math.ceil(len(self.sampler) / self.batch_size)
        self.steps_per_execution = int(steps_per_execution or auto_steps_per_execution(steps))
        self.chunk_rows = int(chunk_rows or self.steps_per_execution * self.batch_size)
        nbytes = int(np.prod(features.shape)) * 4
        self.resident = _fits_in_memory(nbytes, self.device) if resident is None else bool(resident)
        labels_t = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: cache labels are a read-only map
        if self.resident:
            if isinstance(features, torch.Tensor):
                self.features = features.to(self.device, torch.float32).contiguous()
            else:
                self.features = to_device(features, self.device)
            self.labels = labels_t.to(self.device)
        else:
            self.features, self.labels = features, labels_t

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.chunk_rows)

    def __iter__(self) -> Iterator[FeatureChunk]:
        order = self.sampler.indices()
        if self.resident:
            order = order.to(self.device, non_blocking=True)
        for start in range(0, len(order), self.chunk_rows):
            rows = order[start:start + self.chunk_rows]
            if self.resident:
                yield FeatureChunk(self.features, rows, self.labels.index_select(0, rows), rows, self.batch_size)
            else:
                yield self._host_chunk(rows)

    def _host_chunk(self, rows: torch.Tensor) -> FeatureChunk:
        idx = rows.numpy()
        order = np.argsort(idx, kind="stable")  # sequential reads from a memory map
        feats = np.empty((len(idx), self.features.shape[1]), dtype=np.float32)
        feats[order] = self.features[idx[order]]
        x = torch.from_numpy(feats)
        if self.device.type == "cuda":
            x = x.pin_memory()
        return FeatureChunk(x, torch.arange(len(idx)), self.labels[rows], rows, self.batch_size)


__all__ = ["EpochOrder", "FeatureChunk", "FeatureLoader", "auto_steps_per_execution", "epoch_order", "to_device"]
