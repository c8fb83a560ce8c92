"""Compute limits for the extraction benchmark: a backbone's arithmetic and the machine's best matrix-product rate.

The limit of a backbone on a device is ``gemm_flop_s / model_flops`` images/s: every multiply-add of its
convolutions and matrix products (2 FLOPs each, as :class:`torch.utils.flop_counter.FlopCounterMode` counts them)
at the rate of a large square matrix product in the run's precision (``torch.mm`` or, on a CPU, oneDNN's, whichever
is faster). It is the ceiling of direct arithmetic: no
implementation that computes the same products (oneDNN under TensorFlow and PyTorch, XLA) gets past it; only
algorithms that change the arithmetic (Winograd, FFT) or the precision could. Depthwise convolutions and the
elementwise work are memory-bound and run well below it, so the limit is loose for MobileNets and EfficientNets and
tight for VGG, ResNet and Inception.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def model_flops(name: str, size: int) -> float:
    """FLOPs of one ``size`` x ``size`` image through the zoo backbone ``name`` as extraction runs it (no top,
    average pooling). Counted on the meta device: nothing is allocated or computed."""
    from lightning_app.zoo import create_backbone

    with torch.device("meta"):
        model = create_backbone(name, weights=None, num_classes=0).eval()
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def gemm_flop_s(device: Any = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` ``n`` x ``n`` x ``n`` matrix products (``2 n^3`` FLOPs) on ``device``,
    with the threads and matmul settings of the calling process: ``torch.mm`` and, on a CPU, oneDNN's product (the
    library of PyTorch's and TensorFlow's CPU convolutions; on AMD CPUs with AVX-512 it runs twice as fast as MKL's
    ``torch.mm``, which keeps to AVX2 there), whichever is faster."""
    from lightning_app import linear_fusion

    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = 20 if device.type == "cuda" else 1
    products = [lambda: torch.mm(a, b, out=out)]
    if device.type == "cpu" and linear_fusion.available():
        products.append(lambda: linear_fusion.linear(a, b, None))  # a @ b^T: the same arithmetic
    best = float("inf")
    for product in products:
        for i in range(repeats + 1):  # the first is a warm-up
            sync()
            t = time.perf_counter()
            for _ in range(inner):
                product()
            sync()
            if i:
                best = min(best, (time.perf_counter() - t) / inner)
    return 2 * n ** 3 / best
