"""L-inf adversarial attacks in [0, 1] pixel space: FGSM and PGD.

The model maps [0, 1] RGB images to logits and owns its normalisation (put ``Normalize``
first), so ``eps`` is in pixel units for every model: 8/255 is 16/255 in ``tf`` input units
and 8.0 in ``caffe`` units, and attacking after normalisation would compare models unfairly.

The attacks work under ``torch.no_grad`` / ``torch.inference_mode`` (they re-enable
gradients and copy inputs out of inference mode), take gradients with respect to the input
only (``torch.autograd.grad``: parameters' ``.grad`` are untouched) and leave the model's
train/eval mode alone: call them on a model in eval mode (in train mode, BatchNorm layers
would update their running statistics on every attack step).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rng import SampleRNG

LossFn = Callable[[Tensor, Tensor], Tensor]


def _sum_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _check(x: Tensor, y: Tensor, eps: float) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor of [0, 1] images")
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
        got = tuple(getattr(y, "shape", ()))
        raise ValueError(f"y must be a tensor with one target per image: x {tuple(x.shape)}, y {got}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """d loss / d x, never touching parameter ``.grad`` (call in a grad-enabled, non-inference context)."""
    x = x.detach().requires_grad_(True)
    loss = loss_fn(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, loss_fn: Optional[LossFn] = None) -> Tensor:
    """Fast gradient sign method: ``clip01(x + eps * sign(grad_x loss(model(x), y)))``.

    ``loss_fn(logits, y)`` defaults to summed cross-entropy. Returns a new tensor like ``x``.
    """
    _check(x, y, eps)
    loss_fn = loss_fn or _sum_cross_entropy
    with torch.inference_mode(False), torch.enable_grad():
        x0, y0 = x.clone(), y.clone()
        grad = _input_gradient(model, x0, y0, loss_fn)
        return (x0 + eps * grad.sign()).clamp_(0, 1).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    indices: Optional[Union[Tensor, Sequence[int]]] = None,
    seed: int = 0,
    loss_fn: Optional[LossFn] = None,
) -> Tensor:
    """Projected gradient descent (L-inf, Madry et al.) in [0, 1] pixel space.

    Start at ``x + U(-eps, eps)`` (``random_start``), then ``steps`` times: step
    ``alpha * sign(grad)``, project onto the eps-ball around ``x``, clip to [0, 1].
    The random start of a sample depends only on ``(seed, indices[i])``; ``indices`` (the
    dataset indices) default to ``0..B-1``, which ties the start to the batch position.
    """
    _check(x, y, eps)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    loss_fn = loss_fn or _sum_cross_entropy
    with torch.inference_mode(False), torch.enable_grad():
        x0, y0 = x.clone(), y.clone()
        if random_start:
            idx = range(x.shape[0]) if indices is None else torch.as_tensor(indices).tolist()
            if len(idx) != x.shape[0]:
                raise ValueError(f"indices must have one entry per image ({x.shape[0]}), got {len(idx)}")
            rng = SampleRNG(idx, seed, "pgd", x.device)
            start = rng.uniform(x.shape[1:], -eps, eps, dtype=x.dtype)
            adv = (x0 + start).clamp_(0, 1)
        else:
            adv = x0.clone()
        lower, upper = x0 - eps, x0 + eps
        for _ in range(steps):
            grad = _input_gradient(model, adv, y0, loss_fn)
            adv = torch.minimum(torch.maximum(adv.detach() + alpha * grad.sign(), lower), upper).clamp_(0, 1)
        return adv.detach()
