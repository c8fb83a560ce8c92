"""Which module reads which module's output: one forward, watched at the aten level (BatchNorm folding and
convolution + activation fusion both need "B is the sole reader of A's output")."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Callable, Dict, List, Set, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def run_hooked(net: nn.Module, example: Tensor, handles: List[Any]) -> Any:
    """``net(example)`` without gradients, then remove ``handles`` (hooks registered for this one forward)."""
    try:
        with torch.no_grad():
            return net(example)
    finally:
        for h in handles:
            h.remove()


def storage_key(t: Tensor) -> int:
    """Where ``t``'s memory lives: every view of one storage has the same key (an opaque oneDNN tensor, which has
    no storage, is its own key)."""
    return id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()


class ConsumerLog(TorchDispatchMode):
    """Records, for tensors registered in ``watched`` (``key(tensor)`` -> name; ``id`` by default, or
    :func:`storage_key` to count reads of any view of the same memory), every aten operation that reads them.
    ``watched`` may grow while the mode is active: it is read at every operation."""

    def __init__(self, watched: Dict[int, str], key: Callable[[Tensor], int] = id) -> None:
        super().__init__()
        self.watched, self.key = watched, key
        self.uses: Dict[int, List[str]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        if self.watched:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor) and self.key(t) in self.watched:
                    self.uses[self.key(t)].append(str(func))
        return func(*args, **kwargs)


@torch.no_grad()
def trace_producer_consumer_pairs(net: nn.Module, example: Tensor, producer: Callable[[nn.Module], bool],
                                  consumer: Callable[[nn.Module], bool],
                                  op: Callable[[nn.Module], str]) -> Tuple[List[Tuple[str, str]], Any]:
    """``(producer name, consumer name)`` pairs of ``net``, and the output of the forward that found them.

    Runs ``net(example)`` once and keeps a pair when: both modules run exactly once, the consumer's first input is
    the producer's output tensor, and that tensor is read by exactly one aten operation, whose name contains
    ``op(consumer)`` (so in-place and functional uses elsewhere count as readers; after a consumer that worked in
    place, reads of the tensor are reads of the consumer's output).
    """
    producers = {m: n for n, m in net.named_modules() if producer(m)}
    consumers = {m: n for n, m in net.named_modules() if consumer(m)}
    calls: Counter = Counter()
    produced: Dict[int, str] = {}
    consumed: Dict[str, int] = {}
    in_place: Dict[str, int] = {}  # consumer -> reads of its input before it returned it (in place)
    keep: List[Tensor] = []  # keeps ids unique while the forward runs

    def producer_hook(mod: nn.Module, args: Any, out: Any) -> None:
        calls[producers[mod]] += 1
        if isinstance(out, Tensor):
            produced[id(out)] = producers[mod]
            keep.append(out)

    def consumer_hook(mod: nn.Module, args: Any) -> None:
        calls[consumers[mod]] += 1
        if args and isinstance(args[0], Tensor):
            consumed[consumers[mod]] = id(args[0])
            keep.append(args[0])

    def consumer_done(mod: nn.Module, args: Any, out: Any) -> None:
        # an in-place consumer (ReLU(inplace=True)) returns its input: later reads of that tensor read its output
        if args and isinstance(args[0], Tensor) and out is args[0]:
            in_place[consumers[mod]] = len(log.uses.get(id(out), []))

    log = ConsumerLog(produced)
    handles = [m.register_forward_hook(producer_hook) for m in producers]
    handles += [m.register_forward_pre_hook(consumer_hook) for m in consumers]
    handles += [m.register_forward_hook(consumer_done) for m in consumers]
    try:
        with log:
            output = net(example)
    finally:
        for h in handles:
            h.remove()
    by_name = {n: m for m, n in consumers.items()}
    pairs = []
    for consumer_name, tid in consumed.items():
        producer_name = produced.get(tid)
        if producer_name is None or calls[producer_name] != 1 or calls[consumer_name] != 1:
            continue
        uses = log.uses.get(tid, [])
        if consumer_name in in_place:
            uses = uses[:in_place[consumer_name]]
        if len(uses) == 1 and op(by_name[consumer_name]) in uses[0]:
            pairs.append((producer_name, consumer_name))
    return pairs, output


def inputs_free_after(net: nn.Module, example: Tensor, blocks: Dict[nn.Module, str]) -> Set[str]:
    """Names of ``blocks`` (module -> name) whose input storage nothing reads after the block returns, so the block
    may overwrite its input (one forward of ``example``; the network's input never qualifies). Inputs are kept alive
    during the trace so no storage is reused."""
    closed: Dict[int, str] = {}  # storage of a returned block's input -> the block: reads from now on count
    log, keep, free = ConsumerLog(closed, key=storage_key), [], set(blocks.values())

    def before(mod: nn.Module, args: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or storage_key(x) == storage_key(example):
            free.discard(blocks[mod])
        else:
            keep.append(x)

    def after(mod: nn.Module, args: Any, out: Any) -> None:
        if args and isinstance(args[0], Tensor):
            closed[storage_key(args[0])] = blocks[mod]

    handles = [m.register_forward_pre_hook(before) for m in blocks]
    handles += [m.register_forward_hook(after) for m in blocks]
    with log:
        run_hooked(net, example, handles)
    return free - {closed[k] for k in log.uses}


__all__ = ["ConsumerLog", "inputs_free_after", "run_hooked", "storage_key", "trace_producer_consumer_pairs"]
