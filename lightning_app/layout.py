"""Tensors in another tensor's memory format (the engine's restructurings build their outputs this way)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def empty_in_layout_of(x: Tensor, shape: Sequence[int]) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``x``'s dtype and device, channels_last where ``x`` is a 4-d
    channels_last tensor (and not also contiguous), else contiguous."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(tuple(shape), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


__all__ = ["empty_in_layout_of"]
