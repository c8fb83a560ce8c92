"""Keras (channels-last) weight layouts -> PyTorch layouts, as torch tensors."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

Tensor = torch.Tensor


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


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
    mean = weights["moving_mean"].astype(np.float32)
    channels = channels or mean.shape[0]
    gamma = weights.get("gamma", np.ones(channels, np.float32))
    beta = weights.get("beta", np.zeros(channels, np.float32))
    if bias_before is not None:
        mean = mean - bias_before
    return {
        "weight": _t(gamma),
        "bias": _t(beta),
        "running_mean": _t(mean),
        "running_var": _t(weights["moving_variance"]),
    }
