"""Float32 denormals flushed to zero on the CPU, as Keras computes on both of its CPU backends.

XLA (Keras-JAX) and TensorFlow run their CPU kernels with flush-to-zero / denormals-are-zero; PyTorch keeps
IEEE denormals unless asked (``torch.set_flush_denormal``). The difference is invisible in the numbers that
matter (values below 1.2e-38 become 0) but not in the time: once a head fits its data, Adam's second moments
(squared gradients) fall into the denormal range and the fused Adam kernel ran 2.8x slower on this project's
2-core CPU (0.92 ms instead of 0.33 ms per step of the CIFAR-10 head, one thread), a quarter of the epoch.

``torch.set_flush_denormal`` sets the flag (x86 MXCSR) of the calling thread only; threads inherit it when they are
created, but torch's OpenMP pool usually exists already when a Trainer starts. :func:`flush_denormals` therefore
also runs the setting once on every thread of that pool (one OpenMP parallel region through the ``libgomp`` that
torch loaded) and then checks the result on a tensor large enough to be split across the pool.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, List, Optional

import torch

_lock = threading.Lock()
_state: Optional[bool] = None  # what the last call managed to set on every thread (None: never called)
_GOMP_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _openmp_runtimes() -> List[ctypes.CDLL]:
    """The ``libgomp`` copies mapped in this process, torch's own first (scikit-learn and others bring their own,
    each with its own thread pool)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "gomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return []
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    libs = []
    for path in sorted(paths, key=lambda p: (not os.path.realpath(p).startswith(torch_dir), p)):
        try:
            lib = ctypes.CDLL(path)  # already mapped: the same library, not a second copy
            lib.GOMP_parallel.argtypes = [_GOMP_FN, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            lib.GOMP_parallel.restype = None
            libs.append(lib)
        except (OSError, AttributeError):
            continue
    return libs


def _on_every_pool_thread(fn: Callable[[], None], lib: Optional[ctypes.CDLL]) -> None:
    """Run ``fn`` once on each thread of ``lib``'s OpenMP pool (``torch.get_num_threads()`` threads, the calling
    thread included); nothing without a runtime (``None``: the calling thread's own setting is all there is)."""
    if lib is not None:
        lib.GOMP_parallel(_GOMP_FN(lambda _data: fn()), None, torch.get_num_threads(), 0)


def _flushes_everywhere() -> bool:
    """Whether a denormal input gives zero on every thread of an elementwise kernel split across the pool."""
    return bool((denormal_tensor(max(1 << 20, 65536 * torch.get_num_threads())) * 1.5).count_nonzero() == 0)


def denormal_tensor(n: int) -> torch.Tensor:
    """``[n]`` float32 denormals (about 1.5e-39), made from their bit pattern: a float literal would itself be
    flushed to 0 on its way into the tensor where the calling thread flushes already."""
    return torch.full((n,), 0x00100000, dtype=torch.int32).view(torch.float32)


def flush_denormals(enabled: bool = True) -> bool:
    """Flush float32 denormals to zero (``enabled``) or keep them, on this thread and every thread of torch's CPU
    pool, as XLA and TensorFlow do (module docstring). Returns whether the setting now holds on every thread; where
    it cannot (no x86 flag, an OpenMP runtime out of reach), denormals are kept everywhere rather than flushed on
    some threads only. ``LIGHTNING_APP_DENORMALS=keep`` turns the flushing off."""
    global _state
    if enabled and os.environ.get("LIGHTNING_APP_DENORMALS", "").lower() == "keep":
        enabled = False
    with _lock:
        if _state is enabled and (not enabled or _flushes_everywhere()):
            return True
        if not torch.set_flush_denormal(enabled):
            _state = False
            return not enabled
        runtimes = _openmp_runtimes()
        for lib in runtimes or [None]:  # torch's own pool first; another runtime only if that did not reach it
            _on_every_pool_thread(lambda: torch.set_flush_denormal(enabled), lib)
            if not enabled or _flushes_everywhere():
                _state = enabled
                return True
        for lib in runtimes:  # partly flushed would make results depend on the thread split
            _on_every_pool_thread(lambda: torch.set_flush_denormal(False), lib)
        torch.set_flush_denormal(False)
        _state = False
        return False


__all__ = ["denormal_tensor", "flush_denormals"]
