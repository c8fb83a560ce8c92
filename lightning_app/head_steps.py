"""Optimizer steps of the dense head on cached features, many per Lightning step (``steps_per_execution``).

A :class:`~lightning_app.data.feature_loader.FeatureChunk` holds the rows of ``k`` mini-batches; a step
runner performs the ``k`` optimizer steps and returns the logits and losses for the epoch metrics:

* :class:`EagerHeadSteps`: forward, ``backward``, ``optimizer.step()`` per mini-batch on the raw torch optimizer,
  without Lightning's per-step hooks (callbacks see one Lightning step per chunk, as Keras callbacks see one
  batch per ``steps_per_execution``). Works for any head, loss and optimizer, on any device.
* :class:`LeanHeadSteps` (CPU): for the heads :func:`~lightning_app.module.build_head` makes
  (``Linear -> ReLU -> Dropout`` blocks, cross-entropy, Adam / AdamW) the same aten ops autograd would run,
  written out (forward, backward into persistent gradient buffers, Adam's fused kernel on the optimizer's own
  state): no autograd graph and no ``Optimizer.step`` bookkeeping, which on a CPU cost about as much as the
  step's arithmetic outside the two big matrix products. Same math as autograd (a test compares).
* :class:`CudaGraphHeadSteps`: the same ``k`` steps (forward, backward and optimizer step, dropout included)
  captured once in a CUDA graph per chunk shape and replayed: one launch per chunk instead of ~25 kernel
  launches and a few hundred microseconds of Python per step. Needs a capturable optimizer (Adam / AdamW);
  the learning rate is fed as a device tensor refreshed before every replay (schedulers keep working), any
  other hyperparameter change or replaced optimizer state triggers a re-capture (logged, bounded).

:func:`select_head_steps` picks the runner; under DDP the module keeps Lightning's own manual-optimization
path (its backward hooks all-reduce the gradients).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_app import linear_fusion
from lightning_app.data.feature_loader import FeatureChunk
from lightning_app.dropout import Dropout, dropout_mask

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: at most this many CUDA graph captures per runner (chunk shapes x re-captures), then eager steps
MAX_CAPTURES = 8
#: the written-out CPU steps run a layer's products through oneDNN (where it beats MKL on this CPU:
#: :func:`~lightning_app.linear_fusion.onednn_linear_faster`) from this many multiply-adds at the batch size of the
#: first step on; smaller ones (the 10-class output layer) are faster in MKL either way
MIN_ONEDNN_MACS = 1 << 20
#: optimizers whose CUDA-graph capture is supported (``capturable`` flag, tensor learning rate)
CAPTURABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


class StepResult(NamedTuple):
    """What a chunk of steps returns (all on the device, detached)."""

    logits: torch.Tensor  #: ``[n, C]`` logits of every sample, computed before its optimizer step
    losses: torch.Tensor  #: ``[k]`` mean loss of each mini-batch
    loss_sum: torch.Tensor  #: scalar: sum over mini-batches of (mean loss x mini-batch size)


class EagerHeadSteps:
    """One optimizer step per mini-batch of a chunk, plain autograd, raw optimizer (module docstring).

    Args:
        head: the trainable head (features ``[B, D]`` -> logits ``[B, C]``).
        loss_fn: ``(logits, labels) -> mean loss``.
        optimizer: the torch optimizer (not Lightning's wrapper).
        on_steps: called with the number of optimizer steps taken (Lightning's step counters).
    """

    name = "eager"

    def __init__(self, head: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                 on_steps: Callable[[int], None] = lambda k: None) -> None:
        self.head, self.loss_fn, self.optimizer, self.on_steps = head, loss_fn, optimizer, on_steps

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on mini-batch ``(x, y)``; returns its logits and mean loss (detached)."""
        logits = self.head(x)
        loss = self.loss_fn(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return logits.detach(), loss.detach()

    def run(self, chunk: FeatureChunk) -> StepResult:
        logits_all: List[torch.Tensor] = []
        losses: List[torch.Tensor] = []
        for j in range(len(chunk.batch_sizes)):
            logits, loss = self.step(*chunk.batch(j))
            logits_all.append(logits)
            losses.append(loss)
        self.on_steps(len(losses))
        return _result(torch.cat(logits_all), torch.stack(losses), chunk.batch_sizes)


def _result(logits: torch.Tensor, losses: torch.Tensor, sizes: Tuple[int, ...]) -> StepResult:
    """Chunk sizes are ``(b, ..., b, last)``: the loss sum uses Python scalars only (no host-to-device copy, so
    it can be captured in a CUDA graph)."""
    if len(sizes) == 1 or sizes[-1] == sizes[0]:
        total = losses.sum() * sizes[0]
    else:
        total = losses[:-1].sum() * sizes[0] + losses[-1] * sizes[-1]
    return StepResult(logits, losses, total)


class LeanHeadSteps(EagerHeadSteps):
    """:class:`EagerHeadSteps` for ``build_head`` heads, cross-entropy and Adam / AdamW, written out (module
    docstring). Use :func:`lean_blocker` first: it says why a head, loss or optimizer is not supported.

    Per mini-batch, with each ``Dropout(p)`` layer's mask drawn exactly as that layer draws it on the CPU (same
    generator calls, so the same masks): :func:`~lightning_app.dropout.dropout_mask` for the heads ``build_head``
    makes (:class:`~lightning_app.dropout.Dropout`), ``bernoulli(1 - p) / (1 - p)`` for a plain ``nn.Dropout``::

        forward:  z_l = addmm(b_l, a_{l-1}, W_l^T); relu_(z_l); a_l = z_l * noise_l;  logits = addmm(b, a_L, W^T)
        loss:     cross_entropy(logits, y, label_smoothing=e)
        backward: g = softmax(logits) / b - ((1 - e) onehot(y) + e / C) / b     (d loss / d logits)
                  dW = g^T a_L, db = sum(g), da_L = g W;   per block, going down:
                  dz_l = threshold_backward(da_l * noise_l, z_l, 0); dW_l = dz_l^T a_{l-1}; db_l = sum(dz_l);
                  da_{l-1} = dz_l W_l
        update:   step += 1; torch._fused_adam_ / _fused_adamw_ (the kernel ``Adam(fused=True).step()`` calls)

    The optimizer's state (``step``, ``exp_avg``, ``exp_avg_sq``) is created by one ordinary ``step()`` (the
    first mini-batch) and then updated in place, so checkpoints and resumes see an ordinary Adam.

    Per chunk rather than per step, where that gives the same numbers (each op costs a few microseconds of
    dispatch, and the step is ~0.4 ms): the rows are gathered in one ``index_select``; the dropout masks are drawn
    in one ``rand`` (:meth:`_chunk_masks`); ``-q / b`` of the gradient above comes from :func:`target_grads`; the
    losses are computed from the logits afterwards; a param group's step counts are one shared counter, written
    back to the state when the chunk ends, as are the oneDNN weight gradients to ``.grad`` (:meth:`_end_chunk`).

    Weight layout: after that first step every ``Linear`` weight whose products run in MKL, its gradient and its
    Adam moments are re-stored transposed (:func:`kernel_layout`: ``weight.t()`` contiguous, ``[in, out]`` in memory
    like a Keras ``Dense`` kernel; same shapes, values and ``Parameter`` objects). Those products then run as plain
    ``[b, in] @ [in, out]`` and ``[in, b] @ [b, out]`` GEMMs, which MKL does about a fifth faster at these skinny
    shapes than the ``x @ W^T`` and ``g^T @ x`` forms (``benchmarks/head.py`` shows the step against its limit).

    Where oneDNN's matrix product beats MKL's (AMD CPUs with AVX-512:
    :func:`~lightning_app.linear_fusion.onednn_linear_faster`), the products of a layer of at least
    ``MIN_ONEDNN_MACS`` multiply-adds at the first step's batch size run through oneDNN instead (a 2-core Zen 5 EPYC:
    the CIFAR-10 head's epoch 1.34 -> 0.77 s). Such a layer keeps ``nn.Linear``'s ``[out, in]`` layout, and its
    forward is computed transposed, ``z^T = W a^T`` (:meth:`_forward`): the weight is oneDNN's *source*, read as it
    is stored, and the activations ``a [b, in]`` its *weight* operand, which oneDNN reorders into its blocked layout
    at every call. In the ``z = a W^T`` form it reordered the 2 MB weight instead (2048 -> 256 at b = 32: 121 ->
    97 us). The weight gradient comes out ``[out, in]`` as ``dz^T a`` with ``a`` again the operand reordered
    (110 -> 91 us, no transposed copy of ``a``), straight to Adam (:meth:`_weight_grad`). The written-out step on
    the CIFAR-10 head, alternating with the ``z = a W^T`` one in one process: 1.04-1.09x.
    """

    name = "lean"

    def __init__(self, head: nn.Module, label_smoothing: float, optimizer: torch.optim.Optimizer,
                 on_steps: Callable[[int], None] = lambda k: None) -> None:
        super().__init__(head, lambda logits, y: F.cross_entropy(logits, y, label_smoothing=label_smoothing),
                         optimizer, on_steps)
        self.label_smoothing = float(label_smoothing)
        self.input_dropout, self.blocks, self.out = _parse_head(head)
        self._groups: Optional[List[Dict[str, Any]]] = None
        self._onednn: Optional[bool] = None  # whether oneDNN's product beats MKL's here (timed once)
        #: per ``Linear``: whether its products run through oneDNN (decided with its layout, :meth:`_use_layouts`)
        self._in_onednn: Dict[nn.Linear, bool] = {}
        #: per ``Linear``: its ``(weight, bias)`` parameters (``Module.__getattr__`` costs about a microsecond, and a
        #: step read them some twenty times)
        self._wb: Dict[nn.Linear, Tuple[nn.Parameter, Optional[nn.Parameter]]] = {}
        #: weight -> its gradient of the current step where oneDNN made a new tensor (:meth:`_weight_grad`)
        self._fresh: Dict[nn.Parameter, torch.Tensor] = {}
        self._counters: Optional[List[Optional[torch.Tensor]]] = None  # per chunk: :meth:`_step_counters`

    def _use_layouts(self, b: int) -> None:
        """Which ``Linear`` runs its products through oneDNN (at least ``MIN_ONEDNN_MACS`` multiply-adds at batch
        ``b``, where oneDNN's product is the faster), and its weight, gradient and Adam moments stored for that:
        contiguous ``[out, in]``, else in :func:`kernel_layout` for MKL (class docstring)."""
        if self._onednn is None:
            self._onednn = linear_fusion.onednn_linear_faster()
        for lin in [blk[0] for blk in self.blocks] + [self.out]:
            dnn = self._in_onednn[lin] = self._onednn and b * lin.in_features * lin.out_features >= MIN_ONEDNN_MACS
            self._wb[lin] = (lin.weight, lin.bias)
            stored = (lambda t: t.contiguous()) if dnn else kernel_layout
            w = lin.weight
            w.data = stored(w.data)
            if w.grad is not None:
                w.grad = stored(w.grad)
            state = self.optimizer.state.get(w)
            for k, v in list(state.items()) if state else ():
                if isinstance(v, torch.Tensor) and v.shape == w.shape:
                    state[k] = stored(v)

    def _adam_groups(self) -> Optional[List[Dict[str, Any]]]:
        """Per param group: the tensor lists of the fused kernel (``None`` until the optimizer has state)."""
        groups = []
        for g in self.optimizer.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            states = [self.optimizer.state.get(p) for p in params]
            if any(not st for st in states):
                return None
            # the fused kernel copies a non-contiguous tensor in and out: it gets the contiguous views
            groups.append({
                "group": g, "owners": params,
                "params": [_flat(p) for p in params], "grads": [_flat(p.grad) for p in params],
                "exp_avgs": [_flat(st["exp_avg"]) for st in states],
                "exp_avg_sqs": [_flat(st["exp_avg_sq"]) for st in states],
                "max_exp_avg_sqs": [_flat(st["max_exp_avg_sq"]) for st in states] if g["amsgrad"] else [],
                "steps": [st["step"] for st in states],
                "slots": {p: i for i, p in enumerate(params)},
                "ptrs": _storage_ptrs(params, states), "grad_ptrs": _grad_ptrs(params),
            })
        return groups

    def _state_unchanged(self) -> bool:
        """Whether the cached tensor lists still point at the parameters and their optimizer state (a loaded
        checkpoint brings new state tensors)."""
        if self._groups is None:
            return False
        for cached in self._groups:
            params = cached["owners"]
            states = [self.optimizer.state.get(p) for p in params]
            if any(not st for st in states) or cached["ptrs"] != _storage_ptrs(params, states):
                return False
        return True

    def _groups_valid(self) -> bool:
        """Whether the cached tensor lists still point at the parameters, their state and their gradients."""
        return self._state_unchanged() and all(
            all(p.grad is not None for p in cached["owners"]) and cached["grad_ptrs"] == _grad_ptrs(cached["owners"])
            for cached in self._groups)

    def _zero_missing_grads(self) -> None:
        """A zero gradient buffer for every head parameter without one, in the parameter's layout (``zeros_like``
        keeps its strides): the written-out backward writes into them."""
        for p in self.head.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _restore_grads(self) -> bool:
        """After Lightning dropped the gradients (``on_validation_model_zero_grad``, before every validation) with
        the parameters and the optimizer state where they were: zero gradient buffers again and the tensor lists,
        instead of an ordinary step (autograd, ``Optimizer.step``: 2.6 ms of the CIFAR-10 head's epoch). ``False``
        where anything else changed."""
        if not self._state_unchanged():
            return False
        self._zero_missing_grads()
        self._groups = self._adam_groups()
        return self._groups is not None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._groups is None:
            logits, loss = super().step(x, y)  # an ordinary step: creates (or re-reads) the optimizer state
            self._zero_missing_grads()
            self._use_layouts(x.shape[0])
            self._groups = self._adam_groups()
            return logits, loss
        with torch.no_grad():  # one step outside :meth:`run` (which calls ``_step`` itself)
            neg_q = target_grads(y, (x.shape[0],), self.out.out_features, self.label_smoothing)
            logits = self._step(x, neg_q)
            return logits, F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def run(self, chunk: FeatureChunk) -> StepResult:
        """The chunk's steps, its rows gathered in one ``index_select``; the losses are computed afterwards from
        the logits, all steps at once (the same values: each step's logits are from before its update)."""
        # first chunk, new optimizer state (a loaded checkpoint): one ordinary step (re-)creates the buffers, then
        # the written-out steps use them; gradients dropped alone (Lightning's on_validation_model_zero_grad): new
        # zero buffers
        if not self._groups_valid() and not self._restore_grads():
            self._groups = None
        sizes = chunk.batch_sizes
        x_all, logits_all, start = chunk.features.index_select(0, chunk.rows), [], 0
        neg_q = target_grads(chunk.labels, sizes, self.out.out_features, self.label_smoothing)
        masks: Optional[Iterator[Optional[List[torch.Tensor]]]] = None
        try:
            for j, b in enumerate(sizes):
                x, y = x_all[start:start + b], chunk.labels[start:start + b]
                if self._groups is None:
                    logits_all.append(self.step(x, y)[0])
                else:
                    if masks is None:  # after the ordinary step, whose dropout draws come first
                        masks = self._chunk_masks(sizes[j:])
                    with torch.no_grad():
                        logits_all.append(self._step(x, neg_q[start:start + b], next(masks)))
                start += b
        finally:
            self._end_chunk()
        self.on_steps(len(sizes))
        logits = torch.cat(logits_all)
        losses = F.cross_entropy(logits, chunk.labels, reduction="none", label_smoothing=self.label_smoothing)
        if sizes[-1] == sizes[0]:
            losses = losses.view(len(sizes), sizes[0]).mean(1)
        else:
            losses = torch.stack([part.mean() for part in losses.split(list(sizes))])
        return _result(logits, losses, sizes)

    def _forward(self, a: torch.Tensor, lin: nn.Linear, relu: bool) -> torch.Tensor:
        """``a W^T + b`` (then ReLU'd), ``a [b, in]`` -> ``[b, out]``; from oneDNN the transposed view of
        ``z^T = W a^T`` (class docstring)."""
        w, bias = self._wb[lin]
        if self._in_onednn[lin]:
            zt = linear_fusion.linear(w, a, None)  # [out, b]
            if bias is not None:
                zt.add_(bias.unsqueeze(1))
            return (zt.relu_() if relu else zt).t()
        z = torch.addmm(bias, a, w.t()) if bias is not None else torch.mm(a, w.t())
        return z.relu_() if relu else z

    def _weight_grad(self, a: torch.Tensor, g: torch.Tensor, lin: nn.Linear) -> None:
        """The gradient ``g^T a`` of ``lin.weight`` (``a [b, in]``, ``g [b, out]``): written into ``weight.grad``
        (MKL), or held in ``self._fresh`` for the Adam update (oneDNN: a new tensor in the weight's layout, copied
        into ``weight.grad`` once per chunk by :meth:`_end_chunk`, not once per step)."""
        w = self._wb[lin][0]
        if self._in_onednn[lin]:  # [out, in] = g^T a, ``a`` the operand oneDNN reorders
            self._fresh[w] = linear_fusion.linear(g.t().contiguous(), a.t(), None)
        else:
            _mm_into(g.t(), a, w.grad)

    def _input_grad(self, g: torch.Tensor, lin: nn.Linear, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``g W``: ``g [b, out]`` -> ``[b, in]``; from MKL stored as ``like`` is (a transposed view where the layer
        below computed its ``z`` transposed, so that the elementwise backward runs on one layout)."""
        w = self._wb[lin][0]
        if self._in_onednn[lin]:
            return linear_fusion.linear(g.contiguous(), w.t(), None)
        if like is not None and not like.is_contiguous() and like.t().is_contiguous():
            return torch.mm(w.t(), g.t()).t()
        return torch.mm(g, w)

    def _end_chunk(self) -> None:
        """After a chunk (or an error in it): the last step's oneDNN weight gradients into ``.grad`` and the step
        counters into the optimizer state, so that ``.grad`` and the state are what a plain loop leaves."""
        for w, grad in self._fresh.items():
            _flat(w.grad).copy_(grad)
        self._fresh.clear()
        for cached, counter in zip(self._groups or (), self._counters or ()):
            for st in cached["steps"] if counter is not None else ():
                st.copy_(counter)
        self._counters = None

    def _step_counters(self) -> List[Optional[torch.Tensor]]:
        """Per param group, one step counter for the chunk, shared by the group's parameters (one ``add_`` per
        step instead of one per parameter), where their counts agree (else ``None``: counted one by one)."""
        if self._counters is None:
            self._counters = []
            for cached in self._groups:
                steps = cached["steps"]
                same = all(torch.equal(st, steps[0]) for st in steps[1:])
                self._counters.append(steps[0].clone() if same else None)
        return self._counters

    def _chunk_masks(self, sizes: Tuple[int, ...]) -> Iterator[Optional[List[torch.Tensor]]]:
        """The dropout masks of the steps of ``sizes``, in the order the step draws them (input, then each block),
        drawn for all the steps at once: one ``rand`` and one compare-and-scale instead of three ops per mask.
        ``rand`` fills a tensor from the generator in order, so these are the masks the steps would draw one by one
        (:func:`~lightning_app.dropout.dropout_mask`; a test compares with the plain loop). Only where every
        dropout is :class:`~lightning_app.dropout.Dropout` with one ``p``; else ``None`` per step (drawn by it)."""
        p0, mask0 = self.input_dropout
        layers = ([(p0, mask0, self.blocks[0][0].in_features if self.blocks else self.out.in_features)] +
                  [(p, mask, lin.out_features) for lin, p, mask in self.blocks])
        layers = [(p, mask, w) for p, mask, w in layers if p]
        if not layers or any(mask is not dropout_mask or p != layers[0][0] for p, mask, w in layers):
            return itertools.repeat(None)
        width = sum(w for p, mask, w in layers)
        flat = dropout_mask(torch.empty(sum(sizes) * width, device=self.out.weight.device), layers[0][0])
        steps, start = [], 0
        for b in sizes:
            step = []
            for p, mask, w in layers:
                step.append(flat[start:start + b * w].view(b, w))
                start += b * w
            steps.append(step)
        return iter(steps)

    def _step(self, x: torch.Tensor, neg_q: torch.Tensor, masks: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """One written-out optimizer step (class docstring) on features ``x [b, D]``, with ``neg_q [b, C]`` from
        :func:`target_grads` and the step's dropout masks from :meth:`_chunk_masks` (``None``: drawn here);
        returns the logits (from before the update)."""
        b = x.shape[0]
        h = x
        p0, mask0 = self.input_dropout
        drawn = iter(masks) if masks is not None else None
        if p0:
            h = h * (next(drawn) if drawn is not None else mask0(h, p0))
        saved = []
        for lin, p, mask in self.blocks:
            z = self._forward(h, lin, relu=True)
            if p:
                noise = next(drawn) if drawn is not None else mask(z, p)
                a = z * noise
            else:
                noise, a = None, z
            saved.append((h, z, noise))
            h = a
        out = self.out
        logits = self._forward(h, out, relu=False)
        g = torch.add(neg_q, torch.softmax(logits, 1), alpha=1.0 / b)  # d loss / d logits
        self._weight_grad(h, g, out)
        out_bias = self._wb[out][1]
        if out_bias is not None:
            torch.sum(g, 0, out=out_bias.grad)
        da = self._input_grad(g, out, saved[-1][1]) if self.blocks else None
        for i in range(len(self.blocks) - 1, -1, -1):
            lin = self.blocks[i][0]
            h_in, z, noise = saved[i]
            if noise is not None:
                da.mul_(noise)
            dz = torch.ops.aten.threshold_backward(da, z, 0)
            self._weight_grad(h_in, dz, lin)
            bias = self._wb[lin][1]
            if bias is not None:
                torch.sum(dz, 0, out=bias.grad)
            if i:
                da = self._input_grad(dz, lin, saved[i - 1][1])
        for cached, counter in zip(self._groups, self._step_counters()):
            grp = cached["group"]
            if counter is None:
                steps = cached["steps"]
                torch._foreach_add_(steps, 1)
            else:
                steps = [counter.add_(1)] * len(cached["steps"])
            fused = torch._fused_adamw_ if grp.get("decoupled_weight_decay", False) else torch._fused_adam_
            beta1, beta2 = grp["betas"]
            grads = cached["grads"]
            if self._fresh:
                grads = list(grads)
                slots = cached["slots"]
                for w, grad in self._fresh.items():
                    if w in slots:
                        grads[slots[w]] = grad
            fused(cached["params"], grads, cached["exp_avgs"], cached["exp_avg_sqs"], cached["max_exp_avg_sqs"], steps,
                  lr=grp["lr"], beta1=beta1, beta2=beta2, weight_decay=grp["weight_decay"], eps=grp["eps"],
                  amsgrad=grp["amsgrad"], maximize=grp["maximize"])
        return logits


def _storage_ptrs(params: List[torch.Tensor], states: List[Dict[str, Any]]) -> Tuple[int, ...]:
    """Where each parameter and its optimizer state live (the written-out steps' tensor lists are valid while these
    and :func:`_grad_ptrs` stay the same)."""
    return tuple(t.data_ptr() for p, st in zip(params, states) for t in (p, *st.values()))


def _grad_ptrs(params: List[torch.Tensor]) -> Tuple[int, ...]:
    """Where each parameter's gradient lives (every one has a gradient)."""
    return tuple(p.grad.data_ptr() for p in params)


def target_grads(labels: torch.Tensor, sizes: Tuple[int, ...], num_classes: int,
                 label_smoothing: float) -> torch.Tensor:
    """``-q / b`` per row for mini-batches of ``sizes`` rows: ``q = (1 - e) onehot(y) + e / C`` is the target
    distribution of ``cross_entropy(label_smoothing=e)``, ``b`` the row's mini-batch size. Then
    ``d loss / d logits = softmax(logits) / b - q / b``, autograd's form. Shape: ``labels [n]`` -> ``[n, C]``."""
    q = F.one_hot(labels, num_classes).to(torch.float32)
    if label_smoothing:
        q.mul_(1.0 - label_smoothing).add_(label_smoothing / num_classes)
    if len(sizes) == 1 or sizes[-1] == sizes[0]:
        return q.div_(-sizes[0])
    per_row = torch.tensor(sizes, dtype=torch.float32, device=labels.device).repeat_interleave(
        torch.tensor(sizes, device=labels.device))
    return q.div_(per_row.neg_().unsqueeze(1))


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """A 2-D ``[out, in]`` tensor stored transposed (``t.t()`` contiguous: ``[in, out]`` in memory, the layout of a
    Keras ``Dense`` kernel), same shape and values; ``t`` itself when already so stored or not 2-D."""
    if t.dim() != 2 or t.t().is_contiguous():
        return t
    return t.t().contiguous().t()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The contiguous view of a contiguous or :func:`kernel_layout` tensor (same memory, maybe transposed)."""
    return t if t.is_contiguous() else t.t()


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` written in place whether ``out`` is contiguous or in :func:`kernel_layout` (then as
    ``out^T = b^T a^T``, no copy)."""
    if out.is_contiguous():
        torch.mm(a, b, out=out)
    else:
        torch.mm(b.t(), a.t(), out=out.t())


MaskFn = Callable[[torch.Tensor, float], torch.Tensor]


def _bernoulli_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """The mask ``torch.nn.functional.dropout`` draws on the CPU."""
    return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)


def _dropout(m: nn.Module) -> Tuple[float, MaskFn]:
    return float(m.p), (dropout_mask if type(m) is Dropout else _bernoulli_mask)


def _parse_head(head: nn.Module) -> Tuple[Tuple[float, MaskFn], List[Tuple[nn.Linear, float, MaskFn]], nn.Linear]:
    """``build_head`` layout -> ((input dropout p, its mask), [(Linear, dropout p after its ReLU, its mask)], output
    Linear); ``ValueError`` for anything else."""
    layers = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    kinds = [nn.Dropout if type(m) is Dropout else type(m) for m in layers]
    if any(k not in (nn.Linear, nn.ReLU, nn.Dropout) for k in kinds) or not layers or kinds[-1] is not nn.Linear:
        raise ValueError("head is not a Linear / ReLU / Dropout stack ending in Linear")
    i, input_dropout = 0, (0.0, _bernoulli_mask)
    if kinds[0] is nn.Dropout:
        input_dropout, i = _dropout(layers[0]), 1
    blocks: List[Tuple[nn.Linear, float, MaskFn]] = []
    while i < len(layers) - 1:
        if kinds[i] is not nn.Linear or i + 1 >= len(layers) or kinds[i + 1] is not nn.ReLU:
            raise ValueError("head blocks must be Linear -> ReLU [-> Dropout]")
        lin, i = layers[i], i + 2
        p, mask = 0.0, _bernoulli_mask
        if i < len(layers) - 1 and kinds[i] is nn.Dropout:
            (p, mask), i = _dropout(layers[i]), i + 1
        blocks.append((lin, p, mask))
    if input_dropout[0] and blocks:
        raise ValueError("input dropout before hidden blocks is not a build_head layout")
    return input_dropout, blocks, layers[-1]


def lean_blocker(head: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Why :class:`LeanHeadSteps` cannot run this head / optimizer (``None``: it can)."""
    try:
        _parse_head(head)
    except ValueError as err:
        return str(err)
    if type(optimizer) not in CAPTURABLE_OPTIMIZERS:
        return f"{type(optimizer).__name__} is not Adam / AdamW"
    params = list(head.parameters())
    if any(p.dtype != torch.float32 or not _flat(p).is_contiguous() for p in params):  # plain or kernel_layout
        return "head parameters are not contiguous float32"
    head_ids = {id(p) for p in params}
    for g in optimizer.param_groups:
        if g.get("differentiable") or g.get("capturable") or g.get("foreach"):
            return "optimizer is differentiable, capturable or foreach (the fused kernel would change its numerics)"
        if g.get("fused") is False:
            return "optimizer has fused=False"
        if any(id(p) not in head_ids for p in g["params"]):
            return "optimizer holds parameters outside the head"
    return None


class _Graph(NamedTuple):
    graph: Any  # torch.cuda.CUDAGraph
    rows: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    losses: torch.Tensor  # [k]: mean loss per mini-batch
    loss_sum: torch.Tensor  # scalar: sum of mean loss x mini-batch size
    state_ptrs: Tuple[int, ...]


class CudaGraphHeadSteps(EagerHeadSteps):
    """:class:`EagerHeadSteps` captured in CUDA graphs, one per chunk shape (module docstring).

    The first chunk runs eagerly on the capture stream (real steps: they create the optimizer state and the
    cuBLAS workspace outside any capture); later chunks replay the graph of their shape (``batch_sizes``),
    capturing it on first use. Dropout draws from the CUDA generator through the graph's Philox offsets, so
    a replay consumes the same random stream as the eager steps it replaces.
    """

    name = "cuda-graph"

    def __init__(self, head: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                 on_steps: Callable[[int], None] = lambda k: None) -> None:
        super().__init__(head, loss_fn, optimizer, on_steps)
        self.stream = torch.cuda.Stream()
        self.graphs: Dict[Tuple[int, ...], _Graph] = {}
        self.captures = 0
        self.warm = False
        self.num_classes = 0
        self._features_ptr = 0
        self.disabled: Optional[str] = None
        self._lr: List[torch.Tensor] = []
        self._lr_values: List[float] = []
        self._hyper: Optional[Tuple[Any, ...]] = None

    # -- guards
    def _hyperparameters(self) -> Tuple[Any, ...]:
        """Every optimizer hyperparameter the captured kernels bake in (all but ``lr``)."""
        skip = {"params", "lr", "capturable", "initial_lr", "name"}
        return tuple(tuple(sorted((k, v) for k, v in g.items() if k not in skip)) for g in self.optimizer.param_groups)

    def _state_ptrs(self) -> Tuple[int, ...]:
        ptrs = []
        for p in (p for g in self.optimizer.param_groups for p in g["params"]):
            ptrs.append(p.data_ptr())
            for v in self.optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    ptrs.append(v.data_ptr())
        return tuple(ptrs)

    # -- running
    def run(self, chunk: FeatureChunk) -> StepResult:
        if self.disabled is not None:
            return super().run(chunk)
        current = torch.cuda.current_stream()
        if not self.warm:
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                result = super().run(chunk)
            current.wait_stream(self.stream)
            for t in (chunk.rows, chunk.labels):  # made on the current stream, used on the capture stream
                t.record_stream(self.stream)
            for t in result:  # made on the capture stream, used on the current stream
                t.record_stream(current)
            self.num_classes = int(result.logits.shape[1])
            self._features_ptr = chunk.features.data_ptr()
            self.warm = True
            self._hyper = self._hyperparameters()
            return result
        if chunk.features.data_ptr() != self._features_ptr:
            self.disabled = "the features are not resident on the GPU (each chunk brings its own rows)"
            rank_zero_info(f"head steps: eager ({self.disabled})")
            return super().run(chunk)
        sizes = chunk.batch_sizes
        hyper = self._hyperparameters()
        g = self.graphs.get(sizes)
        if g is not None and (hyper != self._hyper or g.state_ptrs != self._state_ptrs()):
            rank_zero_info("head steps: optimizer hyperparameters or optimizer state changed since the CUDA graph "
                           "capture: capturing again")
            self.graphs.clear()
            g = None
        self._hyper = hyper
        if g is None:
            g = self._capture(chunk)
            if g is None:
                return super().run(chunk)
        self._refresh_lr()
        g.rows.copy_(chunk.rows, non_blocking=True)
        g.labels.copy_(chunk.labels, non_blocking=True)
        g.graph.replay()
        self.on_steps(len(sizes))
        return StepResult(g.logits, g.losses, g.loss_sum)

    def _refresh_lr(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            lr = float(group["lr"])
            if lr != self._lr_values[i]:
                self._lr[i].fill_(lr)
                self._lr_values[i] = lr

    def _capture(self, chunk: FeatureChunk) -> Optional[_Graph]:
        if self.captures >= MAX_CAPTURES:
            self.disabled = f"more than {MAX_CAPTURES} CUDA graph captures"
            rank_zero_warn(f"head steps: {self.disabled}; running eager steps from now on")
            return None
        self.captures += 1
        sizes, n = chunk.batch_sizes, len(chunk)
        dev = chunk.features.device
        groups = self.optimizer.param_groups
        if not self._lr:
            self._lr = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=dev) for g in groups]
            self._lr_values = [float(g["lr"]) for g in groups]
        rows = chunk.rows.clone()
        labels = chunk.labels.clone()
        logits_out = torch.empty(n, self.num_classes, device=dev)
        losses_out = torch.empty(len(sizes), device=dev)
        loss_sum = torch.empty((), device=dev)
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        try:
            for g, lr in zip(groups, self._lr):
                g["lr"], g["capturable"] = lr, True
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph, stream=self.stream):
                start = 0
                for j, b in enumerate(sizes):
                    x = chunk.features.index_select(0, rows[start:start + b])
                    y = labels[start:start + b]
                    logits = self.head(x)
                    loss = self.loss_fn(logits, y)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    logits_out[start:start + b].copy_(logits.detach())
                    losses_out[j].copy_(loss.detach())
                    start += b
                loss_sum.copy_(_result(logits_out, losses_out, sizes).loss_sum)
        except Exception as err:  # capture unsupported here (driver, optimizer, head): eager steps, said once
            self.disabled = f"CUDA graph capture failed ({type(err).__name__}: {err})"
            rank_zero_warn(f"head steps: {self.disabled}; running eager steps")
            self.optimizer.zero_grad(set_to_none=True)
            return None
        finally:
            for g, (lr, cap) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, cap
            current.wait_stream(self.stream)
        captured = _Graph(graph, rows, labels, logits_out, losses_out, loss_sum, self._state_ptrs())
        self.graphs[sizes] = captured
        rank_zero_info(f"head steps: captured {len(sizes)} optimizer steps (mini-batches {sizes[0]}"
                       f"{'...' + str(sizes[-1]) if sizes[-1] != sizes[0] else ''}) in a CUDA graph")
        return captured


class EpochStats:
    """A loop's logits, labels and loss kept on the device and handed to the epoch metrics in large blocks (head
    chunks, and the training, validation and test steps of :class:`~lightning_app.module.TransferModule`).

    torchmetrics' updates synchronise with the host (argument checks, ``bincount``); fed once per block of up to
    ``max_elements`` logits (one block per epoch for CIFAR-10-sized heads), the device never waits on the host
    between steps.
    """

    def __init__(self, max_elements: int = 2**22) -> None:
        self.max_elements = max_elements
        self.logits: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.loss_sum: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor,
            flush: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]) -> None:
        n, c = logits.shape
        if self.logits is None or self.logits.shape[1] != c or self.logits.device != logits.device \
                or self.logits.shape[0] < n:
            self.drain(flush)
            rows = max(n, self.max_elements // max(c, 1))
            self.logits = torch.empty(rows, c, dtype=torch.float32, device=logits.device)
            self.labels = torch.empty(rows, dtype=labels.dtype, device=labels.device)
        if self.count + n > self.logits.shape[0]:
            self.drain(flush)
        self.logits[self.count:self.count + n].copy_(logits)
        self.labels[self.count:self.count + n].copy_(labels)
        self.loss_sum = loss_sum.detach().clone() if self.loss_sum is None else self.loss_sum + loss_sum
        self.count += n

    def drain(self, flush: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]) -> None:
        """Hand what is buffered to ``flush(logits, labels, loss_sum, count)`` and empty the buffer."""
        if self.count and self.logits is not None and self.labels is not None and self.loss_sum is not None:
            flush(self.logits[:self.count], self.labels[:self.count], self.loss_sum, self.count)
        self.count, self.loss_sum = 0, None


def _best_time(fn: Callable[[], Any], device: torch.device, repeats: int, inner: int) -> float:
    """Best seconds per call of ``fn`` over ``repeats`` x ``inner`` calls; on CUDA the ``inner`` calls are replayed
    from one CUDA graph where they can be captured (as the head steps run there: no launch overhead per call)."""
    import time

    fn()
    run = (lambda: [fn() for _ in range(inner)])
    if device.type == "cuda":
        run = _captured(fn, device, inner) or run
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def _captured(fn: Callable[[], Any], device: torch.device, inner: int) -> Optional[Callable[[], Any]]:
    """``inner`` calls of ``fn`` captured in a CUDA graph (its ``replay``), or ``None`` where capture fails."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        return graph.replay
    except Exception:  # a capture that fails: time eager calls instead
        return None


@torch.no_grad()
def matmul_limit(head: nn.Module, batch_size: int, device: Any = "cpu", repeats: int = 7, inner: int = 50) -> float:
    """The compute limit of one head step: seconds spent in its matrix products alone, timed with ``torch.mm``
    at the step's shapes in float32 (the module runs its head steps without autocast) (per ``Linear``: forward
    ``a W^T``, weight gradient ``g^T a``, and the input gradient ``g W`` for every layer but the first), each
    product in the fastest of its two memory layouts (weight stored ``[out, in]`` as ``nn.Linear`` keeps it, or
    ``[in, out]``: :func:`kernel_layout`) and, on the CPU, oneDNN's product
    (:func:`lightning_app.linear_fusion.linear`, also in the transposed forms of :class:`LeanHeadSteps`), best of
    ``repeats`` x ``inner`` calls (on CUDA replayed from a CUDA graph, as the steps are)."""
    device = torch.device(device)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    total = 0.0
    for i, lin in enumerate(linears):
        w = lin.weight.detach().to(device, torch.float32).contiguous()  # [out, in]
        wk = kernel_layout(w)  # the same values stored [in, out]
        a = torch.randn(batch_size, w.shape[1], device=device)
        g = torch.randn(batch_size, w.shape[0], device=device)
        out_f, dw, dwk, da = torch.empty(batch_size, w.shape[0], device=device), torch.empty_like(w), \
            kernel_layout(torch.empty_like(w)), torch.empty_like(a)
        products = [[lambda: torch.mm(a, w.t(), out=out_f), lambda: torch.mm(a, wk.t(), out=out_f)],
                    [lambda: _mm_into(g.t(), a, dw), lambda: _mm_into(g.t(), a, dwk)]]
        if i:
            products.append([lambda: torch.mm(g, w, out=da), lambda: torch.mm(g, wk, out=da)])
        if device.type == "cpu" and linear_fusion.available():
            gt = g.t().contiguous()
            products[0] += [lambda: linear_fusion.linear(a, wk, None), lambda: linear_fusion.linear(w, a, None)]
            products[1] += [lambda: linear_fusion.linear(a.t(), g.t(), None),
                            lambda: linear_fusion.linear(gt, a.t(), None)]
            if i:
                products[2].append(lambda: linear_fusion.linear(g, wk.t(), None))
        total += sum(min(_best_time(fn, device, repeats, inner) for fn in forms) for forms in products)
    return total


@torch.no_grad()
def adam_kernel_time(head: nn.Module, device: Any = "cpu", repeats: int = 7, inner: int = 50) -> float:
    """Seconds per call of the fused Adam kernel (what ``Adam(fused=True).step()`` runs) on the head's parameter
    shapes, best of ``repeats`` x ``inner``: the optimizer's share of the step floor."""
    device = torch.device(device)
    params = [p.detach().to(device).contiguous().clone() for p in head.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]

    def step() -> None:
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, m, v, [], steps, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0,
                           eps=1e-8, amsgrad=False, maximize=False)

    return _best_time(step, device, repeats, inner)


def graph_capture_blocker(optimizer: torch.optim.Optimizer, device: torch.device) -> Optional[str]:
    """Why the head steps cannot be captured in a CUDA graph here (``None``: they can)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if not isinstance(optimizer, CAPTURABLE_OPTIMIZERS):
        return f"{type(optimizer).__name__} is not a capturable optimizer (Adam, AdamW)"
    for g in optimizer.param_groups:
        if g.get("differentiable") or g.get("foreach") is False and not g.get("fused"):
            return "the optimizer runs per-tensor (foreach=False) or is differentiable"
    return None


def select_head_steps(head: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, device: torch.device,
                      on_steps: Callable[[int], None], label_smoothing: Optional[float] = None) -> EagerHeadSteps:
    """The fastest runner for ``device``, head and optimizer: CUDA graphs where capturable, :class:`LeanHeadSteps`
    on the CPU for ``build_head`` heads with Adam / AdamW (``label_smoothing`` given: ``loss_fn`` is the
    module's cross-entropy), else :class:`EagerHeadSteps`. Says which, and why not a faster one, in the log."""
    if device.type == "cuda":
        blocker = graph_capture_blocker(optimizer, device)
        if blocker is None:
            rank_zero_info("head steps: CUDA graphs (forward, backward and optimizer step captured per chunk shape)")
            return CudaGraphHeadSteps(head, loss_fn, optimizer, on_steps)
        rank_zero_info(f"head steps: eager ({blocker})")
        return EagerHeadSteps(head, loss_fn, optimizer, on_steps)
    blocker = "custom loss" if label_smoothing is None else lean_blocker(head, optimizer)
    if blocker is None:
        rank_zero_info("head steps: written-out forward / backward and fused Adam kernel (CPU)")
        return LeanHeadSteps(head, float(label_smoothing), optimizer, on_steps)
    rank_zero_info(f"head steps: eager autograd ({blocker})")
    return EagerHeadSteps(head, loss_fn, optimizer, on_steps)


__all__ = ["CAPTURABLE_OPTIMIZERS", "CudaGraphHeadSteps", "EagerHeadSteps", "EpochStats", "LeanHeadSteps",
           "StepResult", "adam_kernel_time", "graph_capture_blocker", "kernel_layout", "lean_blocker", "matmul_limit",
           "select_head_steps"]
