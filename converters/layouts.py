"""Keras (channels-last) weight layouts -> PyTorch layouts, as torch tensors.

Tensors come out in float32 (the product), or in float64 inside ``precision(np.float64)`` (the
float64 parity mode: the only arithmetic of a conversion, a conv bias folded into the next
BatchNorm's mean, then stays exact).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import numpy as np
import torch

Tensor = torch.Tensor
_DTYPE = [np.float32]


@contextlib.contextmanager
def precision(dtype) -> Iterator[None]:
    """Produce tensors of ``dtype`` (``np.float32`` or ``np.float64``) within the context."""
    _DTYPE.append(np.dtype(dtype).type)
    try:
        yield
    finally:
        _DTYPE.pop()


def array(a: np.ndarray) -> Tensor:
    """A Keras array as a contiguous torch tensor, as is (bias, Dense bias, ...)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=_DTYPE[-1]))


_t = array


def conv(kernel: np.ndarray) -> Tensor:
    """Conv2D kernel (kh, kw, in, out) -> (out, in, kh, kw)."""
    return _t(kernel.transpose(3, 2, 0, 1))


def depthwise(kernel: np.ndarray) -> Tensor:
    """DepthwiseConv2D kernel (kh, kw, C, M) -> (C*M, 1, kh, kw)."""
    kh, kw, c, m = kernel.shape
    return _t(kernel.reshape(kh, kw, c * m, 1).transpose(2, 3, 0, 1))


def pointwise(kernel: np.ndarray) -> Tensor:
    """SeparableConv2D pointwise kernel (1, 1, C*M, out) -> (out, C*M, 1, 1)."""
    return conv(kernel)


def dense(kernel: np.ndarray) -> Tensor:
    """Dense kernel (in, out) -> (out, in)."""
    return _t(kernel.T)


def flatten_dense_to_conv(kernel: np.ndarray, height: int, width: int, channels: int) -> Tensor:
    """Dense kernel after a channels-last Flatten, (H*W*C, out) -> conv (out, C, H, W)."""
    return _t(kernel.reshape(height, width, channels, -1).transpose(3, 2, 0, 1))


def flip_input_channels(weight: Tensor) -> Tensor:
    """Reverse a conv's input-channel axis: folds Keras's RGB->BGR flip into the first conv."""
    return weight.flip(1).contiguous()


def batchnorm(weights: Dict[str, np.ndarray], channels: Optional[int] = None,
              bias_before: Optional[np.ndarray] = None) -> Dict[str, Tensor]:
    """Keras BatchNormalization -> torch ``weight, bias, running_mean, running_var``.

    ``scale=False`` (no gamma) gives weight 1; ``center=False`` gives bias 0. A conv bias
    that feeds this BN (``bias_before``) folds exactly into the running mean.
    """
    mean = weights["moving_mean"]
    channels = channels or mean.shape[0]
    gamma = weights.get("gamma", np.ones(channels, np.float32))
    beta = weights.get("beta", np.zeros(channels, np.float32))
    if bias_before is not None:  # in float64, rounded once to the output dtype
        mean = mean.astype(np.float64) - bias_before.astype(np.float64)
    return {
        "weight": _t(gamma),
        "bias": _t(beta),
        "running_mean": _t(mean),
        "running_var": _t(weights["moving_variance"]),
    }
