"""The inference engine: every forward of a backbone that does not train it (feature extraction, validate / test /
predict, the robustness loop with its attacks, the frozen backbone of the ``extract`` / ``head`` stages).

What it does to a network ``images [B, 3, H, W] -> features [B, D]`` (e.g. ``normalize -> backbone``):

* **BatchNorm folded** into the preceding convolution: an inference-mode BatchNorm (Keras-frozen, or any BN at
  evaluation time) is a fixed per-channel affine, so ``bn(conv(x)) = conv'(x)`` with ``W' = W * s`` and
  ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``. Conv -> BN pairs are found by running the
  network once and watching which tensors each operation consumes (:func:`find_conv_bn_pairs`): a pair is folded
  only when the BatchNorm is the sole consumer of the convolution's output. The fold is applied to a **copy**
  (:func:`fold_batchnorm`); the trained module, its ``state_dict`` and its checkpoints are never touched.
* **Convolution + activation fused** on the CPU, in float32 and in bf16 (one oneDNN call, :mod:`lightning_app.
  conv_fusion`; in bf16 with the weight cast and reordered once), where the activation alone reads the convolution's
  output; checked against the unfused copy like the fold.
* **Restructured**: DenseNet transitions pool before their 1x1 convolution, TF-"same" pools pad implicitly
  (:mod:`lightning_app.same_pooling`); on the CPU in float32 also DenseNet
  blocks run into one feature buffer instead of a concatenation before every layer (:mod:`lightning_app.
  dense_blocks`), and in float32 and bf16 TF-"same" convolutions skip the zero-filled copy of their input
  (:mod:`lightning_app.same_conv`),
  a stateless operation repeated on the same tensor (NASNet's ReLUs and average pools) runs once
  (:mod:`lightning_app.dedup`) and squeeze-and-excitation gates scale their input in place
  (:mod:`lightning_app.squeeze_excite`); checked against the copy before.
* **Winograd convolutions** on the CPU in float32, eager, for batches of 8 or more: a network whose multiply-adds are
  mostly in large 3x3 convolutions (the VGGs) runs them through NNPACK's Winograd kernels, in NCHW
  (:mod:`lightning_app.winograd`; AVX2 CPUs); checked against the copy before.
* **channels_last** memory format, **bf16 autocast** by default where the device computes bf16 natively (CUDA GPUs,
  CPUs with AVX512-BF16 / AMX: :func:`native_bf16`; ``precision="fp32"``: no autocast and no TF32 convolutions, for
  parity work), and **torch.compile** without weight freezing: the weights stay inputs of
  the compiled graph, so a refresh after fine-tuning updates them in place with no recompilation (and inductor's
  freezing pass is avoided: it folds ``conv(x) * 0.1`` and ``conv(x) * 0.2`` of one graph with the same scale,
  which breaks InceptionResNetV2; see ``benchmarks/repro_inductor_freezing.py``).
* **Static shapes**: the compiled engine always runs the batch size it was compiled for; a smaller batch is
  zero-padded (samples are independent once BatchNorm is folded), a larger one is split. On CUDA the default
  mode is ``"reduce-overhead"`` (CUDA graphs).
* **Warm-up you can see**: the first batch runs eagerly, then ``compiling <name> for inference (first batch)...``
  and the time it took are logged; the compiled output is checked against the eager output of that batch and the
  engine falls back to eager, saying why in one line, when compilation raises or disagrees.
* **Never stale**: the copy is refreshed (copied / refolded in place) whenever a parameter or buffer of the
  source changed: in-place updates (optimizer steps, ``load_state_dict``, BatchNorm statistics) bump the tensors'
  version counters, which are compared on every call (tens of microseconds); moving the source to another device
  or dtype rebuilds the copy. At the start of every run (:meth:`InferenceEngine.plan`) tensors replaced or
  reassigned through ``.data`` are found by their storage, and tensors changed in place through ``.data`` (which
  bumps no version counter) by a fingerprint of their values (each tensor's sum and sum of squares).

Gradients: with an input that requires grad (FGSM / PGD), the engine runs the folded copy eagerly with gradients
w.r.t. the input only (its weights never require grad).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_app import (conv_fusion, dedup, dense_blocks, linear_fusion, nasnet_cells, residual_fusion, same_conv,
                           same_pooling, squeeze_excite, subsample, winograd)
from lightning_app.module_swap import restore_modules
from lightning_app.tracing import trace_producer_consumer_pairs

Precision = Literal["auto", "bf16", "fp32"]
CompileArg = Union[bool, Literal["auto"]]

#: compile="auto" on a CPU compiles when the run's estimated eager time is at least this (compiling a zoo model
#: takes ~20 s to a few minutes on 2 cores and saves ~15-25 % of the time per image)
CPU_COMPILE_MIN_SECONDS = 300.0
#: the compiled output must match eager on the warm-up batch: max |diff| / max |eager| at most this ...
VERIFY_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
#: ... or, in bf16, be no further from the batch's float32 result than eager bf16 is, times this margin plus the
#: slack: two bf16 paths round differently (H100, torch 2.11: inductor's ResNet50 / MobileNet / MobileNetV2 are
#: 0.10-0.11 from eager bf16 while each is ~0.1 from float32, the compiled one no further), so agreement with eager
#: alone rejected correct compilations (the margin is the bf16 engine tests' rule)
VERIFY_BF16_MARGIN = 1.5
VERIFY_BF16_SLACK = 1e-3
#: the folded copy must match the source in float32 (the Keras parity tolerance) ...
FOLD_TOLERANCE = 1e-4
#: ... or, where float32 rounding of a very deep network alone exceeds that (random-weight ResNet101 / 152), in
#: float64: a wrong fold changes outputs by far more, rounding by ~1e-13
FOLD_TOLERANCE_FLOAT64 = 1e-9


@dataclass(frozen=True)
class InferenceOptions:
    """How the inference engine runs (``model.inference`` in the YAML).

    Attributes:
        enabled: ``False``: the plain module (eager, NCHW, as it trains) everywhere; the reference path.
        precision: ``"auto"`` (bf16 autocast where the device computes bf16 natively: CUDA GPUs, CPUs with
            AVX512-BF16 / AMX, :func:`native_bf16`; float32 elsewhere), ``"bf16"`` or ``"fp32"`` (no autocast,
            no TF32 convolutions: for parity with Keras float32).
        compile: ``True``, ``False`` or ``"auto"``: always on CUDA; on CPU when the run's estimated eager time is
            at least ``CPU_COMPILE_MIN_SECONDS`` (5 minutes).
        mode: ``torch.compile`` mode; ``"auto"``: ``"reduce-overhead"`` (CUDA graphs) on CUDA, inductor's default
            elsewhere.
        backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` checks the guards without code
            generation, e.g. in tests).
        fold_bn: fold inference-mode BatchNorm into the preceding convolution.
        fuse_activations: on the CPU (float32 or bf16), run each convolution and the activation that alone reads
            its output as one oneDNN call (:mod:`lightning_app.conv_fusion`); in float32 also a ResNet block's last
            convolution with its residual add and activation (:mod:`lightning_app.residual_fusion`) and, where
            oneDNN's matrix product beats MKL's on the CPU (AMD CPUs with AVX-512), linear layers
            (:mod:`lightning_app.linear_fusion`).
        restructure: pool before a DenseNet transition's 1x1 convolution, pool over TF-"same" padding without
            building the padded input (:mod:`lightning_app.same_pooling`); on the CPU in float32 also run DenseNet
            blocks into one buffer instead of concatenating before every layer (:mod:`lightning_app.dense_blocks`),
            and in float32 or bf16 pad TF-"same" convolutions implicitly where the split is even and by one
            zeroed row / column where it is not (a depthwise one by a zero tap of its kernel;
            :mod:`lightning_app.same_conv`), compute a repeated
            stateless operation on one tensor once (NASNet's ReLUs and pools, :mod:`lightning_app.dedup`), and
            scale by a squeeze-and-excitation gate in place (:mod:`lightning_app.squeeze_excite`).
        winograd: on the CPU in float32, eager, run a network whose multiply-adds are mostly in large 3x3
            convolutions (the VGGs) through NNPACK's Winograd kernels, in NCHW (:mod:`lightning_app.winograd`;
            AVX2 CPUs only).
        channels_last: run in NHWC memory format.
        verify: check the compiled engine against eager on the first batch (fall back to eager if they disagree).
    """

    enabled: bool = True
    precision: Precision = "auto"
    compile: CompileArg = "auto"
    mode: Optional[str] = "auto"
    backend: str = "inductor"
    fold_bn: bool = True
    fuse_activations: bool = True
    restructure: bool = True
    winograd: bool = True
    channels_last: bool = True
    verify: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"inference.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"inference.compile must be true, false or 'auto', got {self.compile!r}")

    def effective_precision(self, device: Union[str, torch.device]) -> str:
        """``"bf16"`` or ``"fp32"`` on ``device`` (``"auto"``: bf16 where it computes bf16 natively,
        :func:`native_bf16`)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` computes bfloat16 products natively, so bf16 autocast runs the zoo faster than float32:
    a CUDA GPU, or a CPU with AVX512-BF16 or AMX instructions (oneDNN's bf16 kernels; 2-vCPU AMD EPYC Zen 5,
    batch 16, the engine: 1.1-1.9x float32, e.g. ResNet50 1.75x, VGG16 1.9x, EfficientNetB0 1.1x). Elsewhere bf16
    is emulated and slower than float32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    if kind == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's (x86; private in torch 2.x)
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def as_inference_options(value: Union[InferenceOptions, Mapping[str, Any], bool, None]) -> InferenceOptions:
    """``InferenceOptions`` from the options, a dict of them (as stored in checkpoints), ``None`` (defaults) or a
    bool (``enabled``)."""
    if value is None:
        return InferenceOptions()
    if isinstance(value, InferenceOptions):
        return value
    if isinstance(value, bool):
        return InferenceOptions(enabled=value)
    if isinstance(value, Mapping):
        unknown = set(value) - set(InferenceOptions.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown inference option(s) {sorted(unknown)}; known: "
                             f"{sorted(InferenceOptions.__dataclass_fields__)}")
        return InferenceOptions(**dict(value))
    # jsonargparse may hand over a Namespace
    if hasattr(value, "__dict__"):
        return as_inference_options({k: v for k, v in vars(value).items() if not k.startswith("_")})
    raise TypeError(f"inference must be InferenceOptions, a dict or a bool, got {type(value).__name__}")


def options_dict(options: InferenceOptions) -> Dict[str, Any]:
    """Plain dict of the options (what checkpoints and ``hparams.yaml`` store)."""
    return asdict(options)


# ----------------------------------------------------------------------------- BatchNorm folding
def _bn_replacement(bn: nn.Module) -> Optional[Callable[[nn.Module], nn.Module]]:
    """What replaces a foldable BatchNorm module once folded (``None``: not foldable)."""
    if not isinstance(bn, _BatchNorm) or not bn.track_running_stats or bn.running_mean is None:
        return None
    if type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return lambda m: nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(bn) is BatchNormAct2d:  # batch_norm -> drop -> act
        return lambda m: nn.Sequential(m.drop, m.act)
    return None  # other subclasses may change forward(): leave them alone


def find_conv_bn_pairs(net: nn.Module, example: Tensor) -> List[Tuple[str, str]]:
    """``(conv name, bn name)`` pairs of ``net`` where the BatchNorm folds into the convolution.

    Runs ``net(example)`` once (eval semantics are the caller's business) and keeps a pair when: the convolution
    (not transposed) and the BatchNorm each run exactly once, the BatchNorm's input is the convolution's output
    tensor, and that tensor is read by no other operation (aten level, so in-place ops and functional uses count).
    """
    return _trace_conv_bn_pairs(net, example)[0]


def _trace_conv_bn_pairs(net: nn.Module, example: Tensor) -> Tuple[List[Tuple[str, str]], Any]:
    """:func:`find_conv_bn_pairs` and the output of the forward it ran."""
    return trace_producer_consumer_pairs(
        net, example, producer=lambda m: isinstance(m, _ConvNd) and not m.transposed,
        consumer=lambda m: _bn_replacement(m) is not None, op=lambda m: "batch_norm")


@torch.no_grad()
def fold_conv_bn_(conv: nn.Module, src_conv: nn.Module, bn: _BatchNorm) -> None:
    """Write ``bn(src_conv(.))`` as one convolution into ``conv``'s weight and bias, in place (``conv`` needs a bias).

    Computed in float64 (float32 where the device has no float64) and cast to ``conv``'s dtype.
    """
    dev = src_conv.weight.device
    wide = torch.float32 if dev.type == "mps" else torch.float64
    w = src_conv.weight.detach().to(wide)
    out_ch = w.shape[0]
    ones, zeros = torch.ones(out_ch, dtype=wide, device=dev), torch.zeros(out_ch, dtype=wide, device=dev)
    gamma = bn.weight.detach().to(wide) if bn.weight is not None else ones
    beta = bn.bias.detach().to(wide) if bn.bias is not None else zeros
    bias = src_conv.bias.detach().to(wide) if src_conv.bias is not None else zeros
    scale = gamma * torch.rsqrt(bn.running_var.detach().to(wide) + bn.eps)
    conv.weight.copy_(w * scale.reshape(-1, *([1] * (w.ndim - 1))))
    conv.bias.copy_((bias - bn.running_mean.detach().to(wide)) * scale + beta)


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode inside the block; every submodule's own train/eval flag restored after (a plain
    ``net.train()`` would wake Keras-frozen BatchNorm layers up)."""
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for m, training in flags:
            m.training = training


def _tensors(module: nn.Module) -> Dict[str, Tensor]:
    """Parameters and buffers (persistent or not) by name."""
    out: Dict[str, Tensor] = dict(module.named_parameters())
    out.update(dict(module.named_buffers()))
    return out


def _fingerprint(tensors: Sequence[Tensor]) -> Optional[Tensor]:
    """``[n, 2]`` float64 on the first tensor's device: per tensor its sum and its sum of squares (accumulated in
    float32, float64 for float64 tensors: one read of the weights, ~60 ms for ConvNeXtXLarge's 1.4 GB on 2 CPU
    cores), where a change made behind the version counters (in place through ``.data``) shows; ``None`` for no
    tensors."""
    if not tensors:
        return None
    device = tensors[0].device
    rows = []
    with torch.no_grad():
        for t in tensors:
            acc = (t.dtype if t.dtype == torch.float64 else torch.float32) if t.is_floating_point() else None
            rows.append(torch.stack([t.sum(dtype=acc), (t * t).sum(dtype=acc)]).to(device, torch.float64))
    return torch.stack(rows)


def _drop_hooks(net: nn.Module) -> None:
    """Remove the module hooks ``deepcopy`` carried over (they would see folded convolutions and vanished
    BatchNorm layers, and they get in the way of compilation)."""
    for m in net.modules():
        for name, value in vars(m).items():
            if name.startswith(("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")) \
                    and isinstance(value, dict):
                value.clear()


class FoldedCopy:
    """A copy of ``source`` with BatchNorm ``pairs`` folded, and how to refresh it from ``source`` in place.

    The copy is in eval mode, has ``requires_grad=False`` everywhere, shares no tensor with ``source`` and runs
    without the source's module hooks.
    """

    def __init__(self, source: nn.Module, pairs: List[Tuple[str, str]], channels_last: bool = False) -> None:
        with torch.inference_mode(False), torch.no_grad():
            net = copy.deepcopy(source)
            net.eval().requires_grad_(False)
            _drop_hooks(net)
            self.folds: List[Tuple[nn.Module, nn.Module, _BatchNorm]] = []
            for conv_name, bn_name in pairs:
                conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
                if conv.bias is None:
                    conv.bias = nn.Parameter(conv.weight.new_zeros(conv.weight.shape[0]), requires_grad=False)
                net.set_submodule(bn_name, _bn_replacement(bn)(bn))
                self.folds.append((conv, source.get_submodule(conv_name), source.get_submodule(bn_name)))
            if channels_last:
                net.to(memory_format=torch.channels_last)
            src = _tensors(source)
            folded = {id(conv.weight) for conv, _, _ in self.folds} | {id(conv.bias) for conv, _, _ in self.folds}
            self.sync: List[Tuple[Tensor, Tensor]] = [(t, src[n]) for n, t in _tensors(net).items()
                                                      if id(t) not in folded]
            self.net = net
            self.refresh()

    @property
    def num_folded(self) -> int:
        return len(self.folds)

    def refresh(self) -> None:
        """Copy every tensor from the source and refold (in place: compiled graphs / CUDA graphs stay valid)."""
        with torch.inference_mode(False), torch.no_grad():
            for dst, src in self.sync:
                dst.copy_(src)
            for conv, src_conv, bn in self.folds:
                fold_conv_bn_(conv, src_conv, bn)


def fold_batchnorm(net: nn.Module, example: Tensor, channels_last: bool = False) -> nn.Module:
    """A copy of ``net`` (for inference) with every foldable conv -> BatchNorm pair folded; ``net`` is unchanged.

    Args:
        net: any module; BatchNorm layers are folded with their running statistics (inference semantics).
        example: an input ``net`` accepts (e.g. ``[1, 3, H, W]``), run once to find the pairs.
        channels_last: also convert the copy to channels_last.

    Returns:
        the folded copy (eval mode, no gradients).
    """
    with eval_mode(net):
        pairs = find_conv_bn_pairs(net, example)
    return FoldedCopy(net, pairs, channels_last).net


def _fold_error_float64(source: nn.Module, pairs: List[Tuple[str, str]], example: Tensor) -> float:
    """Relative output change of folding ``pairs`` of ``source``, both computed in float64 (on a copy)."""
    with torch.inference_mode(False), torch.no_grad():
        src64 = copy.deepcopy(source).double().eval()
        folded = FoldedCopy(src64, pairs)
        x = example.double()
        return relative_error(folded.net(x.clone()), src64(x.clone()))


# ----------------------------------------------------------------------------- engine
@contextlib.contextmanager
def _no_tf32(device_type: str) -> Iterator[None]:
    """True float32 convolutions / matmuls on CUDA (TF32 off) inside the block."""
    if device_type != "cuda":
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def precision_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """bf16 autocast, or float32 without autocast and without TF32."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type, enabled=False))
    stack.enter_context(_no_tf32(device_type))
    return stack


def relative_error(a: Tensor, ref: Tensor) -> float:
    """``max |a - ref| / max |ref|`` in float32 (float64 where either is float64)."""
    dtype = torch.float64 if torch.float64 in (a.dtype, ref.dtype) else torch.float32
    a, ref = a.detach().to(dtype), ref.detach().to(dtype)
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def verify_compiled(out: Tensor, eager: Tensor, precision: str, float32: Optional[Callable[[], Tensor]] = None,
                    what: str = "its compiled output differs from eager") -> Optional[str]:
    """``None`` where the compiled output ``out`` may stand in for ``eager`` (same batch, ``[B, ...]``), else why
    not (starting with ``what``): within ``VERIFY_TOLERANCE`` of eager, or (bf16, ``float32`` given: it computes
    the batch in float32) no further from float32 than ``VERIFY_BF16_MARGIN`` x eager's own distance +
    ``VERIFY_BF16_SLACK``."""
    err, tol = relative_error(out, eager), VERIFY_TOLERANCE[precision]
    if math.isfinite(err) and err <= tol:
        return None
    reason = f"{what} by {err:.1e} (> {tol:g})"
    if not math.isfinite(err) or precision != "bf16" or float32 is None:
        return reason
    ref = float32()
    ours, theirs = relative_error(out, ref), relative_error(eager, ref)
    bound = VERIFY_BF16_MARGIN * theirs + VERIFY_BF16_SLACK
    if math.isfinite(ours) and ours <= bound:
        return None
    return (f"{reason} and from float32 by {ours:.1e} (> {bound:.1e}: {VERIFY_BF16_MARGIN:g} x eager bf16's "
            f"{theirs:.1e})")


def rewrite_references(net: nn.Module, example: Tensor, bf16: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """What a rewrite of ``net`` in place is checked against (:func:`rewrite_rejection`): its float32 output on
    ``example`` and, with ``bf16``, its output under CPU bf16 autocast (as float32). Call without autocast."""
    reference = net(example.clone())
    if not bf16:
        return reference, None
    with precision_context("bf16", "cpu"):
        return reference, net(example.clone()).float()


def rewrite_rejection(net: nn.Module, example: Tensor, references: Tuple[Tensor, Optional[Tensor]]
                      ) -> Optional[str]:
    """Why ``net``, rewritten in place since :func:`rewrite_references` gave ``references``, must be put back, or
    ``None``: its float32 output moved by more than ``FOLD_TOLERANCE`` or, with a bf16 reference, its bf16 output
    fails :func:`verify_compiled`'s bf16 rule (two bf16 paths round differently)."""
    reference, reference_bf16 = references
    err = relative_error(net(example.clone()), reference)
    if err > FOLD_TOLERANCE:
        return f"changed its output by {err:.1e} (> {FOLD_TOLERANCE:g})"
    if reference_bf16 is None:
        return None
    with precision_context("bf16", "cpu"):
        out = net(example.clone()).float()
    return verify_compiled(out, reference_bf16, "bf16", lambda: reference,
                           what="its bf16 output differs from the unchanged bf16 one")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InferenceEngine(nn.Module):
    """``images [B, C, H, W] -> features [B, D]`` (float32) of ``source`` through the fast path (module docstring).

    ``source`` is held by reference, not registered: the engine has no parameters of its own, adds nothing to a
    parent's ``state_dict`` and its copy is rebuilt lazily on the source's device. Pickling / deep-copying an
    engine drops the built copy (rebuilt on first use).

    Args:
        source: the network to run (e.g. ``normalize -> backbone``), in its trained state.
        options: :class:`InferenceOptions` (or a dict of them).
        name: shown in the log lines (e.g. the backbone's name).
    """

    def __init__(self, source: nn.Module, options: Union[InferenceOptions, Mapping[str, Any], None] = None,
                 name: str = "model") -> None:
        super().__init__()
        self.__dict__["source"] = source  # not a submodule
        self.options = as_inference_options(options)
        self.name = name
        self.planned_batches: Optional[int] = None
        self.stats: Dict[str, float] = {"refreshes": 0, "refresh_seconds": 0.0, "compile_seconds": 0.0}
        self._reset()

    # -- state
    def _reset(self) -> None:
        self.__dict__["_copy"] = None  # FoldedCopy
        self.__dict__["_compiled"] = None
        self._device: Optional[torch.device] = None
        self._dtype: Optional[torch.dtype] = None
        self._sources: List[Tensor] = []
        self._ids: List[int] = []
        self._versions: List[int] = []
        self._ptrs: List[int] = []
        self._values_fp: Optional[Tensor] = None  # fingerprint of the source's values at the last build / plan()
        self._static: Dict[Tuple[int, ...], int] = {}  # sample shape -> compiled batch size
        # undecided | compiled | eager (compilation failed) | declined (not worth it for this run)
        self._compile_state = "undecided"
        self._batch_dependent = False
        self._n_winograd = 0  # convolutions the copy runs through NNPACK (in NCHW)
        self._n_linear = 0  # linear layers the copy runs through oneDNN
        self._n_residual = 0  # residual blocks whose add (and activation) are post-ops of their last convolution
        self.status = "not built"

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_copy=None, _compiled=None, _device=None, _dtype=None, _sources=[], _ids=[], _versions=[],
                     _ptrs=[], _values_fp=None, _static={}, _compile_state="undecided", status="not built")
        return state

    def plan(self, batches: Optional[int]) -> None:
        """Start of a run (an epoch of validation / test / predict / frozen training): how many batches it has
        (``compile="auto"`` on CPU uses it), and a full staleness check (tensors replaced, moved, ``.data``
        reassigned or changed in place through ``.data``; every call already checks in-place changes)."""
        self.planned_batches = batches
        if self._compile_state == "declined":
            self._compile_state = "undecided"
        if self._copy is not None and [id(t) for t in _tensors(self.source).values()] != self._ids:
            self.__dict__["_copy"] = None  # rebuilt at the next call
        elif self._copy is not None:
            now, then = _fingerprint(self._sources), self._values_fp
            # moved to another device since (rebuilt at the next call) or changed behind the version counters
            untracked = then is not None and (then.device != now.device or not torch.equal(now, then))
            self.refresh(full=True, force=untracked)
            self._values_fp = now

    def precision(self, device: Optional[Union[str, torch.device]] = None) -> str:
        """Effective precision (``"bf16"`` / ``"fp32"``) on ``device`` (default: the source's)."""
        if device is None:
            device = next(iter(_tensors(self.source).values())).device
        return self.options.effective_precision(device)

    def describe(self, device: Optional[Union[str, torch.device]] = None) -> str:
        """What affects the numbers the engine returns (for cache keys): ``"engine-bf16"`` / ``"engine-fp32"``;
        ``"eager"`` when disabled."""
        return f"engine-{self.precision(device)}" if self.options.enabled else "eager"

    # -- building and refreshing
    def _versions_now(self) -> List[int]:
        return [t._version for t in self._sources]

    def _ptrs_now(self) -> List[int]:
        return [t.data_ptr() for t in self._sources]

    def _build(self, x: Tensor) -> None:
        source = self.source
        tensors = list(_tensors(source).values())
        self._reset()
        start = time.perf_counter()
        pairs: List[Tuple[str, str]] = []
        floating = [t for t in tensors if t.is_floating_point()]
        dtype = floating[0].dtype if floating else None
        if self.options.fold_bn:
            example = x[:1].detach().to(dtype or torch.float32)
            with eval_mode(source), torch.inference_mode(False), precision_context("fp32", x.device.type):
                pairs, reference = _trace_conv_bn_pairs(source, example.clone())
                folded = FoldedCopy(source, pairs, self.options.channels_last)
                err = relative_error(folded.net(example.clone()), reference)
            if err > FOLD_TOLERANCE:
                err64 = _fold_error_float64(source, pairs, example)
                if err64 > FOLD_TOLERANCE_FLOAT64:
                    rank_zero_info(f"inference engine: folding BatchNorm changed {self.name}'s output by {err:.1e} "
                                   f"(float64: {err64:.1e} > {FOLD_TOLERANCE_FLOAT64:g}); running it unfolded")
                    folded = FoldedCopy(source, [], self.options.channels_last)
        else:
            folded = FoldedCopy(source, [], self.options.channels_last)
        fused = self._fuse_activations(folded, x, dtype)
        if fused < 0:  # fusion changed the output: the plain folded copy
            folded = FoldedCopy(source, pairs if folded.num_folded else [], self.options.channels_last)
        restructured = self._restructure(folded, x, dtype)
        self._n_winograd = n_winograd = self._winograd(folded, x, dtype)
        self.__dict__["_copy"] = folded
        self._sources, self._ids = tensors, [id(t) for t in tensors]
        self._device, self._dtype = tensors[0].device, tensors[0].dtype
        self._versions, self._ptrs = self._versions_now(), self._ptrs_now()
        self._values_fp = _fingerprint(tensors)
        n_bn = sum(1 for m in source.modules() if isinstance(m, _BatchNorm))
        # zero-padding a batch to the compiled size is exact only when samples do not see each other
        self._batch_dependent = any(isinstance(m, _BatchNorm) and m.running_mean is None for m in source.modules())
        self.status = f"eager, BatchNorm folded {folded.num_folded}/{n_bn}"
        if fused > 0:
            self.status += f", {fused} convolution + activation pairs fused"
        if self._n_linear:  # both 0 when fusing was undone
            self.status += f", {self._n_linear} linear layers on oneDNN"
        if self._n_residual:
            self.status += f", {self._n_residual} residual adds fused"
        if restructured:
            self.status += f", {restructured} modules restructured"
        if n_winograd:
            self.status += f", {n_winograd} convolutions Winograd (NNPACK, NCHW)"
        self.stats["build_seconds"] = time.perf_counter() - start

    def _fuse_activations(self, folded: FoldedCopy, x: Tensor, dtype: Optional[torch.dtype]) -> int:
        """Fuse ``folded``'s convolution -> activation pairs in place where the engine runs oneDNN (the CPU, a
        float32 source of ``dtype``), checked against the unfused copy in float32 and, in bf16, also under bf16
        autocast (:func:`rewrite_rejection`); in float32 also the linear layers and ResNet blocks (their fused forms
        are float32 only). The number fused, or -1 when fusing changed the output beyond the tolerance
        (the caller then rebuilds the copy unfused)."""
        precision = self.options.effective_precision(x.device)
        if (not self.options.fuse_activations or x.device.type != "cpu" or not conv_fusion.available()
                or precision not in ("fp32", "bf16") or dtype != torch.float32):
            return 0
        example = self._prepare(x[:1].detach().to(torch.float32))
        bf16 = precision == "bf16"
        with torch.inference_mode(False), torch.no_grad():
            references = rewrite_references(folded.net, example, bf16)
            fused = conv_fusion.fuse_conv_activations(folded.net, example.clone())
            if not bf16:  # the linear and residual fusions are float32 only
                if linear_fusion.onednn_linear_faster():
                    self._n_linear = linear_fusion.fuse_linears(folded.net, example.clone())
                self._n_residual = len(residual_fusion.fuse_residual_blocks(folded.net, example.clone()))
            wrapped = conv_fusion.wrap_convolutions(folded.net, skip_inside=(residual_fusion.FusedBottleneck,))
            if not fused and not self._n_linear and not self._n_residual and not wrapped:
                return 0
            why = rewrite_rejection(folded.net, example, references)
        if why is not None:
            self._n_linear = self._n_residual = 0
            rank_zero_info(f"inference engine: fusing {self.name}'s convolutions and linear layers with their "
                           f"activations {why}{' in bf16' if bf16 else ''}; running them unfused")
            return -1
        return fused

    def _restructure(self, folded: FoldedCopy, x: Tensor, dtype: Optional[torch.dtype]) -> int:
        """Restructure ``folded`` in place: on every device, DenseNet transitions pool before their 1x1 convolution
        (fewer multiply-adds, compiled or not) and TF-"same" pools pad implicitly (:mod:`lightning_app.
        same_pooling`); where the engine runs on the CPU (a float32 source) in float32 or bf16 autocast, also
        TF-"same" convolutions without a zero-filled copy of their input (:mod:`lightning_app.same_conv`), repeated
        stateless operations on one tensor once (:mod:`lightning_app.dedup`; compiled graphs do both themselves),
        squeeze-and-excitation gates in place (:mod:`lightning_app.squeeze_excite`), NASNet's 1x1 strided pools as
        strided copies (:mod:`lightning_app.subsample`) and its normal cells into their output
        (:mod:`lightning_app.nasnet_cells`); in float32 only, DenseNet blocks into one buffer
        (:mod:`lightning_app.dense_blocks`: the float32 buffer would cast every bf16 layer output, 0.84x on
        DenseNet121 in bf16). Checked against the copy before in float32, like the fold, and in bf16 also under bf16
        autocast (:func:`rewrite_rejection`). The number of modules replaced (0 when none, or when the
        output changed beyond the tolerance: then put back as it was, logged)."""
        if not self.options.restructure:
            return 0
        precision = self.options.effective_precision(x.device)
        eager_cpu = x.device.type == "cpu" and precision in ("fp32", "bf16") and dtype == torch.float32
        bf16 = eager_cpu and precision == "bf16"
        example = self._prepare(x[:1].detach().to(dtype or torch.float32))
        with torch.inference_mode(False), torch.no_grad(), precision_context("fp32", x.device.type):
            references = rewrite_references(folded.net, example, bf16)
            replaced = dense_blocks.restructure_dense_blocks(folded.net, buffers=eager_cpu and not bf16)
            replaced += same_pooling.replace_same_pools(folded.net)
            if eager_cpu:
                replaced += same_conv.replace_same_convs(folded.net, skip_inside=(conv_fusion.ConvAct2d,))
                replaced += subsample.replace_subsamples(folded.net)
                replaced += dedup.deduplicate(folded.net, example.clone())
                replaced += squeeze_excite.replace_squeeze_excite(folded.net, example.clone())
                replaced += nasnet_cells.replace_cells(folded.net)
            if not replaced:
                return 0
            why = rewrite_rejection(folded.net, example, references)
            if why is None:
                return len(replaced)
            restore_modules(folded.net, replaced)
        rank_zero_info(f"inference engine: restructuring {self.name} (dense blocks, same pools, repeated operations) "
                       f"{why}{' in bf16' if bf16 else ''}; running it as it is")
        return 0

    def _winograd(self, folded: FoldedCopy, x: Tensor, dtype: Optional[torch.dtype]) -> int:
        """Where the engine runs eagerly in float32 on the CPU (``compile`` not forced) on batches of at least
        ``winograd.MIN_BATCH`` (the first batch's size), run ``folded`` through NNPACK's Winograd convolutions if
        its large 3x3 convolutions carry most of its work (:func:`lightning_app.winograd.winograd_plan`); the
        engine then feeds it NCHW. Checked against the copy before, like the fold. The number of convolutions
        replaced (0: unchanged, or put back, logged)."""
        if (not self.options.winograd or self.options.compile is True or x.device.type != "cpu"
                or self.options.effective_precision(x.device) != "fp32" or dtype != torch.float32
                or x.ndim != 4 or x.shape[0] < winograd.MIN_BATCH or not winograd.available()):
            return 0
        sample = x[:1].detach().to(torch.float32)
        with torch.inference_mode(False), torch.no_grad():
            names = winograd.winograd_plan(folded.net, self._prepare(sample.clone()))
            if not names:
                return 0
            # checked on a batch NNPACK runs (copies of one sample: its kernels compute each sample on its own)
            example = sample.expand(winograd.MIN_BATCH, *x.shape[1:]).contiguous()
            reference = folded.net(self._prepare(example.clone()))
            replaced = winograd.apply_winograd(folded.net, names)
            self._n_winograd = len(replaced)
            err = relative_error(folded.net(self._prepare(example.clone())), reference)
            if err <= FOLD_TOLERANCE:
                return len(replaced)
            winograd.undo_winograd(folded.net, replaced, self.options.channels_last)
            self._n_winograd = 0
        rank_zero_info(f"inference engine: Winograd convolutions changed {self.name}'s output by {err:.1e} "
                       f"(> {FOLD_TOLERANCE:g}); running them directly")
        return 0

    def refresh(self, full: bool = False, force: bool = False) -> bool:
        """Refresh the copy if the source changed since the last refresh (in-place changes: version counters;
        ``full``: also storage pointers; ``force``: refresh regardless); returns whether it did."""
        if self._copy is None:
            return False
        versions = self._versions_now()
        ptrs = self._ptrs_now() if full or force or versions != self._versions else self._ptrs
        if versions == self._versions and ptrs == self._ptrs and not force:
            return False
        start = time.perf_counter()
        self._copy.refresh()
        self._versions, self._ptrs = versions, ptrs
        self.stats["refreshes"] += 1
        self.stats["refresh_seconds"] += time.perf_counter() - start
        return True

    def _ensure_ready(self, x: Tensor) -> FoldedCopy:
        first = self._sources[0] if self._sources else None
        if self._copy is None or first is None or first.device != self._device or first.dtype != self._dtype:
            self._build(x)
        else:
            self.refresh()
        return self._copy

    # -- running
    def input_memory_format(self) -> torch.memory_format:
        """The memory format the copy takes its ``[B, C, H, W]`` input in (a batch in another one is converted):
        channels_last as the options say, NCHW where it runs NNPACK's convolutions (known once built)."""
        channels_last = self.options.channels_last and not self._n_winograd
        return torch.channels_last if channels_last else torch.contiguous_format

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            return x.contiguous(memory_format=self.input_memory_format())
        return x

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> float32 features; gradients flow to ``x`` when it requires grad."""
        folded = self._ensure_ready(x)
        precision = self.options.effective_precision(x.device)
        if torch.is_grad_enabled() and x.requires_grad:
            with precision_context(precision, x.device.type):
                return folded.net(self._prepare(x)).float()
        with torch.no_grad():
            return self._infer(folded, x, precision)

    def _eager(self, folded: FoldedCopy, x: Tensor, precision: str) -> Tensor:
        with torch.inference_mode(), precision_context(precision, x.device.type):
            out = folded.net(self._prepare(x))
        return out.to(torch.float32, copy=True)

    def _infer(self, folded: FoldedCopy, x: Tensor, precision: str) -> Tensor:
        if self._compile_state in ("eager", "declined") or self.options.compile is False:
            return self._eager(folded, x, precision)
        if self._compile_state == "compiled":
            try:
                return self._run_static(x, precision)
            except Exception as err:  # e.g. a recompilation for a new input size that fails
                self._fall_back(f"torch.compile failed ({type(err).__name__}: {_first_line(err)})")
                return self._eager(folded, x, precision)
        return self._warm_up(folded, x, precision)

    def _warm_up(self, folded: FoldedCopy, x: Tensor, precision: str) -> Tensor:
        """First batch: eager (timed), then compile if worth it, verify against eager, keep the better path."""
        _sync(x.device)
        start = time.perf_counter()
        eager = self._eager(folded, x, precision)
        _sync(x.device)
        per_batch = time.perf_counter() - start
        reason = self._compile_decision(x.device, per_batch)
        if reason is not None:
            self._compile_state = "declined"  # decided again at the next plan() (a longer run may be worth it)
            self.status = self.status.split(", not compiled")[0] + f", not compiled ({reason})"
            return eager
        mode = self.options.mode
        if mode == "auto":
            mode = "reduce-overhead" if x.device.type == "cuda" else None
        if self.options.backend != "inductor":
            mode = None  # modes are inductor's
        rank_zero_info(f"compiling {self.name} for inference (first batch; torch.compile mode={mode}, {precision}, "
                       f"{self.status.split(', ', 1)[-1]})...")
        start = time.perf_counter()
        try:
            self.__dict__["_compiled"] = torch.compile(folded.net, backend=self.options.backend, mode=mode,
                                                          dynamic=False)
            self._static[tuple(x.shape[1:])] = x.shape[0]
            out = self._run_static(x, precision)
            _sync(x.device)
        except Exception as err:
            self._fall_back(f"torch.compile failed ({type(err).__name__}: {_first_line(err)})")
            return eager
        seconds = time.perf_counter() - start
        self.stats["compile_seconds"] += seconds
        if self.options.verify:
            reason = verify_compiled(out, eager, precision, lambda: self._eager(folded, x, "fp32"))
            if reason is not None:
                self._fall_back(reason)
                return eager
        self._compile_state = "compiled"
        self.status = self.status.replace("eager", "compiled", 1)
        rank_zero_info(f"compiled {self.name} for inference in {seconds:.1f} s")
        return out

    def _compile_decision(self, device: torch.device, eager_seconds_per_batch: float) -> Optional[str]:
        """``None`` to compile, else why not."""
        if self._batch_dependent:
            return "it has BatchNorm layers without running statistics (outputs depend on the batch)"
        if self.options.compile is True or device.type == "cuda":
            return None
        if self._n_winograd:
            return ("compile='auto' on CPU: its Winograd (NNPACK) convolutions run eagerly, faster than compiled "
                    "direct ones (VGG16 at 224 px, batch 16, 2 cores: 7.6 against 6.2 img/s)")
        if self.planned_batches is None:
            return "compile='auto' on CPU without a planned run length"
        estimate = eager_seconds_per_batch * self.planned_batches
        if estimate < CPU_COMPILE_MIN_SECONDS:
            return f"compile='auto' on CPU: ~{estimate:.0f} s of eager work < {CPU_COMPILE_MIN_SECONDS:.0f} s"
        return None

    def _fall_back(self, reason: str) -> None:
        self._compile_state = "eager"
        self.__dict__["_compiled"] = None
        self.status = self.status.replace("compiled", "eager", 1) + ", compile failed"
        rank_zero_info(f"inference engine: {self.name} runs eager: {reason}")

    def _run_static(self, x: Tensor, precision: str) -> Tensor:
        """The compiled copy on batches of the compiled size (zero-padded / split), float32 copies out."""
        shape = tuple(x.shape[1:])
        size = self._static.setdefault(shape, x.shape[0])
        outs = []
        for chunk in x.split(size):
            n = chunk.shape[0]
            if n < size:
                chunk = torch.cat([chunk, chunk.new_zeros((size - n, *shape))])
            with torch.inference_mode(), precision_context(precision, x.device.type):
                out = self._compiled(self._prepare(chunk))
            outs.append(out[:n].to(torch.float32, copy=True))  # copied before the next (CUDA graph) replay
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, {self.options}, status={self.status!r}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def inference_engine(source: nn.Module, options: Union[InferenceOptions, Mapping[str, Any], None] = None,
                     name: str = "model") -> InferenceEngine:
    """Function form of :class:`InferenceEngine`."""
    return InferenceEngine(source, options, name)


__all__ = [
    "CPU_COMPILE_MIN_SECONDS",
    "FoldedCopy",
    "InferenceEngine",
    "InferenceOptions",
    "as_inference_options",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "fold_conv_bn_",
    "inference_engine",
    "options_dict",
    "precision_context",
    "relative_error",
    "verify_compiled",
]
