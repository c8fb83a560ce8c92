"""Per-sample random streams.

Every sample gets its own ``torch.Generator`` seeded from ``(seed, stream, dataset index)``,
so the draws for a sample do not depend on the batch it is in, the batch size or the number
of devices. Generators live on the device of the images (CPU, CUDA, MPS); CPU and CUDA use
different generator algorithms, so the same seed gives different (equally valid) draws there.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Shape = Union[int, Sequence[int]]


def sample_seed(seed: int, stream: str, index: int) -> int:
    """63-bit seed for one sample: a hash of (seed, stream name, dataset index)."""
    digest = hashlib.blake2b(f"{int(seed)}/{stream}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _shape(shape: Shape) -> Tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _generator_device(device: torch.device) -> torch.device:
    return device if device.type in ("cpu", "cuda", "mps") else torch.device("cpu")


class SampleRNG:
    """One generator per sample; every draw returns a ``[B, *shape]`` tensor on ``device``.

    Successive calls continue each sample's stream, so a corruption's draws are reproducible
    as long as it makes the same calls in the same order.
    """

    def __init__(self, indices: Sequence[int], seed: int, stream: str, device: torch.device) -> None:
        self.device = torch.device(device)
        self._gen_device = _generator_device(self.device)
        self._seeds = [sample_seed(seed, stream, int(index)) for index in indices]
        self._generators: Optional[List[torch.Generator]] = None

    def __len__(self) -> int:
        return len(self._seeds)

    @property
    def _gens(self) -> List[torch.Generator]:
        if self._generators is None:  # created on the first draw: free for deterministic corruptions
            self._generators = []
            for s in self._seeds:
                g = torch.Generator(device=self._gen_device)
                g.manual_seed(s)
                self._generators.append(g)
        return self._generators

    def _empty(self, shape: Shape, dtype: torch.dtype) -> Tensor:
        if dtype == torch.float64 and self._gen_device.type == "mps":  # no float64 on MPS
            dtype = torch.float32
        return torch.empty((len(self._seeds),) + _shape(shape), dtype=dtype, device=self._gen_device)

    def uniform(self, shape: Shape, low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
        """U[low, high) draws."""
        out = self._empty(shape, dtype)
        for row, g in zip(out, self._gens):
            row.uniform_(low, high, generator=g)
        return out.to(self.device)

    def normal(self, shape: Shape, mean: float = 0.0, std: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
        """N(mean, std^2) draws."""
        out = self._empty(shape, dtype)
        for row, g in zip(out, self._gens):
            row.normal_(mean, std, generator=g)
        return out.to(self.device)

    def randint(self, low: int, high: int, shape: Shape, dtype: torch.dtype = torch.int64) -> Tensor:
        """Integers in [low, high) (like ``np.random.randint``)."""
        out = self._empty(shape, dtype)
        for row, g in zip(out, self._gens):
            row.random_(int(low), int(high), generator=g)
        return out.to(self.device)

    def poisson(self, rates: Tensor) -> Tensor:
        """Poisson draws with per-element rates ``rates`` of shape ``[B, ...]``."""
        if rates.shape[0] != len(self._seeds):
            raise ValueError(f"rates has {rates.shape[0]} samples, the generator {len(self._seeds)}")
        src = rates.to(self._gen_device)
        out = torch.stack([torch.poisson(r, generator=g) for r, g in zip(src, self._gens)])
        return out.to(self.device)
