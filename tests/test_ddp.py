"""Two-process DDP (CPU, gloo) runs of the CLI as a subprocess.

* fine-tuning: after an unfreeze, both ranks hold bit-identical parameters (and a control without our
  gradient sync for late-unfrozen parameters shows they drift apart, Lightning #20340);
* feature extraction: each rank writes its shard, rank 0 merges; the merged cache equals a
  single-process forward over the same split.
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_app.finetune import LayerwiseUnfreezing

ROOT = Path(__file__).resolve().parents[1]


class UnsyncedUnfreezing(LayerwiseUnfreezing):
    """Control: the same callback without the all-reduce of parameters unfrozen after the DDP wrap."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, tmp_path, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "lightning_app", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the rank-1 child is in the same session
        out, _ = proc.communicate()
        pytest.fail(f"DDP run timed out after {timeout}s:\n{out[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    (tmp_path / "log.txt").write_text(out)
    assert proc.returncode == 0, out[-6000:]
    return out


def ddp_config(tmp_path, callbacks, **model):
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 2,
            "limit_train_batches": 3, "limit_val_batches": 1, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "ddp"}},
            "callbacks": callbacks,
        },
        "model": {"backbone": "test_resnet", "weights": None, "scheduler": None, **model},
        "data": {"class_path": "lightning_app.data.DigitsDataModule",
                 "init_args": {"image_size": 32, "batch_size": 16, "num_workers": 0}},
        "test_after_fit": False,
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def digests(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    by_epoch = {}
    for r in rows:
        by_epoch.setdefault(r["epoch"], {})[r["rank"]] = r
    return by_epoch


def _unfreeze_run(tmp_path, callback_class):
    out_file = tmp_path / "digests.jsonl"
    cfg = ddp_config(tmp_path, [
        {"class_path": callback_class, "init_args": {"schedule": {1: 2}, "train_bn": True}},
        {"class_path": "lightning_app.finetune.ParameterSyncCheck",
         "init_args": {"path": str(out_file), "raise_on_mismatch": False}},
    ], stage="finetune")
    log = run_cli(["fit", "--config", str(cfg)], tmp_path)
    return digests(out_file), log


def test_ddp_params_identical_on_both_ranks_after_unfreeze(tmp_path):
    d, log = _unfreeze_run(tmp_path, "lightning_app.finetune.LayerwiseUnfreezing")
    assert "unfroze 2 layer group(s)" in log
    assert set(d) == {0, 1} and all(set(d[e]) == {0, 1} for e in d)
    assert d[1][0]["trainable"] > d[0][0]["trainable"]  # the unfreeze happened
    assert d[0][0]["digest"] == d[0][1]["digest"]
    assert d[1][0]["digest"] == d[1][1]["digest"]  # identical after training unfrozen groups
    assert d[1][0]["digest"] != d[0][0]["digest"]  # and they did train


def test_ddp_control_without_sync_drifts(tmp_path):
    d, _ = _unfreeze_run(tmp_path, "tests.test_ddp.UnsyncedUnfreezing")
    assert d[0][0]["digest"] == d[0][1]["digest"]  # head-only phase: DDP's reducer keeps ranks equal
    assert d[1][0]["digest"] != d[1][1]["digest"]  # late-unfrozen parameters are not reduced by DDP


def test_ddp_feature_extraction_shards_merge(tmp_path):
    cache = tmp_path / "cache"
    # float32 engine (a CPU with native bf16 would run bf16 by default): the rows are compared at 1e-4 below
    cfg = ddp_config(tmp_path, [], stage="extract", hidden=[16], inference={"precision": "fp32"})
    log = run_cli(["fit", "--config", str(cfg), "--features.cache_dir", str(cache),
                   "--checkpoint.dirpath", str(tmp_path / "ckpt")], tmp_path)
    assert "extracting test_resnet features of the train split" in log
    from lightning_app.data import DigitsDataModule
    from lightning_app.data.features import FeatureStore
    from lightning_app.module import TransferModule

    metas = sorted(cache.rglob("meta.json"))
    assert len(metas) == 2  # train and val
    train_meta = json.loads(next(m for m in metas if m.parent.name.startswith("train")).read_text())
    store = FeatureStore(cache, train_meta["key"])
    fs = store.load()
    dm = DigitsDataModule(image_size=32, batch_size=64, num_workers=0)
    assert len(fs) == len(dm.dataset("train")) == train_meta["rows"]
    assert not list(cache.rglob("*.shards"))  # shards removed after the merge
    # Same backbone weights as the run (from its checkpoint), single process, same split order.
    model = TransferModule("test_resnet", 10, weights=None, stage="extract", hidden=[16],
                           inference={"precision": "fp32"})
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    ds = dm.dataset("train")
    idx = np.r_[0:20, len(ds) - 20:len(ds)]  # both ends: rows written by both ranks
    images = torch.stack([ds[int(i)][0] for i in idx]).float() / 255
    with torch.no_grad():
        expected = model.features(images).numpy()
    np.testing.assert_allclose(np.asarray(fs.features[idx]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fs.labels, ds.labels)
