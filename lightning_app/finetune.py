"""Layer-wise unfreezing with Keras semantics, safe under DDP and checkpoint resume.

Three pieces:

* :func:`layer_groups` splits a backbone into ordered groups (input -> output) from its own
  structure: timm's ``group_matcher`` (stem, then one group per block, or per stage with
  ``coarse=True``), else its top-level children.
* :func:`freeze_group` / :func:`unfreeze_group` / :func:`enforce_frozen_bn`: *frozen* means
  Keras-frozen: ``requires_grad=False`` and the group's BatchNorm layers in inference mode
  (running statistics, never updated) even while the surrounding module trains. The
  LightningModule calls :func:`enforce_frozen_bn` from its ``train()`` so ``model.train()``
  never flips them back.
* :class:`LayerwiseUnfreezing`: a callback that unfreezes groups from the top on a schedule.

DDP design: every parameter is in the optimizer from the start, in one param group per layer
group with its final learning rate (so LR schedulers size themselves once and checkpoints
always see the same groups); a frozen parameter simply has no gradient, which every torch
optimizer skips. DDP builds its gradient reducer from the parameters that require grad *when it
wraps the model* (Lightning issue #20340), so parameters unfrozen later are not all-reduced by
DDP. The callback records that set right after the wrap and all-reduces (averages) the gradients
of every other trainable parameter itself, in ``on_before_optimizer_step`` (after backward and
gradient accumulation, before clipping and the step), so all ranks apply identical updates.
The phase is restored from the checkpoint *before* the wrap (``load_state_dict`` runs between
``setup`` and the strategy's setup), so a resumed run also starts with the right reducer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Set, Tuple, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn as nn
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_app.errors import ConfigError

#: Attribute set on a BatchNorm module that must stay in inference mode.
FROZEN_BN_ATTR = "_keras_frozen"

ScheduleValue = Union[int, Literal["all"]]


@dataclass
class LayerGroup:
    """One unit of unfreezing: parameters and BatchNorm layers of a contiguous part of the backbone."""

    name: str
    param_names: List[str]
    params: List[nn.Parameter] = field(repr=False)
    bn_modules: List[_BatchNorm] = field(repr=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


# ----------------------------------------------------------------------------- grouping
def _group_ids(backbone: nn.Module, coarse: bool) -> Dict[str, int]:
    """Parameter name -> group ordinal (0 = nearest the input)."""
    matcher = getattr(backbone, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        try:
            return dict(group_parameters(backbone, matcher(coarse=coarse), reverse=True))
        except (NotImplementedError, TypeError):
            pass
    # Fallback: one group per top-level child that owns parameters, in registration order.
    ids: Dict[str, int] = {}
    gid = -1
    for child_name, child in backbone.named_children():
        names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            gid += 1
            ids.update({n: gid for n in names})
    for n, _ in backbone.named_parameters(recurse=False):
        ids[n] = 0
    return ids


def layer_groups(backbone: nn.Module, coarse: bool = False) -> List[LayerGroup]:
    """Ordered layer groups of ``backbone`` (input -> output); every parameter in exactly one group.

    A BatchNorm layer belongs to the group of its weight (or of its first parameter); BatchNorm
    layers without affine parameters belong to the group of their parent module's parameters.
    """
    ids = _group_ids(backbone, coarse)
    named = dict(backbone.named_parameters())
    missing = set(named) - set(ids)
    if missing:
        raise RuntimeError(f"layer grouping missed parameters {sorted(missing)[:5]}")
    ordinals = sorted(set(ids.values()))
    remap = {g: i for i, g in enumerate(ordinals)}
    groups = [LayerGroup(name="", param_names=[], params=[], bn_modules=[]) for _ in ordinals]
    for name, p in named.items():
        g = groups[remap[ids[name]]]
        g.param_names.append(name)
        g.params.append(p)
    for mod_name, mod in backbone.named_modules():
        if not isinstance(mod, _BatchNorm):
            continue
        own = [f"{mod_name}.{n}" for n, _ in mod.named_parameters(recurse=False)]
        key = own[0] if own else _nearest_param(mod_name, named)
        gid = remap[ids[key]] if key is not None else len(groups) - 1
        groups[gid].bn_modules.append(mod)
    for g in groups:
        g.name = _common_prefix(g.param_names)
    return groups


def _nearest_param(module_name: str, named: Mapping[str, nn.Parameter]) -> Optional[str]:
    prefix = module_name.rsplit(".", 1)[0] if "." in module_name else ""
    for n in named:
        if n.startswith(prefix):
            return n
    return next(iter(named), None)


def _common_prefix(names: Sequence[str]) -> str:
    if not names:
        return "<empty>"
    parts = [n.split(".") for n in names]
    out: List[str] = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        out.append(tokens[0])
    if out:
        return ".".join(out)
    heads = sorted({n.split(".")[0] for n in names})
    return "+".join(heads[:3]) + ("+..." if len(heads) > 3 else "")


# ----------------------------------------------------------------------------- freezing
def freeze_group(group: LayerGroup) -> None:
    """Keras-freeze a group: no gradients, BatchNorm in inference mode (running stats, no updates)."""
    for p in group.params:
        p.requires_grad_(False)
        p.grad = None
    for bn in group.bn_modules:
        setattr(bn, FROZEN_BN_ATTR, True)
        bn.eval()


def unfreeze_group(group: LayerGroup, train_bn: bool) -> None:
    """Make a group trainable; with ``train_bn=False`` its BatchNorm layers stay frozen
    (parameters fixed, inference mode), as the Keras fine-tuning guide recommends."""
    bn_params: Set[int] = set()
    if not train_bn:
        bn_params = {id(p) for bn in group.bn_modules for p in bn.parameters(recurse=False)}
    for p in group.params:
        p.requires_grad_(id(p) not in bn_params)
    for bn in group.bn_modules:
        setattr(bn, FROZEN_BN_ATTR, not train_bn)
        if train_bn:
            bn.train(True)
        else:
            bn.eval()


def freeze_all(groups: Iterable[LayerGroup]) -> None:
    for g in groups:
        freeze_group(g)


def enforce_frozen_bn(module: nn.Module) -> None:
    """Put every BatchNorm marked frozen back into inference mode (call after ``module.train()``)."""
    for m in module.modules():
        if getattr(m, FROZEN_BN_ATTR, False) and m.training:
            m.train(False)


def bn_is_frozen(module: nn.Module) -> bool:
    return bool(getattr(module, FROZEN_BN_ATTR, False))


# ----------------------------------------------------------------------------- compiled training forward
def smallest_spatial_conv_input(net: nn.Module, x: torch.Tensor) -> Optional[int]:
    """The smallest side of any input to a convolution with a kernel larger than 1x1 when ``net`` runs on ``x``
    (``None``: no such convolution). One forward of ``x`` without gradients, every module in inference mode for
    it (no BatchNorm statistic moves), training flags restored after."""
    sides: List[int] = []

    def record(module: nn.Module, args: Tuple[Any, ...]) -> None:
        sides.append(min(args[0].shape[-2:]))

    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)]
    hooks = [m.register_forward_pre_hook(record) for m in convs]
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return min(sides) if sides else None


class CompiledBackbone:
    """``torch.compile`` of a backbone's training forward that keeps working through layer-wise unfreezing.

    Dynamo guards every parameter's ``requires_grad`` and every module's ``training`` flag, so unfreezing a group
    (or letting its BatchNorm train) makes the next call compile a graph for the new trainable set: its backward
    then produces the new group's gradients, and Keras-frozen BatchNorm layers stay in inference mode (their
    ``training`` flag is part of the graph). The number of graphs is bounded by the trainable sets of the
    schedule (times the batch shapes, e.g. a smaller last batch) and by dynamo's recompile limit; each new graph
    is logged. If compiling raises, the backbone runs eagerly from then on (said once). The wrapper shares the
    backbone's parameters and is not a submodule (no ``state_dict`` / checkpoint change).
    """

    def __init__(self, backbone: nn.Module, **compile_kwargs: Any) -> None:
        self.backbone = backbone
        self.compiled = torch.compile(backbone, **compile_kwargs)
        self.graphs = 0
        self.failed: Optional[str] = None
        self._checked: Set[Tuple[int, ...]] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is None and x.is_cuda and tuple(x.shape[-2:]) not in self._checked:
            self._checked.add(tuple(x.shape[-2:]))
            side = smallest_spatial_conv_input(self.backbone, x[:1])
            if side is not None and side <= 1:
                self.failed = (f"a {x.shape[-2]}x{x.shape[-1]} input reaches a spatial convolution as a 1x1 feature map, "
                               "whose compiled backward fails on CUDA (inductor mispredicts the weight gradient's "
                               "strides, pytorch/pytorch#171622)")
                rank_zero_warn(f"not compiling the training backbone: {self.failed}; training it eagerly (a larger "
                               "image_size avoids this)")
        if self.failed is not None:
            return self.backbone(x)
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        try:
            out = self.compiled(x)
        except Exception as err:  # a compiler failure: train eagerly (a real error raises again there)
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            rank_zero_warn(f"torch.compile of the training backbone failed ({self.failed}); training it eagerly")
            return self.backbone(x)
        new = counters["stats"]["unique_graphs"] - before
        if new:
            self.graphs += new
            trainable = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
            rank_zero_info(f"compiled the training backbone: {new} new graph(s), {self.graphs} in all "
                           f"({trainable:,} trainable backbone parameters)")
        return out


# ----------------------------------------------------------------------------- schedule
def parse_schedule(schedule: Mapping[Any, ScheduleValue]) -> Dict[int, ScheduleValue]:
    """Validate ``{epoch: number of groups to unfreeze (from the top) | "all"}``."""
    out: Dict[int, ScheduleValue] = {}
    for k, v in schedule.items():
        try:
            epoch = int(k)
        except (TypeError, ValueError):
            raise ConfigError(f"schedule keys must be epochs (ints), got {k!r}") from None
        if epoch < 0:
            raise ConfigError(f"schedule epoch must be >= 0, got {epoch}")
        if isinstance(v, str):
            if v.lower() != "all":
                raise ConfigError(f"schedule value must be a positive int or 'all', got {v!r} at epoch {epoch}")
            v = "all"
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"schedule value must be a positive int or 'all', got {v!r} at epoch {epoch}")
        out[epoch] = v
    return dict(sorted(out.items()))


def unfrozen_at(schedule: Mapping[int, ScheduleValue], epoch: int, num_groups: int) -> int:
    """Number of backbone groups (counted from the top) trainable during ``epoch``."""
    n = 0
    for e, v in schedule.items():
        if e <= epoch:
            n = num_groups if v == "all" else n + int(v)
    return min(n, num_groups)


# ----------------------------------------------------------------------------- DDP gradient sync
def allreduce_grads(params: Sequence[nn.Parameter], bucket_bytes: int = 25 * 2**20) -> None:
    """Average ``p.grad`` over all ranks for ``params`` (flattened into buckets, one dtype each)."""
    if not params:
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params]
    bucket: List[torch.Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket, size = [], 0

    for g in sorted(grads, key=lambda t: (str(t.dtype), str(t.device))):
        if bucket and (g.dtype != bucket[0].dtype or g.device != bucket[0].device or size >= bucket_bytes):
            flush()
        bucket.append(g)
        size += g.numel() * g.element_size()
    flush()


def _is_ddp_wrapped(trainer: "pl.Trainer") -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(getattr(trainer.strategy, "model", None), DistributedDataParallel)


# ----------------------------------------------------------------------------- callback
class LayerwiseUnfreezing(Callback):
    """Unfreeze the backbone's layer groups from the top on an epoch schedule (Keras-style fine-tuning).

    Works with a LightningModule that exposes ``layer_groups`` (a list of :class:`LayerGroup`,
    input -> output), such as :class:`lightning_app.module.TransferModule` with
    ``stage="finetune"``; learning rates per group (layer decay) come from the module's optimizer.

    Args:
        schedule: ``{epoch: n}``: at the start of ``epoch`` unfreeze ``n`` more groups, counted
            from the top (``"all"`` = every remaining group). Before the first entry only the head
            trains. ``{3: 1, 6: 2}``: epochs 0-2 head only, 3-5 the last group, 6+ the last three.
        train_bn: ``False`` (Keras guide) keeps the BatchNorm layers of unfrozen groups frozen
            (inference mode, fixed gamma/beta); ``True`` trains them.
        verbose: log each unfreeze on rank 0.
    """

    def __init__(self, schedule: Dict[int, ScheduleValue], train_bn: bool = False, verbose: bool = True) -> None:
        super().__init__()
        self.schedule = parse_schedule(schedule)
        self.train_bn = bool(train_bn)
        self.verbose = verbose
        self.num_unfrozen = 0
        self._module: Optional[pl.LightningModule] = None
        self._ddp_reduced: Optional[Set[int]] = None  # ids of params DDP's reducer covers; None = no DDP
        self._manual: List[nn.Parameter] = []

    # -- helpers
    @staticmethod
    def _groups(pl_module: pl.LightningModule) -> List[LayerGroup]:
        groups = getattr(pl_module, "layer_groups", None)
        if groups is None:
            raise TypeError(
                f"LayerwiseUnfreezing needs a module with a `layer_groups` attribute; {type(pl_module).__name__} has none"
            )
        return groups

    def apply(self, pl_module: pl.LightningModule, num_unfrozen: int) -> None:
        """Freeze every backbone group, then unfreeze the top ``num_unfrozen`` ones (idempotent)."""
        groups = self._groups(pl_module)
        num_unfrozen = max(0, min(num_unfrozen, len(groups)))
        first_trainable = len(groups) - num_unfrozen
        for i, g in enumerate(groups):
            if i >= first_trainable:
                unfreeze_group(g, self.train_bn)
            else:
                freeze_group(g)
        self.num_unfrozen = num_unfrozen
        self._refresh_manual(pl_module)

    def _refresh_manual(self, pl_module: pl.LightningModule) -> None:
        if self._ddp_reduced is None:
            self._manual = []
            return
        self._manual = [p for p in pl_module.parameters() if p.requires_grad and id(p) not in self._ddp_reduced]

    # -- hooks
    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, "stage", "finetune") != "finetune":
            raise ConfigError(
                f"LayerwiseUnfreezing needs model.stage='finetune', got {pl_module.stage!r}: "
                "remove the callback or set the stage"
            )
        self._module = pl_module
        self._ddp_reduced = None
        groups = len(self._groups(pl_module))
        asked = sum(v for v in self.schedule.values() if v != "all")
        if asked > groups and "all" not in self.schedule.values():
            raise ConfigError(
                f"the unfreezing schedule {self.schedule} unfreezes {asked} layer groups, but "
                f"{getattr(pl_module, 'backbone_name', 'the backbone')} has {groups}: unfreeze at most {groups} "
                f"in all, or use 'all' for every remaining group")
        self.apply(pl_module, unfrozen_at(self.schedule, 0, groups))

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        # Runs right after the strategy wrapped the model: what requires grad now is what DDP reduces.
        if trainer.world_size > 1 and not _is_ddp_wrapped(trainer):
            raise RuntimeError(
                f"LayerwiseUnfreezing supports single-device and DDP strategies, not {type(trainer.strategy).__name__}"
            )
        if _is_ddp_wrapped(trainer):
            self._ddp_reduced = {id(p) for p in pl_module.parameters() if p.requires_grad}
        self._refresh_manual(pl_module)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        groups = self._groups(pl_module)
        target = unfrozen_at(self.schedule, trainer.current_epoch, len(groups))
        if target != self.num_unfrozen:
            before = self.num_unfrozen
            self.apply(pl_module, target)
            if self.verbose:
                names = [g.name for g in groups[len(groups) - target:len(groups) - before]]
                trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
                rank_zero_info(
                    f"epoch {trainer.current_epoch}: unfroze {target - before} layer group(s) {names}; "
                    f"{target}/{len(groups)} backbone groups trainable, {trainable:,} trainable parameters"
                )
        enforce_frozen_bn(pl_module)

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._ddp_reduced is None or not self._manual:
            return
        allreduce_grads([p for p in self._manual if p.grad is not None])

    def state_dict(self) -> Dict[str, Any]:
        return {"num_unfrozen": self.num_unfrozen, "schedule": dict(self.schedule), "train_bn": self.train_bn}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = {int(k): v for k, v in state_dict.get("schedule", {}).items()}
        if saved and saved != self.schedule:
            rank_zero_info(f"LayerwiseUnfreezing: checkpoint schedule {saved} differs from {self.schedule}; using the new one")
        self.num_unfrozen = int(state_dict["num_unfrozen"])
        if self._module is not None:  # load_state_dict runs after setup and before the DDP wrap
            self.apply(self._module, self.num_unfrozen)


class BatchNormMomentum(Callback):
    """Sets the PyTorch momentum (1 - Keras momentum) of every BatchNorm layer of the model when fitting starts.

    Zoo models keep Keras's momentum (0.99, i.e. 0.01 here; 0.999, i.e. 0.001, in MobileNetV2 / V3 and
    EfficientNet). That suits fine-tuning from ImageNet statistics over many steps, as in Keras. A short
    run from random initialisation needs faster running statistics: at 0.001, 240 steps leave about 80% of
    the initial (0, 1) statistics in place, so evaluation-mode accuracy stays near chance while training
    accuracy climbs (in Keras too). Keras-frozen BatchNorm layers never update their statistics, whatever
    their momentum.
    """

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"BatchNormMomentum: momentum must be in (0, 1] (PyTorch's, 1 - Keras's), got {momentum}")
        self.momentum = momentum

    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for module in pl_module.modules():
                if isinstance(module, _BatchNorm):
                    module.momentum = self.momentum


class ParameterSyncCheck(Callback):
    """Debug aid for DDP: at the end of every ``every_n_epochs``-th training epoch, all-gather a digest of
    every parameter (and the buffers of frozen BatchNorm layers) and raise if ranks differ.

    ``path`` (optional) receives JSON lines ``{"epoch", "rank", "digest", "trainable"}`` from rank 0.
    """

    def __init__(self, every_n_epochs: int = 1, path: Optional[str] = None, raise_on_mismatch: bool = True) -> None:
        super().__init__()
        self.every_n_epochs = every_n_epochs
        self.path = path
        self.raise_on_mismatch = raise_on_mismatch

    @staticmethod
    def digest(module: nn.Module) -> str:
        import hashlib

        h = hashlib.sha256()
        for name, p in module.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        for name, m in module.named_modules():
            if bn_is_frozen(m):
                for bname, b in m.named_buffers(recurse=False):
                    h.update(f"{name}.{bname}".encode())
                    h.update(b.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        mine = {
            "epoch": trainer.current_epoch,
            "rank": trainer.global_rank,
            "digest": self.digest(pl_module),
            "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
        }
        if dist.is_available() and dist.is_initialized():
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if trainer.is_global_zero and self.path:
            import json

            with open(self.path, "a") as f:
                for row in gathered:
                    f.write(json.dumps(row) + "\n")
        if self.raise_on_mismatch and len({g["digest"] for g in gathered}) > 1:
            raise RuntimeError(f"parameters differ across ranks at epoch {trainer.current_epoch}: {gathered}")


__all__ = [
    "BatchNormMomentum",
    "CompiledBackbone",
    "LayerGroup",
    "LayerwiseUnfreezing",
    "ParameterSyncCheck",
    "allreduce_grads",
    "bn_is_frozen",
    "enforce_frozen_bn",
    "freeze_all",
    "freeze_group",
    "layer_groups",
    "parse_schedule",
    "unfreeze_group",
    "unfrozen_at",
]
