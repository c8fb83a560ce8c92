"""Memory formats: whether a tensor is channels_last, and tensors in another tensor's memory format (the engine's
restructurings build their outputs this way)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-d channels_last tensor and not also contiguous (a tensor with one channel, or 1 x 1
    maps, is both)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def empty_in_layout_of(x: Tensor, shape: Sequence[int]) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``x``'s dtype and device, channels_last where ``x`` is
    (:func:`is_channels_last`), else contiguous."""
    return torch.empty(tuple(shape), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


__all__ = ["empty_in_layout_of", "is_channels_last"]
