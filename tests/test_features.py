"""Feature cache: extraction through the predict loop, reuse without a backbone forward, and rebuilds of
stale or corrupt caches; shard merging; batched serving."""
import json
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_app.data import ArrayDataModule
from lightning_app.data.features import (
    CacheInvalid,
    FeatureDataModule,
    FeatureDataset,
    FeatureSet,
    FeatureStore,
    prepare_feature_datamodule,
)
from lightning_app.module import TransferModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def data(seed=0, n=40, size=32):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = (rng.random((n, 10, 10, 3)) * 255).astype(np.uint8)
    return ArrayDataModule(images, labels, list("abcd"), image_size=size, batch_size=8, val_split=0.25,
                           test_split=0.0, num_workers=0)


def model(seed=0):
    pl.seed_everything(seed)
    # the engine in float32 (its default is bf16 on a CPU with native bf16): the cache is compared at 1e-5 below
    m = TransferModule("test_resnet", 4, weights=None, stage="extract", hidden=[8], inference={"precision": "fp32"})
    m.forwards = 0

    def count(*_):
        m.forwards += 1

    # batches through the inference engine (its copy of the backbone runs without the source's hooks), plus any
    # forward of the backbone itself (the engine runs it while building its copy)
    m.engine.register_forward_hook(count)
    m.backbone_forwards = 0

    def count_backbone(*_):
        m.backbone_forwards += 1

    m.backbone.register_forward_hook(count_backbone)
    return m


def trainer(tmp_path):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, max_epochs=1)


def build(tmp_path, m=None, dm=None, **kw):
    m = m or model()
    fdm = prepare_feature_datamodule(trainer(tmp_path), m, dm or data(), cache_dir=tmp_path / "cache", **kw)
    return m, fdm


def reference_features(m, dm, split):
    ds = dm.dataset(split)
    images = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
    m.eval()
    with torch.no_grad():  # the plain backbone, not the inference engine that extracted the cache
        return m.backbone(m.normalize(images)).numpy()


def train_store(fdm):
    return fdm.sets["train"].path


# --------------------------------------------------------------------------- reuse
def test_extracted_features_match_backbone_and_are_reused(tmp_path):
    m1, f1 = build(tmp_path)
    assert m1.forwards == 4 + 1  # 32 train images / 8 + 8 val / 8
    dm = data()
    np.testing.assert_allclose(np.asarray(f1.sets["train"].features), reference_features(m1, dm, "train"),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(f1.sets["train"].labels, dm.dataset("train").labels)
    assert isinstance(f1.sets["train"].features, np.memmap)

    m2, f2 = build(tmp_path, model())  # a new run: same weights (same seed), same data
    assert m2.forwards == 0 and m2.backbone_forwards == 0  # no backbone forward at all
    np.testing.assert_array_equal(np.asarray(f2.sets["train"].features), np.asarray(f1.sets["train"].features))

    # The head trains on the cache, again without touching the backbone.
    t = trainer(tmp_path)
    t.fit(m2, f2)
    assert m2.forwards == 0 and m2.backbone_forwards == 0
    assert "train_acc" in t.callback_metrics


def test_changed_weights_or_data_use_a_new_key(tmp_path):
    m1, f1 = build(tmp_path)
    m2, f2 = build(tmp_path, model(seed=1))  # other weights
    assert m2.forwards > 0 and train_store(f2) != train_store(f1)
    m3, f3 = build(tmp_path, model(), dm=data(seed=5))  # other images
    assert m3.forwards > 0 and train_store(f3) != train_store(f1)
    m4, f4 = build(tmp_path, model(), dm=data(size=40))  # other input size
    assert m4.forwards > 0 and train_store(f4) != train_store(f1)


def test_default_precision_follows_the_cpu_and_keys_the_cache(tmp_path, monkeypatch):
    """``inference.precision: auto`` extracts in bf16 on a CPU with native bf16 instructions and in float32 on one
    without; the two caches have different keys (neither is served for the other), and the bf16 features are
    the float32 ones to bf16 accuracy."""
    stores, feats = {}, {}
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=native: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        pl.seed_everything(0)
        m = TransferModule("test_resnet", 4, weights=None, stage="extract", hidden=[8])
        assert m.engine.describe("cpu") == ("engine-bf16" if native else "engine-fp32")
        _, fdm = build(tmp_path, m)
        stores[native], feats[native] = train_store(fdm), np.asarray(fdm.sets["train"].features)
    assert stores[True] != stores[False]
    ref = reference_features(m, data(), "train")
    np.testing.assert_allclose(feats[False], ref, rtol=1e-5, atol=1e-6)
    err = np.abs(feats[True] - ref).max() / np.abs(ref).max()
    assert 0 < err < 5e-2, err


# --------------------------------------------------------------------------- stale / corrupt
def _truncate(d):
    p = d / "features.npy"
    p.write_bytes(p.read_bytes()[:-100])


def _wrong_shape(d):
    np.save(d / "features.npy", np.zeros((3, 5), np.float32))


def _key_mismatch(d):
    meta = json.loads((d / "meta.json").read_text())
    meta["key"]["weights"] = "0" * 64
    (d / "meta.json").write_text(json.dumps(meta))


def _bad_meta(d):
    (d / "meta.json").write_text("{not json")


def _flipped_bytes(d):
    p = d / "features.npy"
    raw = bytearray(p.read_bytes())
    raw[-8:] = b"\x00\x00\xc0\x7f" * 2  # NaNs in the last row, same size
    p.write_bytes(bytes(raw))


def _missing_labels(d):
    (d / "labels.npy").unlink()


@pytest.mark.parametrize("corrupt", [_truncate, _wrong_shape, _key_mismatch, _bad_meta, _flipped_bytes, _missing_labels])
def test_corrupt_or_stale_cache_is_detected_and_rebuilt(tmp_path, corrupt):
    m1, f1 = build(tmp_path)
    d = train_store(f1)
    good = np.array(f1.sets["train"].features)
    del f1
    corrupt(d)
    with pytest.warns(UserWarning, match="not usable"):
        m2, f2 = build(tmp_path, model())
    assert m2.forwards == 4 + 0  # train rebuilt (4 batches), val still valid
    assert train_store(f2) == d
    np.testing.assert_allclose(np.asarray(f2.sets["train"].features), good, rtol=1e-6)
    FeatureStore(tmp_path / "cache", json.loads((d / "meta.json").read_text())["key"]).load(len(good))


def test_rebuild_flag_forces_extraction(tmp_path):
    build(tmp_path)
    m2, _ = build(tmp_path, model(), rebuild=True)
    assert m2.forwards == 5


# --------------------------------------------------------------------------- merge and serving
def _write_shard(d, rank, idx, feats, labels):
    d.mkdir(parents=True, exist_ok=True)
    feats.astype(np.float32).tofile(d / f"rank{rank}.features.bin")
    np.asarray(idx, np.int64).tofile(d / f"rank{rank}.indices.bin")
    np.asarray(labels, np.int64).tofile(d / f"rank{rank}.labels.bin")
    (d / f"rank{rank}.json").write_text(json.dumps({"rows": len(idx), "dim": feats.shape[1]}))


def test_merge_places_rows_by_dataset_index(tmp_path):
    store = FeatureStore(tmp_path, {"backbone": "x", "split": "train", "v": 1})
    full = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    labels = np.arange(7) % 2
    a, b = [5, 0, 2, 6], [1, 3, 4]  # interleaved, out of order, like a distributed sampler
    _write_shard(store.shard_dir(), 0, a, full[a], labels[a])
    _write_shard(store.shard_dir(), 1, b, full[b], labels[b])
    fs = store.merge_shards(world_size=2, rows=7)
    np.testing.assert_array_equal(np.asarray(fs.features), full)
    np.testing.assert_array_equal(fs.labels, labels)
    assert not store.shard_dir().exists()
    assert store.load(7).dim == 3


def test_merge_rejects_missing_rows(tmp_path):
    store = FeatureStore(tmp_path, {"backbone": "x", "split": "train"})
    full = np.ones((5, 2), np.float32)
    _write_shard(store.shard_dir(), 0, [0, 1, 2], full[:3], [0, 0, 0])
    _write_shard(store.shard_dir(), 1, [4], full[:1], [0])
    with pytest.raises(RuntimeError, match="got no features"):
        store.merge_shards(world_size=2, rows=5)
    with pytest.raises(CacheInvalid):
        store.load(5)  # nothing that looks valid was left behind


def test_feature_dataset_batched_reads_keep_order():
    feats = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    ds = FeatureDataset(feats, np.arange(10))
    x, y, idx = ds.__getitems__([7, 2, 9, 2])
    np.testing.assert_array_equal(x.numpy(), feats[[7, 2, 9, 2]])
    assert y.tolist() == [7, 2, 9, 2] and idx.tolist() == [7, 2, 9, 2]
    fdm = FeatureDataModule(FeatureSet(feats, np.arange(10) % 3, None), batch_size=4, num_classes=3,
                            steps_per_execution=1)
    chunks = list(fdm.train_dataloader())
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert sorted(torch.cat([c.index for c in chunks]).tolist()) == list(range(10))
    x, y, idx = chunks[0].materialize()
    np.testing.assert_array_equal(x.numpy(), feats[idx.numpy()])
    assert y.tolist() == (idx % 3).tolist()
    assert fdm.val_dataloader() == []


def test_hit_then_miss_in_one_run(tmp_path):
    """A cache hit (the predict loop is skipped) must not leak into the next split's extraction."""
    _, f1 = build(tmp_path)
    _truncate(f1.sets["val"].path)
    del f1
    with pytest.warns(UserWarning, match="not usable"):
        m2, f2 = build(tmp_path, model())
    assert m2.forwards == 1  # train: hit (0 forwards); val: rebuilt (1 batch)
    assert len(f2.sets["val"]) == 8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_shard_writer_writes_every_batch_in_order(tmp_path, device):
    """The writer's deferred host copies (CUDA: pinned, non_blocking, written a few batches later) give the bytes
    of the batches in batch order, whatever the number of batches still in flight."""
    from types import SimpleNamespace

    from lightning_app.data.features import FeatureShardWriter

    writer = FeatureShardWriter(lambda t: {}, tmp_path, "train")
    writer.store = FeatureStore(tmp_path, {"backbone": "x", "n": 1})
    trainer = SimpleNamespace(global_rank=0)
    writer.on_predict_start(trainer, None)
    g = torch.Generator().manual_seed(0)
    feats, labels, indices = [], [], []
    for b in range(11):
        n = 5 if b < 10 else 3
        f = torch.randn(n, 7, generator=g)
        y = torch.randint(0, 4, (n,), generator=g)
        i = torch.arange(5 * b, 5 * b + n)
        feats.append(f), labels.append(y), indices.append(i)
        writer.write_on_batch_end(trainer, None, f.to(device) * 1.0, None, (None, y.to(device), i.to(device)), b, 0)
    writer.on_predict_end(trainer, None)
    shard = writer.shard_dir
    assert (shard / "rank0.features.bin").read_bytes() == torch.cat(feats).numpy().tobytes()
    assert (shard / "rank0.labels.bin").read_bytes() == torch.cat(labels).numpy().astype(np.int64).tobytes()
    assert (shard / "rank0.indices.bin").read_bytes() == torch.cat(indices).numpy().astype(np.int64).tobytes()
    assert json.loads((shard / "rank0.json").read_text()) == {"rows": 53, "dim": 7}
