"""Device -> host copies that do not stall the device queue: each group of tensors is copied into pinned host
memory with ``non_blocking=True`` and handed back (in order) once its copy has completed, so the caller never waits
for the kernels still queued behind it. CPU tensors are handed back at once."""
from __future__ import annotations

from collections import deque
from typing import Deque, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch


class HostCopyQueue:
    """FIFO of tensor groups on their way to the host.

    :meth:`push` starts the copies of one group; :meth:`ready` yields, oldest first, the groups whose copies have
    finished (as numpy arrays), and also waits for the oldest ones while more than ``max_pending`` are in flight
    (bounding pinned memory); :meth:`drain` waits for all. The order of groups is always the order of pushes.
    """

    def __init__(self, max_pending: int = 4) -> None:
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        self.max_pending = int(max_pending)
        self._pending: Deque[Tuple[Optional[torch.cuda.Event], List[torch.Tensor]]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, tensors: Sequence[torch.Tensor]) -> None:
        """Start copying ``tensors`` (one group) to the host."""
        host: List[torch.Tensor] = []
        event: Optional[torch.cuda.Event] = None
        for t in tensors:
            t = t.detach()
            if t.device.type == "cuda":
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                host.append(buf)
                event = event or torch.cuda.Event()
            else:
                host.append(t.cpu())
        if event is not None:
            event.record()  # after every copy of the group, on the current stream
        self._pending.append((event, host))

    def ready(self) -> Iterator[List[np.ndarray]]:
        """Groups whose copies are complete, oldest first (waiting only to keep at most ``max_pending``)."""
        while self._pending:
            event, host = self._pending[0]
            if event is not None and len(self._pending) <= self.max_pending and not event.query():
                return
            if event is not None:
                event.synchronize()
            self._pending.popleft()
            yield [h.numpy() for h in host]

    def drain(self) -> Iterator[List[np.ndarray]]:
        """Every pending group, oldest first, waiting for each copy."""
        while self._pending:
            event, host = self._pending.popleft()
            if event is not None:
                event.synchronize()
            yield [h.numpy() for h in host]

    def clear(self) -> None:
        """Drop pending groups (after a failure: nothing more is written)."""
        self._pending.clear()
