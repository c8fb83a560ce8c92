"""``RobustnessDataModule``: any image DataModule's test split, served clean and once per perturbation."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lightning_app.data.base import Batch, BaseImageDataModule, should_pin_memory
from lightning_app.perturb import AUTO, SEVERITIES, TABLES, corrupt, resolve_table
from lightning_app.robustness.attack import INFERENCE_MODE_FIX, attack_batch
from lightning_app.robustness.specs import CorruptionsArg, Perturbation, build_suite


class UnpaddedShardSampler(DistributedSampler):
    """Samples ``rank, rank + world, ...`` in order: every sample exactly once across ranks (Lightning's default
    ``DistributedSampler`` pads with repeats, which the test metrics would count twice)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class RobustnessDataModule(pl.LightningDataModule):
    """Wraps an image DataModule for ``trainer.test``: one test dataloader per :class:`Perturbation`.

    Dataloader 0 is clean, then every corruption at every severity, then the attacks (see
    :attr:`perturbations`). Each loader serves the same test images. After the transfer to the
    device, :meth:`on_after_batch_transfer` converts them with the inner DataModule
    (``prepare_batch``: uint8 -> [0, 1], its batch transforms) and then perturbs them:
    corruptions with :func:`lightning_app.perturb.corrupt`, attacks (FGSM / PGD) against the
    Trainer's LightningModule with gradients enabled, in [0, 1] pixel space through the model's
    own normalisation. Attacks need ``Trainer(inference_mode=False)``.

    Randomness depends only on (``seed``, dataset index): results do not depend on batch size or
    device count. Under DDP each rank tests a shard without padding (every image counted once).
    Fit / validate / predict pass through to the inner DataModule unperturbed.

    Args:
        datamodule: the image DataModule whose test split is evaluated.
        corruptions: ``None`` or ``"benchmark"``: the 15 ImageNet-C benchmark corruptions; ``"all"``: those
            plus speckle_noise, gaussian_blur, saturate; or a list of names; ``[]`` for none.
        severities: severities 1..5 evaluated for every corruption.
        attacks: e.g. ``[{"name": "fgsm", "eps": "8/255"}, {"name": "pgd", "eps": "8/255", "alpha": "2/255",
            "steps": 10}]`` (``random_start`` and a unique ``label`` optional); ``None``: no attacks.
        table: severity table: ``"auto"`` (ImageNet-C's 224 px table, or its Inception-size 299 px table
            for images of 262 px and more), ``"imagenet"`` (224), ``"imagenet299"`` or ``"cifar10"`` (CIFAR-10-C,
            32 px).
        seed: seed of the corruptions, of PGD's random start and of the ``limit_per_loader`` subset.
        limit_per_loader: evaluate a seeded random subset of this many test images (the same images in
            every loader); ``None`` = the whole test split.
        clean: include the clean loader (needed for relative mCE).
    """

    def __init__(
        self,
        datamodule: BaseImageDataModule,
        corruptions: CorruptionsArg = None,
        severities: List[int] = list(SEVERITIES),  # noqa: B006 - jsonargparse shows the literal default
        attacks: Optional[List[Dict[str, Any]]] = None,
        table: str = AUTO,
        seed: int = 0,
        limit_per_loader: Optional[int] = None,
        clean: bool = True,
    ) -> None:
        super().__init__()
        for attr in ("prepare_batch", "dataset", "class_names"):
            if not hasattr(datamodule, attr):
                raise TypeError(
                    f"datamodule must be an image DataModule (lightning_app.data.BaseImageDataModule); "
                    f"{type(datamodule).__name__} has no {attr!r}"
                )
        if table not in TABLES and table != AUTO:
            raise ValueError(f"unknown severity table {table!r}; known: {', '.join([*TABLES, AUTO])}")
        if limit_per_loader is not None and limit_per_loader < 1:
            raise ValueError(f"limit_per_loader must be >= 1 or None, got {limit_per_loader}")
        self.datamodule = datamodule
        self.perturbations: List[Perturbation] = build_suite(corruptions, severities, attacks, clean=clean)
        self.table = table
        self.seed = int(seed)
        self.limit_per_loader = limit_per_loader
        # known right after __init__, for the CLI link data.num_classes -> model.num_classes
        self.class_names: List[str] = list(datamodule.class_names)
        self._test_set: Optional[Dataset] = None

    # ------------------------------------------------------------------ forwarded attributes
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_attacks(self) -> bool:
        return any(p.kind == "attack" for p in self.perturbations)

    def perturbation(self, dataloader_idx: int) -> Perturbation:
        """The perturbation served by test dataloader ``dataloader_idx``."""
        return self.perturbations[dataloader_idx]

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        self.datamodule.setup(stage)
        trainer = self.trainer
        if trainer is None or stage not in ("test", None):
            return
        if self.has_attacks and trainer.test_loop.inference_mode:
            raise RuntimeError(INFERENCE_MODE_FIX)
        from lightning_app.robustness.callback import RobustnessReport

        if not any(isinstance(cb, RobustnessReport) for cb in trainer.callbacks):
            trainer.callbacks.append(RobustnessReport())

    def teardown(self, stage: Optional[str] = None) -> None:
        self.datamodule.teardown(stage)

    # ------------------------------------------------------------------ loaders
    def test_dataset(self) -> Dataset:
        """The evaluated test images (a seeded subset with ``limit_per_loader``); items keep their split index."""
        if self._test_set is None:
            ds = self.datamodule.dataset("test")
            if len(ds) == 0:
                raise RuntimeError(f"{type(self.datamodule).__name__} has an empty test split: nothing to evaluate")
            if self.limit_per_loader is not None and self.limit_per_loader < len(ds):
                rng = np.random.default_rng(self.seed)
                ds = Subset(ds, np.sort(rng.choice(len(ds), self.limit_per_loader, replace=False)).tolist())
            self._test_set = ds
        return self._test_set

    def _sampler(self, ds: Dataset) -> Optional[UnpaddedShardSampler]:
        trainer = self.trainer
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        if not kwargs or kwargs.get("num_replicas", 1) <= 1 or len(ds) < kwargs["num_replicas"]:
            return None  # single process, or too few images for a shard per rank (Lightning pads then)
        return UnpaddedShardSampler(ds, num_replicas=kwargs["num_replicas"], rank=kwargs["rank"])

    def _loader(self, ds: Dataset) -> DataLoader:
        """The inner DataModule's loader settings: its served view (resize on the device where it would be) and
        worker count."""
        inner = self.datamodule
        base, subset = (ds.dataset, ds.indices) if isinstance(ds, Subset) else (ds, None)
        workers = inner.loader_workers(base) if hasattr(inner, "loader_workers") else inner.num_workers
        served = inner.served_dataset(base) if hasattr(inner, "served_dataset") else base
        served = Subset(served, subset) if subset is not None else served
        return DataLoader(served, batch_size=inner.batch_size, shuffle=False, sampler=self._sampler(ds),
                          num_workers=workers,
                          pin_memory=should_pin_memory(self.trainer, getattr(inner, "pin_memory", None)))

    def test_dataloader(self) -> List[DataLoader]:
        ds = self.test_dataset()
        return [self._loader(ds) for _ in self.perturbations]

    def train_dataloader(self) -> Any:
        return self.datamodule.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    # ------------------------------------------------------------------ device side
    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        trainer = self.trainer
        if trainer is None or not trainer.testing:
            return self.datamodule.prepare_batch(batch, dataloader_idx, train=trainer is not None and trainer.training)
        images, labels, indices = self.datamodule.prepare_batch(batch, 0, train=False)
        context = trainer.precision_plugin.test_step_context()
        images = self.perturb_batch(images, labels, indices, dataloader_idx, trainer.lightning_module, context)
        return images, labels, indices

    def perturb_batch(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        dataloader_idx: int,
        model: Optional[torch.nn.Module] = None,
        context: Any = None,
    ) -> torch.Tensor:
        """Apply perturbation ``dataloader_idx`` to [0, 1] images (``model`` is needed for attacks)."""
        p = self.perturbation(dataloader_idx)
        if p.kind == "clean":
            return images
        if p.kind == "corruption":
            return corrupt(images, p.name, p.severity, indices=indices, seed=self.seed, table=self.table)
        if model is None:
            raise ValueError(f"attack {p.key!r} needs the model")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(INFERENCE_MODE_FIX)
        return attack_batch(model, p, images, labels, indices, seed=self.seed, context=context)

    def describe(self) -> str:
        """One line: what is evaluated."""
        kinds = [p.kind for p in self.perturbations]
        size = getattr(self.datamodule, "image_size", None)
        table = resolve_table(self.table, size).name if self.table == AUTO else self.table
        return (f"{len(self.perturbations)} test loaders: {kinds.count('clean')} clean, {kinds.count('corruption')} "
                f"corruption x severity ({table} table), {kinds.count('attack')} attacks")


__all__ = ["RobustnessDataModule", "UnpaddedShardSampler"]
