"""``python -m lightning_app {fit,validate,test,predict} --config configs/<name>.yaml``.

A :class:`~pytorch_lightning.cli.LightningCLI` over :class:`~lightning_app.module.TransferModule`
and any LightningDataModule (``data.class_path``), with:

* ``data.num_classes`` linked into ``model.num_classes`` (read right after the DataModule's ``__init__``);
* always-on callbacks configurable from YAML: ``checkpoint`` (:class:`lightning_app.checkpoint.ModelCheckpoint` on
  ``val_acc``, plus ``last.ckpt`` after every epoch and on SIGTERM / Ctrl+C, written atomically) and ``report``
  (:class:`~lightning_app.reports.TrainingReport`);
* with ``--ckpt_path``, the checkpoint file is read first (a truncated or foreign file is a CheckpointError) and the
  data is checked against what it was trained on: a different class set is refused, a different image size is
  resized to the trained one with a notice (:func:`lightning_app.checkpoint.match_data`);
* ``features``: feature-cache settings used when ``model.stage == "extract"``: ``fit`` first extracts
  (or reuses) the train / val features with the same Trainer (so DDP shards the extraction), then trains
  the head on them; validate / test / predict run the full model on images;
* ``test_after_fit``: run ``test`` on the image DataModule with the best checkpoint after ``fit``;
* ``predict`` writes ``reports/predictions.csv`` (path, predicted class, probability, top-5, true label, error per
  image); ``--prediction.inputs FOLDER_OR_FILE ...`` predicts image files (folders searched recursively, labelled or
  not) prepared as the checkpoint says, instead of the data's ``predict_split``;
* with ``--ckpt_path`` (a checkpoint file, not ``last`` / ``best`` / ...) the model is built with
  ``weights=None``: the checkpoint's state dict replaces every weight, so ``model.weights`` (``imagenet``,
  ``imagenet_if_cached`` or a file, also when it comes from the checkpoint's own hyperparameters) is not
  resolved -- no download attempt, no misleading "random initialisation" warning. The module's ``hparams``
  keep the configured value;
* ``trainer.precision`` left unset (``null``) is chosen by device when the Trainer is built (:func:`auto_precision`:
  ``bf16-mixed`` on a CUDA GPU with bfloat16, ``32-true`` elsewhere), logged, and written into the saved config;
* the config is saved next to the logs, overwriting (``save_config_kwargs={"overwrite": True}``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_app.checkpoint import ModelCheckpoint, data_spec, load_checkpoint, match_data, metadata
from lightning_app.data.features import DEFAULT_CACHE_DIR, prepare_feature_datamodule
from lightning_app.data.files import ImageFilesDataModule
from lightning_app.entry import run
from lightning_app.errors import ConfigError
from lightning_app.module import TransferModule
from lightning_app.reports import PredictionCSVWriter, TrainingReport, report_dir


@dataclass
class FeatureOptions:
    """Feature cache settings (used by ``fit`` when ``model.stage`` is ``extract``).

    Attributes:
        cache_dir: where cached features live (one sub-directory per backbone and key).
        batch_size: head-training batch size on features (default: ``data.batch_size``).
        extract_batch_size: batch size of the extraction pass (default: ``data.batch_size``).
        in_memory: keep the cached features in the training device's memory (GPU memory or RAM), moved there
            once and shuffled there; ``None`` (default): when a split takes at most half the free memory;
            ``False``: read each chunk of rows from the memory map.
        rebuild: ignore an existing cache and extract again.
    """

    cache_dir: str = DEFAULT_CACHE_DIR
    batch_size: Optional[int] = None
    extract_batch_size: Optional[int] = None
    in_memory: Optional[bool] = None
    rebuild: bool = False


@dataclass
class PredictOptions:
    """``predict`` settings.

    Attributes:
        inputs: an image file or folder, or a list (``'[photos/, extra.jpg]'``), to predict instead of the data's
            ``predict_split``; images are prepared as the checkpoint says the model was trained (input size, resize
            mode), a ``<folder>/<class name>/`` layout adds the true label. ``data`` may then be left out.
        output: the predictions CSV (default ``<log dir>/reports/predictions.csv``).
        top_k: classes listed per image in the ``top5`` column.
        batch_size, num_workers: loader settings for ``inputs`` (default: the data's, else 32 and 2).
    """

    inputs: Union[str, List[str]] = field(default_factory=list)
    output: Optional[str] = None
    top_k: int = 5
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None


DEFAULT_TRAINER: Dict[str, Any] = {
    "default_root_dir": "runs",
    "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
    # cuDNN picks the fastest convolution algorithms once per input shape (images have one size per run; Lightning's
    # own default leaves it off). No effect on a CPU.
    "benchmark": True,
}


#: ``ckpt_path`` values that Lightning resolves itself and that may resolve to no checkpoint (``fit`` then
#: starts from the model's own weights, so ``model.weights`` must still apply)
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def auto_precision(accelerator: Any = "auto") -> str:
    """The Trainer precision used when the user sets none: ``bf16-mixed`` where the run goes to a CUDA GPU that
    supports bfloat16 (about 2x the fp32 throughput of the zoo models, matching Keras' ``mixed_bfloat16``),
    ``32-true`` elsewhere (CPUs run bf16 convolutions slower than fp32)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    name = name.lower()
    import torch

    if name in ("auto", "gpu", "cuda") or "cuda" in name:
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed"
    return "32-true"


def checkpoint_supplies_weights(ckpt_path: Union[str, Path, None]) -> bool:
    """Whether ``ckpt_path`` names a checkpoint file (local or remote) whose state dict will replace the
    model's weights; ``None`` and Lightning's keywords (``last``, ``best``, ``hpc``, ``registry[:...]``) do not."""
    if ckpt_path is None or str(ckpt_path) == "":
        return False
    text = str(ckpt_path)
    return text not in _CKPT_KEYWORDS and not text.startswith("registry:")


class TransferCLI(LightningCLI):
    """LightningCLI for transfer learning (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)  # what Lightning's True ends up as, without its warning
        kwargs.setdefault("trainer_defaults", DEFAULT_TRAINER)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # the module builds its own param groups
        self._image_datamodule: Optional[pl.LightningDataModule] = None
        super().__init__(TransferModule, pl.LightningDataModule, *args, **kwargs)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Lightning's, with ``data`` optional: ``predict --prediction.inputs`` needs none (checked per subcommand)."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data,
                                        required=False)

    def _require_data(self) -> None:
        if self.datamodule is None:
            sub = self.config.get("subcommand")
            raise ConfigError(f"{sub} needs a data section (data.class_path and data.init_args, usually from "
                              f"--config configs/<name>.yaml)" + (" or --prediction.inputs FILES_OR_FOLDERS"
                                                                   if sub == "predict" else ""))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_class_arguments(FeatureOptions, "features")
        parser.add_class_arguments(PredictOptions, "prediction")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, test the best checkpoint on the image test split")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val_acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "epoch{epoch:03d}-val_acc{val_acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(TrainingReport, "report")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the checkpoint's hyper-parameters into the config here. Read the file first, so that a
        missing, truncated or foreign file is a CheckpointError naming it (not a bare EOFError), and keep its
        inference metadata (classes, input size) to check the data against."""
        self._ckpt_meta: Dict[str, Any] = {}
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if checkpoint_supplies_weights(path) and "://" not in str(path):
            self._ckpt_meta = metadata(load_checkpoint(path, mmap=True))
        super()._parse_ckpt_path()

    def _match_checkpoint(self, labelled: Optional[bool] = True) -> None:
        """Check the data against the checkpoint (``labelled=None``: only quiet Lightning's resume notices)."""
        sub = self.config.get("subcommand")
        if sub != "fit":
            # Lightning's notices about restoring the training callbacks' state concern resuming a fit only
            for message in (r".*callbacks used to create the checkpoint need to be provided.*",
                            r".*The dirpath has changed from .* won't be reloaded.*"):
                warnings.filterwarnings("ignore", message=message)
        if labelled is None:
            return
        if getattr(self, "_ckpt_meta", None):
            match_data(self._ckpt_meta, self.datamodule, labelled=labelled,
                       source=f"the checkpoint {self.config[sub].get('ckpt_path')}")

    def instantiate_classes(self) -> None:
        """Builds the model with ``weights=None`` when a checkpoint file supplies the weights (module docstring)."""
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        model_cfg = cfg.get("model")
        configured = model_cfg.get("weights") if model_cfg is not None else None
        if configured is None or not checkpoint_supplies_weights(cfg.get("ckpt_path")):
            super().instantiate_classes()
            return
        rank_zero_info(f"model.weights={configured!r} not loaded: the weights come from {cfg.ckpt_path}")
        model_cfg.weights = None
        try:
            super().instantiate_classes()
        finally:
            model_cfg.weights = configured  # the saved config.yaml keeps the configured value
        if isinstance(self.model, TransferModule):
            self.model.hparams["weights"] = configured  # and so do the checkpoints this run writes

    def _instantiate_trainer(self, config: Dict[str, Any], callbacks: list) -> pl.Trainer:
        """``trainer.precision`` left unset (``null``) is chosen by device (:func:`auto_precision`); the choice is
        logged and written into the run's saved ``config.yaml``."""
        if config.get("precision") is None:
            config["precision"] = auto_precision(config.get("accelerator", "auto"))
            sub = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
            if sub.get("trainer") is not None:
                sub["trainer"]["precision"] = config["precision"]
            rank_zero_info(f"precision: {config['precision']} (chosen by device; set trainer.precision to override)")
        return super()._instantiate_trainer(config, callbacks)

    # ------------------------------------------------------------------ subcommand hooks
    def before_fit(self) -> None:
        self._require_data()
        self._match_checkpoint()
        self._image_datamodule = self.datamodule
        if getattr(self.model, "stage", None) != "extract":
            return
        size = data_spec(self.datamodule).get("input_size")
        if size:
            self.model.check_input_size(size)  # before the extraction pass, not after it
        if getattr(self.datamodule, "augmentation", None) is not None:
            rank_zero_warn(
                "data augmentation is not applied in stage 'extract': the features are computed once from the "
                "un-augmented images and the head trains on those (Keras's feature-extraction recipe). To train on "
                "augmented images, use stage 'head' (backbone frozen, images through it every step) or "
                "set data.init_args.augment to false to silence this")
        opts: FeatureOptions = self._get(self.config_init, "features")
        self.datamodule = prepare_feature_datamodule(
            self.trainer, self.model, self.datamodule, splits=("train", "val"), cache_dir=opts.cache_dir,
            batch_size=opts.batch_size, extract_batch_size=opts.extract_batch_size, in_memory=opts.in_memory,
            rebuild=opts.rebuild,
        )

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", False):
            return
        if self.trainer.interrupted:
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
        results = self.trainer.test(self.model, datamodule=self._image_datamodule or self.datamodule,
                                    ckpt_path=ckpt_path)
        if results:
            acc = results[0].get("test_acc")
            rank_zero_info(
                f"held-out test accuracy {acc:.4f} ({'best checkpoint' if ckpt_path else 'final weights'}); "
                f"reports in {report_dir(self.trainer)}"
            )

    def before_validate(self) -> None:
        self._require_data()
        self._match_checkpoint()

    def before_test(self) -> None:
        self._require_data()
        self._match_checkpoint()

    def before_predict(self) -> None:
        opts: PredictOptions = self._get(self.config_init, "prediction")
        if opts.inputs:
            self._match_checkpoint(labelled=None)  # the inputs are prepared from the checkpoint itself
            if isinstance(opts.inputs, str):
                opts.inputs = [opts.inputs]
            self.datamodule = self._files_datamodule(opts)
        else:
            self._require_data()
            self._match_checkpoint(labelled=False)
            if hasattr(self.datamodule, "predict_report_errors"):
                self.datamodule.predict_report_errors = True  # a row with the error, never a neighbour's prediction
        writer = next((cb for cb in self.trainer.callbacks if isinstance(cb, PredictionCSVWriter)), None)
        if writer is None:
            self.trainer.callbacks.append(PredictionCSVWriter(opts.output, opts.top_k))
        elif opts.output:
            writer.path, writer.top_k = opts.output, opts.top_k

    def _files_datamodule(self, opts: PredictOptions) -> ImageFilesDataModule:
        """``prediction.inputs`` prepared as the checkpoint says the model was trained (else as ``data`` says)."""
        meta = getattr(self, "_ckpt_meta", None) or {}
        data = self.datamodule
        size = meta.get("input_size") or getattr(data, "image_size", None)
        if size is None:
            from lightning_app.zoo import get_entry

            try:
                size = get_entry(self.model.backbone_name).input_size
            except KeyError:
                raise ConfigError("prediction.inputs: the input size is unknown (no checkpoint metadata, no data "
                                  "section): pass --ckpt_path of a trained model or a data section") from None
            rank_zero_info(f"prediction.inputs: no checkpoint metadata and no data section, so images are resized to "
                           f"{self.model.backbone_name}'s native {size} px")
        names = meta.get("class_names") or list(getattr(self.model, "class_names", None) or []) or \
            list(getattr(data, "class_names", None) or [])
        return ImageFilesDataModule(
            opts.inputs, class_names=names, image_size=size if isinstance(size, int) else tuple(size),
            resize=meta.get("resize", getattr(data, "resize", "squash")),
            antialias=meta.get("antialias", getattr(data, "antialias", False)),
            batch_size=opts.batch_size or getattr(data, "batch_size", 32),
            num_workers=opts.num_workers if opts.num_workers is not None else getattr(data, "num_workers", 2))


def main(args: Optional[list] = None) -> TransferCLI:
    """Entry point of ``python -m lightning_app`` (``args``: the command line without the program name; default
    ``sys.argv[1:]``). Errors a user can fix are printed as one paragraph (exit code 2); ``--debug`` or
    ``LIGHTNING_APP_DEBUG=1`` shows the traceback (:mod:`lightning_app.entry`)."""
    return run(lambda argv: TransferCLI(args=argv), args)


__all__ = ["DEFAULT_TRAINER", "FeatureOptions", "TransferCLI", "auto_precision", "checkpoint_supplies_weights", "main"]
