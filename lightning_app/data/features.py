"""Feature cache: run the backbone once over a split (Lightning's predict loop), keep the pooled
features memory-mapped on disk, and serve them to the head.

Layout under ``cache_dir``::

    <backbone>/<split>-<key digest[:20]>/features.npy   float32 [N, D] (numpy .npy, opened with mmap)
                                        /labels.npy     int64 [N]
                                        /meta.json      key, shapes, checksums (written last)

The key holds everything the features depend on: backbone name, a digest of the backbone's
weights (state dict incl. BatchNorm statistics), input size, preprocessing (mean / std),
the dataset fingerprint of the split, and the compute precision. A cache is used only if
``meta.json`` parses, its key equals the expected key, and both arrays have the recorded shape,
dtype and size (plus a content checksum for caches up to ``verify_bytes``); anything else is
reported and rebuilt. Every file is written to a temporary name and moved into place with
``os.replace``; ``meta.json`` goes last and is removed first on a rebuild, so a crash never
leaves a cache that looks valid.

Under DDP every rank writes its shard (features, labels and dataset indices, raw binary) through
:class:`FeatureShardWriter`; rank 0 merges the shards into the memory-mapped arrays (checking
that every index was written exactly as many times as needed) while the others wait at a barrier.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset

from lightning_app.atomic import atomic_write
from lightning_app.cpu_settings import apply_cpu_settings, trainer_device
from lightning_app.data.feature_loader import EVAL_CHUNK_ROWS, FeatureLoader
from lightning_app.data.host_copy import HostCopyQueue
from lightning_app.errors import DataMismatchError
from lightning_app.zoo.weights import file_digest, state_dict_digest

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/keras_lightning_zoo/features"
_FEATURES, _LABELS, _META = "features.npy", "labels.npy", "meta.json"


class CacheInvalid(Exception):
    """A cache directory exists but cannot be used (the message says why)."""


def key_digest(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- store
@dataclass
class FeatureSet:
    """Features ``[N, D]`` (memory-mapped) and labels ``[N]`` of one split."""

    features: np.ndarray
    labels: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


class FeatureStore:
    """One cache entry: ``root/<backbone>/<split>-<digest>``; knows how to validate, load and write it."""

    def __init__(self, root: Union[str, os.PathLike], key: Dict[str, Any], verify_bytes: int = 256 * 2**20) -> None:
        self.key = key
        self.digest = key_digest(key)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key.get("backbone", "model")))
        self.dir = Path(os.path.expanduser(os.fspath(root))) / safe / f"{key.get('split', 'data')}-{self.digest[:20]}"
        self.verify_bytes = verify_bytes

    # -- reading
    def load(self, expected_rows: Optional[int] = None) -> FeatureSet:
        """Open the cache (memory-mapped); :class:`CacheInvalid` if missing, stale or corrupt."""
        meta_path = self.dir / _META
        if not meta_path.is_file():
            raise CacheInvalid("no complete cache (meta.json missing)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise CacheInvalid(f"meta.json unreadable: {err}") from None
        if meta.get("key") != self.key:
            raise CacheInvalid("key mismatch (backbone, weights, input size, preprocessing or data changed)")
        n, d = int(meta["rows"]), int(meta["dim"])
        if expected_rows is not None and n != expected_rows:
            raise CacheInvalid(f"cache has {n} rows, the split has {expected_rows}")
        features = self._open(self.dir / _FEATURES, (n, d), np.float32, meta.get("features_bytes"))
        labels = self._open(self.dir / _LABELS, (n,), np.int64, meta.get("labels_bytes"))
        if hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest() != meta.get("labels_sha256"):
            raise CacheInvalid("labels checksum mismatch")
        size = (self.dir / _FEATURES).stat().st_size
        if size <= self.verify_bytes and file_digest(self.dir / _FEATURES, "sha256") != meta.get("features_sha256"):
            raise CacheInvalid("features checksum mismatch")
        return FeatureSet(features, np.asarray(labels), self.dir)

    @staticmethod
    def _open(path: Path, shape: Tuple[int, ...], dtype: Any, nbytes: Optional[int]) -> np.ndarray:
        if not path.is_file():
            raise CacheInvalid(f"{path.name} missing")
        if nbytes is not None and path.stat().st_size != nbytes:
            raise CacheInvalid(f"{path.name} has {path.stat().st_size} bytes, expected {nbytes} (truncated?)")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise CacheInvalid(f"{path.name} unreadable: {err}") from None
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise CacheInvalid(f"{path.name} has shape {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}")
        return arr

    def read_shards_partial(self, world_size: int) -> FeatureSet:
        """Whatever the shards hold, in memory and ordered by dataset index (for runs that limit the predict
        loop, e.g. ``fast_dev_run``: such features are used for that run only and never cached)."""
        shards = self.shard_dir()
        feats, labels, index = [], [], []
        for r in range(world_size):
            info = json.loads((shards / f"rank{r}.json").read_text())
            if not info["rows"]:
                continue
            index.append(np.fromfile(shards / f"rank{r}.indices.bin", dtype=np.int64))
            labels.append(np.fromfile(shards / f"rank{r}.labels.bin", dtype=np.int64))
            feats.append(np.fromfile(shards / f"rank{r}.features.bin", dtype=np.float32).reshape(info["rows"], -1))
        if not feats:
            raise RuntimeError("the predict loop produced no features")
        idx = np.concatenate(index)
        _, first = np.unique(idx, return_index=True)
        return FeatureSet(np.concatenate(feats)[first], np.concatenate(labels)[first], shards)

    # -- writing
    def invalidate(self) -> None:
        """Remove ``meta.json`` first (the cache stops looking valid), then the arrays."""
        for name in (_META, _FEATURES, _LABELS):
            (self.dir / name).unlink(missing_ok=True)

    def shard_dir(self) -> Path:
        return self.dir.with_name(self.dir.name + ".shards")

    def merge_shards(self, world_size: int, rows: int) -> FeatureSet:
        """Merge the per-rank shards into ``features.npy`` / ``labels.npy`` (atomically), then ``meta.json``."""
        shards = self.shard_dir()
        infos = []
        for r in range(world_size):
            info_path = shards / f"rank{r}.json"
            if not info_path.is_file():
                raise RuntimeError(f"feature shard of rank {r} missing in {shards}")
            infos.append(json.loads(info_path.read_text()))
        dims = {i["dim"] for i in infos if i["rows"]}
        if len(dims) != 1:
            raise RuntimeError(f"feature shards disagree on the feature width: {sorted(dims)}")
        dim = dims.pop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.invalidate()
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp_f = self.dir / f".features.tmp-{tag}.npy"
        tmp_l = self.dir / f".labels.tmp-{tag}.npy"
        try:
            features = np.lib.format.open_memmap(tmp_f, mode="w+", dtype=np.float32, shape=(rows, dim))
            labels = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.int64, shape=(rows,))
            seen = np.zeros(rows, dtype=bool)
            for r, info in enumerate(infos):
                if not info["rows"]:
                    continue
                idx = np.fromfile(shards / f"rank{r}.indices.bin", dtype=np.int64)
                lab = np.fromfile(shards / f"rank{r}.labels.bin", dtype=np.int64)
                feat = np.memmap(shards / f"rank{r}.features.bin", dtype=np.float32, mode="r", shape=(info["rows"], dim))
                if len(idx) != info["rows"] or len(lab) != info["rows"]:
                    raise RuntimeError(f"feature shard of rank {r} is incomplete")
                if idx.min() < 0 or idx.max() >= rows:
                    raise RuntimeError(f"feature shard of rank {r} has indices outside 0..{rows - 1}")
                for start in range(0, len(idx), 8192):  # bounded memory
                    sl = slice(start, start + 8192)
                    features[idx[sl]] = feat[sl]
                    labels[idx[sl]] = lab[sl]
                seen[idx] = True
                del feat
            if not seen.all():
                missing = np.flatnonzero(~seen)
                raise RuntimeError(f"{len(missing)} of {rows} samples got no features (first: {missing[:5].tolist()})")
            features.flush()
            labels.flush()
            del features, labels
            os.replace(tmp_f, self.dir / _FEATURES)
            os.replace(tmp_l, self.dir / _LABELS)
        finally:
            tmp_f.unlink(missing_ok=True)
            tmp_l.unlink(missing_ok=True)
        labels_arr = np.load(self.dir / _LABELS)
        meta = {
            "version": CACHE_VERSION,
            "key": self.key,
            "rows": rows,
            "dim": dim,
            "features_bytes": (self.dir / _FEATURES).stat().st_size,
            "labels_bytes": (self.dir / _LABELS).stat().st_size,
            "features_sha256": file_digest(self.dir / _FEATURES, "sha256"),
            "labels_sha256": hashlib.sha256(np.ascontiguousarray(labels_arr).tobytes()).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write(self.dir / _META, json.dumps(meta, indent=1).encode())
        shutil.rmtree(shards, ignore_errors=True)
        return self.load(rows)


# ----------------------------------------------------------------------------- predict loop
class FeatureExtractor(pl.LightningModule):
    """Predict-loop wrapper: ``predict_step`` returns float32 features ``[B, D]`` of ``batch[0]``.

    ``net`` (``normalize -> backbone``) is a submodule, so the Trainer moves it to the device; with an ``engine``
    (:class:`lightning_app.engine.InferenceEngine` over the same network, not a submodule) the features come
    from the engine.
    """

    def __init__(self, net: nn.Module, engine: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.net = net
        self.__dict__["engine"] = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.engine or self.net)(x)

    def input_memory_format(self) -> Optional[torch.memory_format]:
        """The engine's input memory format (the image DataModules serve batches in it), else no preference."""
        return self.engine.input_memory_format() if self.engine is not None else None

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0]).float()

    def setup(self, stage: str) -> None:
        # the CPU settings TransferModule.setup makes for every stage: this predict loop runs before any of them
        apply_cpu_settings(trainer_device(self))

    def on_predict_epoch_start(self) -> None:
        if self.engine is not None:
            batches = self.trainer.num_predict_batches
            self.engine.plan(int(sum(batches)) if all(np.isfinite(b) for b in batches) else None)


class FeatureShardWriter(BasePredictionWriter):
    """Checks the cache, then writes each rank's features, labels and dataset indices (``batch[2]``)
    as raw shard files. A batch's rows are copied to pinned host memory without a device sync and written once the
    copy has completed (at most a few batches later, always in batch order; the rest at the end of the loop), so
    the writer never stalls the device queue.

    Everything that needs the data or other ranks happens in ``setup`` (inside the Trainer call, after
    ``prepare_data`` / ``setup`` of the DataModule and with the process group up): the key is computed
    on every rank, rank 0 validates the cache and broadcasts the verdict, and when the cache is valid the
    predict loop is told to run zero batches (no backbone forward at all).
    """

    def __init__(self, key_fn: Callable[["pl.Trainer"], Dict[str, Any]], cache_dir: Union[str, os.PathLike],
                 split: str, rebuild: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.key_fn = key_fn
        self.cache_dir = cache_dir
        self.split = split
        self.rebuild = rebuild
        self.store: Optional[FeatureStore] = None
        self.rows = 0
        self.cached = False
        self._limit: Any = None
        self._files: Dict[str, Any] = {}
        self._copies = HostCopyQueue(max_pending=4)
        self._count = 0
        self._dim = 0

    @property
    def shard_dir(self) -> Path:
        assert self.store is not None, "setup() has not run"
        return self.store.shard_dir()

    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.rows = len(trainer.datamodule.dataset(self.split))
        self.store = FeatureStore(self.cache_dir, self.key_fn(trainer))
        verdict: Tuple[bool, Optional[str]] = (False, None)
        if trainer.is_global_zero and not self.rebuild:
            try:
                self.store.load(self.rows)
                verdict = (True, None)
            except CacheInvalid as err:
                verdict = (False, str(err) if self.store.dir.exists() else None)
        self.cached, reason = trainer.strategy.broadcast(verdict)
        if self.cached:
            rank_zero_info(f"feature cache hit: {self.split} ({self.rows} rows) from {self.store.dir}")
            self._limit = trainer.limit_predict_batches
            # The predict loop then skips entirely (no dataloader, no backbone forward). With the limit at 0
            # its setup_data() returns early, so its batch count from an earlier call must be cleared too.
            trainer.limit_predict_batches = 0
            trainer.predict_loop.max_batches = []
        else:
            if reason:
                rank_zero_warn(f"feature cache {self.store.dir} is not usable ({reason}); rebuilding it")
            rank_zero_info(f"extracting {self.store.key['backbone']} features of the {self.split} split "
                           f"({self.rows} images) into {self.store.dir}")

    def teardown(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        if self._limit is not None:
            trainer.limit_predict_batches = self._limit
            self._limit = None

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        r = trainer.global_rank
        (self.shard_dir / f"rank{r}.json").unlink(missing_ok=True)
        self._files = {k: open(self.shard_dir / f"rank{r}.{k}.bin", "wb") for k in ("features", "labels", "indices")}
        self._count, self._dim = 0, 0
        self._copies.clear()

    def write_on_batch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """Queue the batch's features, labels and indices for the host (no device sync: the copy runs behind the
        queued work) and write the batches whose copies have completed, in batch order."""
        if len(batch) < 3:
            raise ValueError("feature extraction needs batches (images, labels, dataset indices)")
        if prediction.ndim != 2:
            raise ValueError(f"the backbone must return pooled features [B, D], got shape {tuple(prediction.shape)}")
        if self._dim and prediction.shape[1] != self._dim:
            raise ValueError(f"feature width changed from {self._dim} to {prediction.shape[1]}")
        self._dim = int(prediction.shape[1])
        self._copies.push([prediction.detach().to(torch.float32), batch[1].detach().to(torch.int64),
                           batch[2].detach().to(torch.int64)])
        self._write(self._copies.ready())

    def _write(self, groups: Any) -> None:
        for feats, labels, indices in groups:
            self._files["features"].write(np.ascontiguousarray(feats).tobytes())
            self._files["labels"].write(np.ascontiguousarray(labels).tobytes())
            self._files["indices"].write(np.ascontiguousarray(indices).tobytes())
            self._count += feats.shape[0]

    def on_predict_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._write(self._copies.drain())
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files = {}
        info = json.dumps({"rows": self._count, "dim": self._dim}).encode()
        atomic_write(self.shard_dir / f"rank{trainer.global_rank}.json", info)


# ----------------------------------------------------------------------------- key
def backbone_digest(backbone: nn.Module) -> str:
    """sha256 of the backbone's state dict (weights and BatchNorm statistics)."""

    return state_dict_digest(backbone.state_dict())


def feature_cache_key(module: nn.Module, datamodule: Any, split: str, precision: str = "32-true",
                      weights_digest: Optional[str] = None) -> Dict[str, Any]:
    """The identity of the features of ``split``: backbone, weights, input size, preprocessing, data."""
    norm = module.normalize
    return {
        "version": CACHE_VERSION,
        "backbone": module.backbone_name,
        "weights": weights_digest or backbone_digest(module.backbone),
        "input_size": list(datamodule.image_size),
        "preprocessing": {"mean": [round(v, 8) for v in norm.mean.flatten().tolist()],
                          "std": [round(v, 8) for v in norm.std.flatten().tolist()]},
        "dataset": datamodule.dataset_fingerprint(split),
        "split": split,
        "precision": str(precision),
    }


# ----------------------------------------------------------------------------- serving
class FeatureDataset(Dataset):
    """``(features float32 [D], label, index)`` rows of a :class:`FeatureSet`; batched reads via ``__getitems__``."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, int]:
        return torch.from_numpy(np.array(self.features[i], dtype=np.float32)), int(self.labels[i]), i

    def __getitems__(self, indices: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sequential reads from the memmap
        feats = np.empty((len(idx), self.features.shape[1]), dtype=np.float32)
        feats[order] = self.features[idx[order]]
        return torch.from_numpy(feats), torch.from_numpy(np.asarray(self.labels[idx])), torch.from_numpy(idx)


class FeatureDataModule(pl.LightningDataModule):
    """Serves cached features as :class:`~lightning_app.data.feature_loader.FeatureChunk` items
    (:class:`~lightning_app.data.feature_loader.FeatureLoader`): on the training device, shuffled there in the
    documented order of :func:`~lightning_app.data.feature_loader.epoch_order` (``DistributedSampler``'s, so
    DDP ranks get disjoint shards), ``steps_per_execution`` mini-batches per item.

    Args:
        train, val, test: :class:`FeatureSet` per split (``val`` / ``test`` may be ``None``).
        num_classes, class_names: copied from the image DataModule.
        batch_size: mini-batch size; ``shuffle``: shuffle the training set (seeded with ``seed``, per epoch).
        in_memory: keep the features in the training device's memory (GPU memory or RAM), moved there once;
            ``None``: when a split takes at most half the free memory; ``False``: read each chunk from the
            memory map.
        source: the image DataModule the features came from (for reports that need the images).
        steps_per_execution: mini-batches (optimizer steps) per training item; ``None``: automatic
            (:func:`~lightning_app.data.feature_loader.auto_steps_per_execution`).
    """

    def __init__(self, train: FeatureSet, val: Optional[FeatureSet] = None, test: Optional[FeatureSet] = None,
                 num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                 batch_size: int = 32, shuffle: bool = True, seed: int = 0, in_memory: Optional[bool] = None,
                 source: Any = None, steps_per_execution: Optional[int] = None) -> None:
        super().__init__()
        self.steps_per_execution = steps_per_execution
        self.sets = {"train": train, "val": val, "test": test}
        self.class_names = list(class_names) if class_names is not None else []
        self._num_classes = num_classes
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.in_memory = in_memory
        self.source = source
        self._loaders: Dict[str, FeatureLoader] = {}
        labels = np.asarray(train.labels)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataMismatchError(
                f"cached training labels must be in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]: "
                "the feature cache does not belong to this dataset; rebuild it (features.rebuild: true)")

    @property
    def num_classes(self) -> int:
        if self._num_classes is not None:
            return self._num_classes
        return len(self.class_names) or int(self.sets["train"].labels.max()) + 1

    @property
    def feature_dim(self) -> int:
        return self.sets["train"].dim

    def dataset(self, split: str) -> Optional[FeatureDataset]:
        s = self.sets.get(split)
        if s is None:
            return None
        return FeatureDataset(s.features, np.asarray(s.labels))

    def _placement(self) -> Tuple[torch.device, int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return torch.device("cpu"), 0, 1
        return trainer.strategy.root_device, trainer.global_rank, trainer.world_size

    def loader(self, split: str, train: bool) -> Optional[FeatureLoader]:
        """The split's :class:`FeatureLoader` on the trainer's device (built once; the data moves there once)."""
        s = self.sets.get(split)
        if s is None or len(s) == 0:
            return None
        device, rank, world = self._placement()
        key = f"{split}:{'train' if train else 'eval'}"
        cached = self._loaders.get(key)
        if cached is not None and cached.device == device and cached.sampler.rank == rank:
            return cached
        if train:
            loader = FeatureLoader(s.features, s.labels, self.batch_size, self.steps_per_execution, self.shuffle,
                                   self.seed, rank, world, device, self.in_memory)
        else:
            loader = FeatureLoader(s.features, s.labels, self.batch_size, shuffle=False, rank=rank,
                                   world_size=world, device=device, resident=self.in_memory,
                                   chunk_rows=max(self.batch_size, EVAL_CHUNK_ROWS))
        self._loaders[key] = loader
        return loader

    def train_dataloader(self) -> FeatureLoader:
        loader = self.loader("train", train=True)
        if loader is None:
            raise RuntimeError("no cached training features")
        return loader

    def val_dataloader(self) -> Union[FeatureLoader, list]:
        return self.loader("val", train=False) or []

    def test_dataloader(self) -> Union[FeatureLoader, list]:
        return self.loader("test", train=False) or []


# ----------------------------------------------------------------------------- orchestration
def extract_features(trainer: "pl.Trainer", module: nn.Module, datamodule: Any, split: str,
                     cache_dir: Union[str, os.PathLike] = DEFAULT_CACHE_DIR, batch_size: Optional[int] = None,
                     weights_digest: Optional[str] = None, rebuild: bool = False) -> FeatureSet:
    """Features of ``split`` from the cache, or computed once with ``trainer.predict`` and cached.

    ``module`` needs ``normalize``, ``backbone``, ``backbone_name`` and ``feature_extractor()``
    (:class:`lightning_app.module.TransferModule`). Call it on every rank: it always enters
    ``trainer.predict`` (which prepares and sets up the data and the process group); with a valid
    cache the predict loop runs zero batches.
    """
    digest = weights_digest or backbone_digest(module.backbone)
    engine = _inference_engine(module)

    def key_fn(t: "pl.Trainer") -> Dict[str, Any]:
        return extraction_cache_key(module, t, t.datamodule, split, digest)

    writer = FeatureShardWriter(key_fn, cache_dir, split, rebuild=rebuild)
    old_split, old_bs = datamodule.predict_split, datamodule.batch_size
    old_report = getattr(datamodule, "predict_report_errors", None)
    datamodule.predict_split = split
    if old_report is not None:  # training features: an unreadable image is replaced as in training, not blanked
        datamodule.predict_report_errors = False
    if batch_size:
        datamodule.batch_size = batch_size
    trainer.callbacks.append(writer)
    try:
        trainer.predict(FeatureExtractor(module.feature_extractor(), engine), datamodule=datamodule,
                        return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)
        datamodule.predict_split, datamodule.batch_size = old_split, old_bs
        if old_report is not None:
            datamodule.predict_report_errors = old_report
    store = writer.store
    assert store is not None
    if writer.cached:
        return store.load(writer.rows)
    trainer.strategy.barrier("feature_shards_written")
    if _predict_is_limited(trainer):
        fs = store.read_shards_partial(trainer.world_size)
        trainer.strategy.barrier("feature_shards_read")
        if trainer.is_global_zero:
            shutil.rmtree(store.shard_dir(), ignore_errors=True)
        rank_zero_warn(f"the predict loop is limited (fast_dev_run / limit_predict_batches): using features of "
                       f"{len(fs)} of {writer.rows} {split} samples for this run only, without caching them")
        return fs
    if trainer.is_global_zero:
        store.merge_shards(trainer.world_size, writer.rows)
    trainer.strategy.barrier("feature_cache_merged")
    return store.load(writer.rows)


def _predict_is_limited(trainer: "pl.Trainer") -> bool:
    limit = trainer.limit_predict_batches
    return bool(getattr(trainer, "fast_dev_run", False)) or not (isinstance(limit, float) and limit == 1.0)


def _inference_engine(module: nn.Module) -> Optional[nn.Module]:
    return module.engine if getattr(getattr(module, "inference_options", None), "enabled", False) else None


def extraction_cache_key(module: nn.Module, trainer: "pl.Trainer", datamodule: Any, split: str,
                         weights_digest: str) -> Dict[str, Any]:
    """The cache key :func:`extract_features` looks for: :func:`feature_cache_key` with the precision the features
    are computed in (the Trainer's, and the inference engine's where it runs them: by default bf16 where the device
    computes bf16 natively, :func:`lightning_app.engine.native_bf16`)."""
    engine = _inference_engine(module)
    precision = str(trainer.precision) + (f"/{engine.describe(trainer.strategy.root_device)}" if engine is not None else "")
    key = feature_cache_key(module, datamodule, split, precision, weights_digest)
    resize = device_resize_tag(trainer, datamodule, split)
    if resize is not None:
        key["resize"] = resize
    return key


def device_resize_tag(trainer: "pl.Trainer", datamodule: Any, split: str) -> Optional[str]:
    """``"device:<type>"`` where ``split``'s images are resized on a non-CPU device (float32 rounded to uint8 there:
    a pixel may differ by one level from the CPU workers' uint8 kernel), else ``None``: on the CPU the device path
    runs the workers' kernel, bit-identical, so the key (and caches written before) stay the same."""
    resizes = getattr(datamodule, "resizes_on_device", None)
    device = trainer.strategy.root_device.type
    # the Trainer's device, not the DataModule's attached Trainer: the key is the same before fit attaches it
    if resizes is None or not resizes(datamodule.dataset(split), trainer):
        return None
    return None if device == "cpu" else f"device:{device}"


def prepare_feature_datamodule(trainer: "pl.Trainer", module: nn.Module, datamodule: Any,
                               splits: Sequence[str] = ("train", "val"),
                               cache_dir: Union[str, os.PathLike] = DEFAULT_CACHE_DIR,
                               batch_size: Optional[int] = None, extract_batch_size: Optional[int] = None,
                               in_memory: Optional[bool] = None, rebuild: bool = False,
                               steps_per_execution: Optional[int] = None) -> FeatureDataModule:
    """Cached features of ``splits`` (computing missing ones) wrapped in a :class:`FeatureDataModule`.

    ``splits`` must start with ``"train"`` (never empty); later splits that are empty are served as ``None``.
    ``steps_per_execution`` defaults to the module's.
    """
    if not splits or splits[0] != "train":
        raise ValueError(f"splits must start with 'train', got {list(splits)}")
    digest = backbone_digest(module.backbone)
    sets: Dict[str, Optional[FeatureSet]] = {}
    for split in splits:
        # after the first trainer call the DataModule is set up on every rank, so emptiness is known
        if split != "train" and len(datamodule.dataset(split)) == 0:
            sets[split] = None
            continue
        sets[split] = extract_features(trainer, module, datamodule, split, cache_dir, extract_batch_size,
                                       weights_digest=digest, rebuild=rebuild)
    return FeatureDataModule(
        train=sets["train"], val=sets.get("val"), test=sets.get("test"),
        num_classes=datamodule.num_classes, class_names=getattr(datamodule, "class_names", None),
        batch_size=batch_size or datamodule.batch_size, seed=getattr(datamodule, "seed", 0),
        in_memory=in_memory, source=datamodule,
        steps_per_execution=steps_per_execution or getattr(module, "steps_per_execution", None),
    )


__all__ = [
    "CacheInvalid",
    "FeatureDataModule",
    "FeatureDataset",
    "FeatureExtractor",
    "FeatureSet",
    "FeatureShardWriter",
    "FeatureStore",
    "backbone_digest",
    "extract_features",
    "extraction_cache_key",
    "feature_cache_key",
    "prepare_feature_datamodule",
]
