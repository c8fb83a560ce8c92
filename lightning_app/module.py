"""The LightningModule: [0, 1] RGB images -> Keras normalisation -> zoo backbone -> dense head.

Stages:

* ``extract``: the backbone is frozen and only the head trains, on cached features
  (:mod:`lightning_app.data.features` computes them once). ``forward`` takes either images
  ``[B, 3, H, W]`` (full model; used for validate / test / predict on images) or features ``[B, D]``.
* ``head``: the backbone is frozen (Keras-frozen: no gradients, BatchNorm in inference mode) and the
  model trains end to end on (augmented) images.
* ``finetune``: the backbone is trainable; with a :class:`lightning_app.finetune.LayerwiseUnfreezing`
  callback it starts frozen and is unfrozen group by group on a schedule.

Every forward of the backbone that does not train it goes through :class:`lightning_app.engine.InferenceEngine`
(BatchNorm folded into a copy, channels_last, bf16 autocast where the device computes bf16 natively: CUDA GPUs,
CPUs with AVX512-BF16 / AMX; ``torch.compile``): validate / test / predict
and the robustness loop (the module in eval mode; attacks get gradients w.r.t. the input), and, while training,
a backbone that cannot change (every parameter frozen, no active dropout): the ``extract`` / ``head`` stages and
the head-only epochs of ``finetune``. ``inference: {enabled: false}`` runs the plain module everywhere.

The optimizer is injected as a callable (``OptimizerCallable``) so the module keeps control of
its parameter groups: one for the head (``lr``) and, when fine-tuning, one per backbone layer group
(``lr * backbone_lr_scale * layer_decay ** depth``, depth 0 = the group nearest the head). When
fine-tuning, all parameters are in the optimizer from the start; frozen ones just have no gradient.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_app.checkpoint import (
    METADATA_KEY,
    RNG_KEY,
    capture_rng_state,
    data_spec,
    inference_metadata,
    restore_rng_state,
    weights_provenance,
)
from lightning_app.checkpoint import metadata as checkpoint_metadata
from lightning_app.cpu_settings import apply_cpu_settings, trainer_device
from lightning_app.data.feature_loader import FeatureChunk
from lightning_app.data.host_copy import HostCopyQueue
from lightning_app.dropout import Dropout
from lightning_app.engine import InferenceEngine, InferenceOptions, as_inference_options, options_dict
from lightning_app.errors import ConfigError
from lightning_app.finetune import (CompiledBackbone, LayerGroup, bn_is_frozen, enforce_frozen_bn, freeze_all,
                                   layer_groups)
from lightning_app.head_steps import EagerHeadSteps, EpochStats, select_head_steps
from lightning_app.zoo.normalize import Normalize

Stage = Literal["extract", "head", "finetune"]
STAGES: Tuple[str, ...] = ("extract", "head", "finetune")

#: training defaults on a CPU (``channels_last`` / ``compile_backbone`` left ``None``), chosen by measuring ResNet50
#: training steps (fp32, 224 px, batch 8, Adam fused; CPU seconds of one thread, 2-core AMD EPYC, torch 2.14):
#: NCHW eager 2.74 img/s, channels_last eager 2.93, torch.compile 2.47 (channels_last 2.32; ~7 min to compile)
CPU_TRAINING_DEFAULTS: Dict[str, bool] = {"channels_last": True, "compile_backbone": False}
#: training defaults on CUDA: compiling the training backbone is opt-in (``model.compile_backbone: true``): on the
#: H100 with torch 2.11, inductor's backward of a channels_last 3x3 convolution on a 1x1 feature map failed
#: (fake-kernel stride assertion in ``aten.convolution_backward``, pytorch/pytorch#171622), an error at backward
#: time; ``finetune.CompiledBackbone`` now probes the input size and trains eagerly where such a map occurs
CUDA_TRAINING_DEFAULTS: Dict[str, bool] = {"channels_last": True, "compile_backbone": False}

#: ``weights`` value: Keras ImageNet weights when already in the local cache, else random init.
IMAGENET_IF_CACHED = "imagenet_if_cached"


class FeatureNet(nn.Module):
    """``normalize -> backbone`` (optionally channels-last): images in [0, 1] -> pooled features."""

    def __init__(self, normalize: nn.Module, backbone: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)


def backbone_is_fixed(backbone: nn.Module) -> bool:
    """True when a training-mode forward of ``backbone`` equals its inference forward and trains nothing: no
    parameter requires grad, every BatchNorm is in inference mode and no dropout / drop-path is active."""
    if any(p.requires_grad for p in backbone.parameters()):
        return False
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            return False
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
        if m.training and float(getattr(m, "drop_prob", 0.0) or 0.0) > 0:  # timm DropPath / DropBlock
            return False
    return True


def build_head(in_features: int, hidden: Sequence[int], dropout: float, num_classes: int) -> nn.Sequential:
    """Dense head: ``[Dropout] -> (Linear -> ReLU -> Dropout) * len(hidden) -> Linear(num_classes)``.

    Keras equivalent: ``Dense(h, activation="relu")``/``Dropout(dropout)`` blocks and a final
    ``Dense(num_classes)`` (the softmax lives in the loss). The dropout is :class:`lightning_app.dropout.Dropout`
    (a cheaper mask on the CPU).
    """
    layers: List[nn.Module] = []
    width = in_features
    for h in hidden:
        if h < 1:
            raise ConfigError(f"hidden sizes must be positive, got {list(hidden)}")
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(Dropout(dropout))
        width = h
    if not hidden and dropout > 0:
        layers.append(Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def resolve_weights(backbone: str, weights: Optional[str]) -> Optional[str]:
    """Map the ``weights`` option to what ``create_backbone`` takes.

    ``"imagenet_if_cached"`` becomes ``"imagenet"`` when the Keras ImageNet weights (notop) are in the
    local cache and ``None`` (random initialisation, with a plain warning) otherwise.
    """
    if weights != IMAGENET_IF_CACHED:
        return weights
    from lightning_app.zoo import get_entry
    from lightning_app.zoo.weights import cache_dir, is_cached

    try:
        get_entry(backbone)
    except KeyError:
        rank_zero_warn(
            f"{backbone!r} is not a zoo model, so it has no Keras ImageNet weights: "
            "the backbone starts from RANDOM initialisation."
        )
        return None
    if is_cached(backbone, include_top=False):
        return "imagenet"
    rank_zero_warn(
        f"Keras ImageNet weights for {backbone} are not in the local cache ({cache_dir()}): "
        f"the backbone starts from RANDOM initialisation, so accuracy will be far below a pretrained run. "
        f"To use pretrained weights, run once with network access and weights='imagenet' "
        f"(or see `python -m converters --help`)."
    )
    return None


def _last_batch(batches: Any, batch_idx: int, dataloader_idx: int) -> bool:
    """Whether ``batch_idx`` is the last batch of dataloader ``dataloader_idx`` of an evaluation loop (``batches``:
    the Trainer's batch counts per dataloader). Lightning computes a loader's logged metrics right after its last
    batch, before any epoch-end hook; where the count is unknown (an iterable without a length) every batch is."""
    try:
        total = batches[dataloader_idx]
    except (IndexError, KeyError, TypeError):
        return True
    return not math.isfinite(total) or batch_idx + 1 >= total


def _native_size(backbone: nn.Module) -> Optional[int]:
    """The backbone's native (pretrained) input size from its timm config, if it has one."""
    size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size")
    return int(min(size[-2:])) if size else None


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    """top-1 / top-5 accuracy and macro F1 as one collection, with ``compute_groups=False``.

    torchmetrics' compute groups merge metrics whose states happen to be equal after the first update
    (e.g. top-1 and top-5 when every sample of the first batch is right) and from then on update only the
    group's first metric, so the others report its value (wrong in one process, and mis-synced under DDP).
    """
    metrics: Dict[str, Any] = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    metrics["f1"] = MulticlassF1Score(num_classes, average="macro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


class TransferModule(pl.LightningModule):
    """Zoo backbone + dense head for image classification (see the module docstring for stages).

    Args:
        backbone: Keras name from the zoo (``"InceptionV3"``) or any timm model name.
        num_classes: number of classes (linked from ``data.num_classes`` by the CLI).
        weights: ``"imagenet"`` (error if unavailable offline), ``"imagenet_if_cached"``, a path to a
            ``.safetensors`` / Keras ``.h5`` file, or ``None`` (random init).
        stage: ``"extract"``, ``"head"`` or ``"finetune"``.
        hidden: widths of the head's hidden dense layers (``[]`` = linear head).
        dropout: dropout rate in the head.
        optimizer: optimizer factory called with the param groups (``lr`` is set per group).
        lr: learning rate of the head (``None``: the optimizer's own ``lr``); backbone groups are scaled from it.
        backbone_lr_scale: backbone learning rate relative to ``lr``.
        layer_decay: per-group factor going down from the head (1.0 = same lr everywhere).
        coarse_groups: layer groups per stage instead of per block.
        label_smoothing: cross-entropy label smoothing.
        scheduler: optional LR scheduler factory (``ReduceLROnPlateau`` monitors ``val_loss``).
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``drop_path_rate``).
        steps_per_execution: ``extract`` stage only: optimizer steps per Lightning training step, like
            Keras ``compile(steps_per_execution=...)``; ``None`` (default) chooses it from the epoch length
            (:func:`~lightning_app.data.feature_loader.auto_steps_per_execution`). The feature loader serves
            chunks of that many mini-batches (same batch size, same order) and the module runs their optimizer
            steps itself (manual optimization; on a single GPU captured in a CUDA graph, see
            :mod:`lightning_app.head_steps`), so Lightning's per-step overhead and per-step hooks run once per
            chunk. ``1``: one Lightning step (automatic optimization, every hook, gradient clipping and
            accumulation available) per optimizer step. Head training on cached features always runs in
            float32, whatever the Trainer's precision (it is launch-bound, not compute-bound).
        channels_last: train the backbone in NHWC memory format; ``None`` (default): on CUDA (faster
            convolutions, with ``bf16-mixed`` above all) and on CPU (measured faster for ResNet50 training steps
            there too, see ``CPU_TRAINING_DEFAULTS``).
        compile_backbone: ``torch.compile`` the backbone's training forward (:class:`~lightning_app.finetune.
            CompiledBackbone`: recompiles when layer-wise unfreezing changes the trainable set, logged);
            ``None`` (default): off (``CUDA_TRAINING_DEFAULTS``, ``CPU_TRAINING_DEFAULTS``: why).
        compile_kwargs: extra ``torch.compile`` arguments for it (``mode``, ``backend``, ``dynamic``...).
        inference: how the inference engine runs (:class:`lightning_app.engine.InferenceOptions`: ``enabled``,
            ``precision`` auto / bf16 / fp32, ``compile`` true / false / auto, ...; ``model.inference`` in the
            YAML); a dict of them is accepted (checkpoints store a dict).
    """

    def __init__(
        self,
        backbone: str = "ResNet50",
        num_classes: int = 2,
        weights: Optional[str] = IMAGENET_IF_CACHED,
        stage: Stage = "head",
        hidden: List[int] = [],  # noqa: B006 - jsonargparse wants the literal default
        dropout: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr: Optional[float] = None,
        backbone_lr_scale: float = 1.0,
        layer_decay: float = 1.0,
        coarse_groups: bool = False,
        label_smoothing: float = 0.0,
        scheduler: Optional[LRSchedulerCallable] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        steps_per_execution: Optional[int] = None,
        channels_last: Optional[bool] = None,
        compile_backbone: Optional[bool] = None,
        compile_kwargs: Optional[Dict[str, Any]] = None,
        inference: Optional[InferenceOptions] = None,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if steps_per_execution is not None and (steps_per_execution < 1 or (steps_per_execution > 1 and stage != "extract")):
            raise ConfigError(f"steps_per_execution must be None or 1, or >= 1 with stage='extract'; "
                              f"got {steps_per_execution}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"model.lr must be > 0, got {lr}: a learning rate <= 0 does not train (a negative one "
                              f"climbs the loss); typical values are 1e-4 .. 1e-2")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        try:
            self.inference_options = as_inference_options(inference)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.inference: {err}") from None
        self.hparams["inference"] = options_dict(self.inference_options)  # a plain dict in checkpoints
        self.__dict__["_engine"] = None  # built on first use; never a submodule (not in state_dict / checkpoints)
        self._frozen_forward: Optional[bool] = None  # cached per training epoch
        from lightning_app.zoo import create_backbone, preprocessing

        self.backbone_name = backbone
        self.stage: str = stage
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr = lr
        self.backbone_lr_scale = backbone_lr_scale
        self.layer_decay = layer_decay
        self.label_smoothing = label_smoothing
        self.steps_per_execution = steps_per_execution
        # extract stage: the module runs the optimizer steps of each feature chunk itself (lightning_app.head_steps)
        self.automatic_optimization = not (stage == "extract" and steps_per_execution != 1)
        self._head_steps: Optional[EagerHeadSteps] = None
        # logits, labels and losses of each loop stay on the device until the epoch's end (or a full buffer): the
        # metrics' updates synchronise with the host, which would stall the GPU at every step
        self._epoch_stats = EpochStats()
        self._val_stats = EpochStats()
        self._test_stats = EpochStats()
        self._test_stats_dl = 0  # the test dataloader whose batches _test_stats holds (loaders run one by one)
        self._progress_copies = HostCopyQueue(max_pending=8)  # the progress bar's loss, copied without a wait

        mean, std = preprocessing(backbone)
        self.normalize = Normalize(mean, std)
        self.weights_used = resolve_weights(backbone, weights)
        self.backbone = create_backbone(backbone, weights=self.weights_used, num_classes=0, **(backbone_kwargs or {}))
        self.weights_provenance: Dict[str, Any] = weights_provenance(backbone, self.weights_used)
        #: what the model was trained on: class names, input size, resize mode (checkpoint metadata; see setup)
        self.data_spec: Dict[str, Any] = {}
        self._pending_rng: Optional[Dict[str, Any]] = None
        self.channels_last = False  # the backbone's memory format now (set_channels_last)
        if channels_last:
            self.set_channels_last(True)
        self.compile_backbone = compile_backbone
        self.compile_kwargs = dict(compile_kwargs or {})
        self.__dict__["_compiled_backbone"] = None  # CompiledBackbone while fitting; never a submodule
        self._last_compiled_graphs = 0  # graphs the last fit compiled (the log says when)
        self.num_features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        self.head = build_head(self.num_features, hidden, dropout, num_classes)
        self.layer_groups: List[LayerGroup] = layer_groups(self.backbone, coarse=coarse_groups)
        if stage in ("extract", "head"):
            freeze_all(self.layer_groups)

        self.train_metrics = _metrics(num_classes, "train_")
        self.val_metrics = _metrics(num_classes, "val_")
        self.test_metrics = nn.ModuleList([_metrics(num_classes, "test_")])
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.test_loss = nn.ModuleList([MeanMetric()])
        self._logged: Dict[str, Any] = {"train": False, "val": False, "test": set()}
        #: log the step loss to the progress bar every this many training steps
        self.progress_every = 20

    # ------------------------------------------------------------------ model
    @property
    def pretrained(self) -> bool:
        """Whether the backbone was loaded from weights (not randomly initialised)."""
        return self.weights_used is not None

    @property
    def engine(self) -> InferenceEngine:
        """The inference engine over ``normalize -> backbone`` (built on first use)."""
        if self._engine is None:
            self.__dict__["_engine"] = InferenceEngine(
                FeatureNet(self.normalize, self.backbone), self.inference_options, name=self.backbone_name)
        return self._engine

    def uses_engine(self) -> bool:
        """Whether :meth:`features` runs through the inference engine now: in eval mode, and while training when
        the backbone cannot change (no trainable parameter, no active dropout)."""
        if not self.inference_options.enabled:
            return False
        if not self.training:
            return True
        if self._frozen_forward is None:
            return backbone_is_fixed(self.backbone)
        return self._frozen_forward

    def input_memory_format(self) -> Optional[torch.memory_format]:
        """The memory format :meth:`features` takes images in now: the engine's where it runs them, else ``None``
        (no preference). The image DataModules serve evaluation batches in it (``data.base``)."""
        return self.engine.input_memory_format() if self.uses_engine() else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of [0, 1] RGB images ``[B, 3, H, W]`` -> ``[B, D]`` (float32 from the engine)."""
        if self.uses_engine():
            return self.engine(images)
        x = self.normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self._compiled_backbone
        if compiled is not None and self.training and torch.is_grad_enabled():
            return compiled(x)
        return self.backbone(x)

    def set_channels_last(self, enabled: bool) -> None:
        """Put the backbone's weights (and its inputs from now on) in NHWC (``True``) or NCHW memory format."""
        self.backbone.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = bool(enabled)

    def training_speedups(self, device: torch.device) -> Dict[str, bool]:
        """``channels_last`` / ``compile_backbone`` for training on ``device``: the user's values, else the
        device defaults (``CUDA_TRAINING_DEFAULTS``, ``CPU_TRAINING_DEFAULTS``). Compiling applies only where the
        backbone trains (``finetune``)."""
        defaults = CUDA_TRAINING_DEFAULTS if device.type == "cuda" else CPU_TRAINING_DEFAULTS
        cl = self.hparams.get("channels_last")
        comp = self.compile_backbone
        return {"channels_last": defaults["channels_last"] if cl is None else bool(cl),
                "compile_backbone": (defaults["compile_backbone"] if comp is None else bool(comp))
                and self.stage == "finetune"}

    def feature_extractor(self) -> nn.Module:
        """``normalize -> backbone`` as one module (shares the weights; for the feature cache)."""
        return FeatureNet(self.normalize, self.backbone, self.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from images ``[B, 3, H, W]`` or from cached features ``[B, D]``."""
        if x.ndim == 2:
            return self.head(x)
        if x.ndim != 4:
            raise ValueError(f"expected images [B, 3, H, W] or features [B, D], got shape {tuple(x.shape)}")
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> "TransferModule":
        """``nn.Module.train`` that keeps frozen BatchNorm layers in inference mode (Keras semantics)."""
        super().train(mode)
        enforce_frozen_bn(self)
        return self

    # ------------------------------------------------------------------ steps
    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        if isinstance(batch, FeatureChunk):
            if not self.automatic_optimization:
                return self._chunk_steps(batch, batch_idx)
            with _float32(self.device):
                batch = batch.materialize()
                return self._automatic_step(batch, batch_idx)
        if not self.automatic_optimization:  # an image batch in the extract stage: one step through the backbone
            y = batch[1]
            index = batch[2] if len(batch) > 2 else torch.arange(len(y), device=y.device)
            return self._lightning_steps(FeatureChunk(batch[0], torch.arange(len(y), device=y.device), y, index,
                                                      len(y)), batch_idx)
        return self._automatic_step(batch, batch_idx)

    def _automatic_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self._loss(logits, y)
        self._epoch_stats.add(logits.detach(), y, loss.detach() * len(y), self._flush_train_stats)
        self._log_train(loss, batch_idx, len(y))
        return loss

    def _chunk_steps(self, chunk: FeatureChunk, batch_idx: int) -> None:
        """The optimizer steps of one feature chunk (``steps_per_execution`` mini-batches), run by the fastest
        runner for the device (:func:`lightning_app.head_steps.select_head_steps`) in float32; the logits and
        losses go to the epoch metrics in large blocks (:class:`~lightning_app.head_steps.EpochStats`)."""
        if self.trainer.world_size > 1:  # DDP: Lightning's manual_backward hooks all-reduce the gradients
            return self._lightning_steps(chunk, batch_idx)
        opt = self.optimizers().optimizer
        if self._head_steps is None or self._head_steps.optimizer is not opt:
            own_loss = type(self)._loss is TransferModule._loss and "_loss" not in self.__dict__
            self._head_steps = select_head_steps(self.head, self._loss, opt, self.device, self._count_steps,
                                                 self.label_smoothing if own_loss else None)
        with _float32(self.device):
            result = self._head_steps.run(chunk)
        self._epoch_stats.add(result.logits, chunk.labels, result.loss_sum, self._flush_train_stats)
        self._log_train(result.losses[-1], batch_idx, len(chunk))

    def _count_steps(self, k: int) -> None:
        """Advance Lightning's optimizer-step counters (``global_step``) by ``k`` optimizer steps."""
        lopt = self.optimizers()
        for _ in range(k):
            lopt._on_before_step()
            lopt._on_after_step()

    def _lightning_steps(self, chunk: FeatureChunk, batch_idx: int) -> None:
        """One optimizer step per mini-batch through Lightning (``manual_backward``, ``LightningOptimizer.step``:
        DDP gradient all-reduce and every per-step hook)."""
        opt = self.optimizers()
        logits_all, losses = [], []
        with _float32(self.device) if chunk.features.ndim == 2 else contextlib.nullcontext():
            for j, b in enumerate(chunk.batch_sizes):
                x, y = chunk.batch(j)
                logits = self(x)
                loss = self._loss(logits, y)
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                opt.step()
                logits_all.append(logits.detach())
                losses.append(loss.detach() * b)
        self._epoch_stats.add(torch.cat(logits_all), chunk.labels, torch.stack(losses).sum(), self._flush_train_stats)
        self._log_train(losses[-1] / chunk.batch_sizes[-1], batch_idx, len(chunk))

    def _flush_train_stats(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor, count: int) -> None:
        self.train_metrics.update(logits, labels)
        self.train_loss.update(loss_sum / count, count)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._epoch_stats.count and self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._epoch_stats.drain(self._flush_train_stats)  # before validation and the epoch-end hooks

    def _log_train(self, loss: torch.Tensor, batch_idx: int, batch_size: int) -> None:
        if not self._logged["train"]:
            # Metric objects: Lightning computes (and syncs) them once at epoch end; logging them once per
            # epoch instead of every step saves ~3 ms of Python per step (matters for head training).
            self._logged["train"] = True
            self.log("train_loss", self.train_loss, on_step=False, on_epoch=True, batch_size=batch_size)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        if batch_idx % self.progress_every == 0:
            self._progress_copies.push([loss.detach().float()])
        # the progress bar shows the newest step loss whose copy to the host has completed (on a GPU a few steps
        # old): Lightning turns a logged tensor into a number at every step, which for a device tensor would wait
        # for the device each time
        shown = None
        for (value,) in self._progress_copies.ready():
            shown = value
        if shown is not None:
            self.log("loss", torch.from_numpy(shown), on_step=True, on_epoch=False, prog_bar=True, logger=False,
                     batch_size=batch_size)

    def _eval_logits(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        """Logits, labels and the batch as a tuple; feature chunks run the head in float32."""
        if isinstance(batch, FeatureChunk):
            with _float32(self.device):
                batch = batch.materialize()
                return self(batch[0]).float(), batch[1], batch
        return self(batch[0]), batch[1], batch

    def _flush_val_stats(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor, count: int) -> None:
        self.val_metrics.update(logits, labels)
        self.val_loss.update(loss_sum / count, count)

    def _flush_test_stats(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor, count: int) -> None:
        self.test_metrics[self._test_stats_dl].update(logits, labels)
        self.test_loss[self._test_stats_dl].update(loss_sum / count, count)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, y, batch = self._eval_logits(batch)
        self._val_stats.add(logits.detach(), y, self._loss(logits, y).detach() * len(y), self._flush_val_stats)
        if not self._logged["val"]:
            self._logged["val"] = True
            self.log("val_loss", self.val_loss, on_epoch=True, prog_bar=True, batch_size=len(y))
            self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True, batch_size=len(y))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, torch.Tensor]:
        logits, y, batch = self._eval_logits(batch)
        while len(self.test_metrics) <= dataloader_idx:  # one metric set (+ loss) per test dataloader
            self.test_metrics.append(_metrics(self.num_classes, "test_").to(self.device))
            self.test_loss.append(MeanMetric().to(self.device))
            # [robustness edit] Lightning caches metric attribute names at the first `self.log` of a run; drop the
            # cache so the metrics just added are found (else MisconfigurationException from test dataloader 1 on).
            self._metric_attributes = None
        if dataloader_idx != self._test_stats_dl:  # the previous loader is done: its metrics get its batches
            self._test_stats.drain(self._flush_test_stats)
            self._test_stats_dl = dataloader_idx
        self._test_stats.add(logits.detach(), y, self._loss(logits, y).detach() * len(y), self._flush_test_stats)
        if dataloader_idx not in self._logged["test"]:
            self._logged["test"].add(dataloader_idx)
            self.log("test_loss", self.test_loss[dataloader_idx], on_epoch=True)
            self.log_dict(self.test_metrics[dataloader_idx], on_epoch=True)
        out = {"preds": logits.argmax(dim=1), "target": y}
        if len(batch) > 2:
            out["index"] = batch[2]
        return out

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(x).softmax(dim=1)
        out = {"probs": probs, "preds": probs.argmax(dim=1)}
        if isinstance(batch, (list, tuple)) and len(batch) > 2:
            out["target"], out["index"] = batch[1], batch[2]
        if isinstance(batch, (list, tuple)) and len(batch) > 3:
            out["ok"] = batch[3]  # False: an unreadable file (a blank image), reported as such by the CSV writer
        return out

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self) -> None:
        self._logged["train"] = False
        # callbacks (LayerwiseUnfreezing) have set this epoch's trainable groups
        self._frozen_forward = self.inference_options.enabled and backbone_is_fixed(self.backbone)
        if self._frozen_forward:
            self._plan_engine(self.trainer.num_training_batches)

    def on_train_epoch_end(self) -> None:
        self._epoch_stats.drain(self._flush_train_stats)  # an epoch cut short (max_steps): what is left
        if self.automatic_optimization:
            return
        # Manual optimization: Lightning leaves epoch-interval LR schedulers to the module.
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            metric = self.trainer.callback_metrics.get("val_loss")
            if metric is not None:
                scheduler.step(metric)
        else:
            scheduler.step()

    def on_train_end(self) -> None:
        self._frozen_forward = None

    def on_validation_epoch_start(self) -> None:
        self._logged["val"] = False
        self._plan_engine(self.trainer.num_val_batches)

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        trainer = self.trainer
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        if _last_batch(batches, batch_idx, dataloader_idx):
            self._val_stats.drain(self._flush_val_stats)

    def on_validation_epoch_end(self) -> None:
        self._val_stats.drain(self._flush_val_stats)  # a loop that stopped before its counted last batch

    def on_test_epoch_start(self) -> None:
        self._logged["test"] = set()
        self._test_stats_dl = 0
        self._plan_engine(self.trainer.num_test_batches)

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if _last_batch(self.trainer.num_test_batches, batch_idx, dataloader_idx):
            self._test_stats.drain(self._flush_test_stats)

    def on_test_epoch_end(self) -> None:
        self._test_stats.drain(self._flush_test_stats)

    def on_predict_epoch_start(self) -> None:
        self._plan_engine(self.trainer.num_predict_batches)

    def _plan_engine(self, batches: Any) -> None:
        """Start of a run through the engine: its length (``compile="auto"`` on CPU) and a full staleness check."""
        if not self.inference_options.enabled:
            return
        total = sum(batches) if isinstance(batches, (list, tuple)) else batches
        self.engine.plan(int(total) if total is not None and math.isfinite(total) else None)

    # ------------------------------------------------------------------ checkpoint (lightning_app.checkpoint)
    @property
    def class_names(self) -> List[str]:
        """Names of the model's outputs, in order (from the training data; ``[]`` when unknown)."""
        return list(self.data_spec.get("class_names") or [])

    def setup(self, stage: str) -> None:
        apply_cpu_settings(trainer_device(self))  # on the CPU: denormals flushed, freed memory kept
        if stage == "fit":
            self._setup_training_speedups()
        # fit: the data trained on; other stages keep what a checkpoint said (restored after setup) and otherwise
        # describe the data they are given
        spec = data_spec(getattr(self.trainer, "datamodule", None))
        if stage == "fit" or not self.data_spec:
            if spec.get("class_names") and len(spec["class_names"]) != self.num_classes:
                spec.pop("class_names")
            self.data_spec = spec
        if spec.get("input_size"):
            self.check_input_size(spec["input_size"])

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise :class:`ConfigError` with the backbone's minimum when it cannot take ``(height, width)`` images
        (InceptionV3 at 32 px: a kernel larger than its input deep inside). Sizes at or above the native one pass
        at once; smaller ones are tried on the ``meta`` device (shapes only, no memory, no compute)."""
        h, w = int(size[0]), int(size[1])
        native = _native_size(self.backbone)
        if native and min(h, w) >= native:
            return
        from lightning_app.zoo import create_backbone

        with torch.device("meta"):
            probe = create_backbone(self.backbone_name, weights=None, num_classes=0,
                                    **(self.hparams.get("backbone_kwargs") or {})).eval()

        def fits(hh: int, ww: int) -> bool:
            try:
                with torch.no_grad():
                    probe(torch.empty(1, 3, hh, ww, device="meta"))
                return True
            except (RuntimeError, ValueError):
                return False

        if fits(h, w):
            return
        lo, hi = min(h, w), max(native or 0, 2 * max(h, w), 32)
        while not fits(hi, hi) and hi < 4096:
            hi *= 2
        while hi - lo > 1:  # smallest square size that fits, in (lo, hi]
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid, mid) else (mid, hi)
        raise ConfigError(
            f"{self.backbone_name} needs input images of at least {hi}x{hi} pixels (Keras's minimum too, where it "
            f"has one), got {h}x{w}: set data.init_args.image_size to {hi} or more"
            + (f" (its native size is {native})" if native else ""))

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = inference_metadata(self, self.data_spec)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            checkpoint[RNG_KEY] = capture_rng_state()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        meta = checkpoint_metadata(checkpoint)
        if meta:
            self.data_spec = {k: meta[k] for k in ("class_names", "input_size", "resize", "antialias", "datamodule")
                              if k in meta}
            weights = dict(meta.get("weights") or {})
            weights.pop("configured", None)
            if weights:
                self.weights_provenance = weights
        self._pending_rng = checkpoint.get(RNG_KEY)

    def on_train_start(self) -> None:
        self._match_optimizer_state_layout()
        # RNG as it was when the checkpoint was saved: dropout and augmentation draw what an uninterrupted run drew
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    def _setup_training_speedups(self) -> None:
        # before the strategy moves / wraps the model and builds the optimizer (its state follows the layout)
        choice = self.training_speedups(self.trainer.strategy.root_device)
        if choice["channels_last"] != self.channels_last:
            self.set_channels_last(choice["channels_last"])
        self.__dict__["_compiled_backbone"] = (CompiledBackbone(self.backbone, **self.compile_kwargs)
                                               if choice["compile_backbone"] else None)
        if choice["compile_backbone"] or choice["channels_last"]:
            rank_zero_info(f"training the backbone with channels_last={choice['channels_last']}, "
                           f"torch.compile={choice['compile_backbone']}")

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._compiled_backbone is not None:
            self._last_compiled_graphs = self._compiled_backbone.graphs
            self.__dict__["_compiled_backbone"] = None

    def _match_optimizer_state_layout(self) -> None:
        """Optimizer state restored from a checkpoint written with the other memory format gets the parameter's
        (fused optimizers index parameters and state element by element)."""
        for opt in self.trainer.optimizers:
            for p, state in opt.state.items():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() == 4 and v.stride() != p.stride():
                        state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)

    def on_fit_start(self) -> None:
        if any(bn_is_frozen(m) for m in self.modules()):
            # Frozen BatchNorm layers are in eval mode on purpose (Keras semantics): silence Lightning's notice.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

    # ------------------------------------------------------------------ optimisation
    def _optimized_groups(self) -> List[LayerGroup]:
        """Backbone groups that belong in the optimizer: all of them when fine-tuning (stable param groups
        for DDP, schedulers and resume), none when the backbone can never train (``extract`` / ``head``:
        an optimizer step then skips dozens of gradient-less groups, which matters for tiny head steps)."""
        return self.layer_groups if self.stage == "finetune" else []

    def lr_scales(self) -> List[float]:
        """Learning-rate factor of each param group: head 1, backbone group at depth ``d`` (0 = nearest
        the head) ``backbone_lr_scale * layer_decay ** d``."""
        n = len(self.layer_groups)
        return [1.0] + [self.backbone_lr_scale * self.layer_decay ** (n - 1 - i)
                        for i in range(n - len(self._optimized_groups()), n)]

    def param_groups(self) -> List[Dict[str, Any]]:
        """Head group plus (``finetune``) one group per backbone layer group (input -> output), without ``lr``."""
        groups: List[Dict[str, Any]] = [{"params": list(self.head.parameters()), "name": "head"}]
        groups += [{"params": g.params, "name": f"backbone.{i}:{g.name}"}
                   for i, g in enumerate(self._optimized_groups())]
        return groups

    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer_factory(self.param_groups())
        except ValueError as err:  # torch's own argument checks, e.g. "Invalid learning rate: -0.5"
            raise ConfigError(f"could not build the optimizer from model.optimizer: {err}") from err
        base_lr = self.lr if self.lr is not None else optimizer.defaults.get("lr")
        if base_lr is None:
            raise ConfigError("set model.lr or the optimizer's lr")
        if not float(base_lr) > 0:
            raise ConfigError(f"the learning rate must be > 0, got {base_lr} (model.lr or the optimizer's lr): a "
                              f"learning rate <= 0 does not train (a negative one climbs the loss)")
        for group, scale in zip(optimizer.param_groups, self.lr_scales()):
            group["lr"] = float(base_lr) * scale
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: Dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val_loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


def _float32(device: torch.device) -> torch.autocast:
    """Autocast off: head steps on cached features run in float32 whatever the Trainer's precision."""
    return torch.autocast(device_type=device.type, enabled=False)


__all__ = ["IMAGENET_IF_CACHED", "Normalize", "STAGES", "TransferModule", "backbone_is_fixed", "build_head",
           "resolve_weights"]
