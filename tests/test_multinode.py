"""Two "nodes" of one process each on this machine: ``torchrun --nnodes 2 --nproc-per-node 1`` twice, with a c10d
rendezvous on 127.0.0.1 (a free port), gloo on the CPU, ``--trainer.num_nodes 2`` (Lightning's
TorchElasticEnvironment reads RANK / WORLD_SIZE / GROUP_RANK / MASTER_ADDR / MASTER_PORT from torchrun):

* fit with layer-wise unfreezing: both ranks hold bit-identical parameters after the unfreeze, and trained;
* feature extraction: each rank writes its shard, rank 0 merges; the cache equals a one-process extraction;
* the robustness test loop: the same table as one process.
"""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun process groups: POSIX only here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(var, None)
    return env


def torchrun_two_nodes(args, tmp_path, name, timeout=300):
    """Run ``python -m lightning_app <args> --trainer.num_nodes 2`` as two torchrun "nodes" of one process each;
    returns the logs of node 0 and node 1 (fails the test if either exits non-zero or times out)."""
    port = free_port()
    procs, logs = [], []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"{name}-{port}",
               "--rdzv-conf", f"is_host={1 if node == 0 else 0}", "--local-addr", "127.0.0.1", "--max-restarts", "0",
               "-m", "lightning_app", *args, "--trainer.num_nodes", "2", "--trainer.devices", "1",
               "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"]
        log = open(tmp_path / f"{name}-node{node}.log", "w+")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        logs.append(log)
        if node == 0:
            time.sleep(0.5)  # let node 0 host the rendezvous store
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    for node, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"node {node} exited with {p.returncode}:\n{text[-5000:]}"
    return texts


def config(tmp_path, name, callbacks=(), **model):
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": name}},
            "callbacks": list(callbacks),
        },
        "model": {"backbone": "test_resnet", "weights": None, "scheduler": None, **model},
        "data": {"class_path": "lightning_app.data.DigitsDataModule",
                 "init_args": {"image_size": 32, "batch_size": 16, "num_workers": 0}},
        "test_after_fit": False,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def two_node_fit(tmp_path_factory):
    """Fine-tuning with unfreezing on two nodes; a parameter digest per rank and epoch."""
    tmp = tmp_path_factory.mktemp("two_node_fit")
    digests = tmp / "digests.jsonl"
    cfg = config(tmp, "fit", [
        {"class_path": "lightning_app.finetune.LayerwiseUnfreezing", "init_args": {"schedule": {1: 2}, "train_bn": True}},
        {"class_path": "lightning_app.finetune.ParameterSyncCheck",
         "init_args": {"path": str(digests), "raise_on_mismatch": False}},
    ], stage="finetune")
    logs = torchrun_two_nodes(["fit", "--config", str(cfg), "--checkpoint.dirpath", str(tmp / "ckpt")], tmp, "fit")
    rows = [json.loads(line) for line in digests.read_text().splitlines()]
    by_epoch = {}
    for r in rows:
        by_epoch.setdefault(r["epoch"], {})[r["rank"]] = r
    return {"tmp": tmp, "logs": logs, "digests": by_epoch, "ckpt": tmp / "ckpt" / "last.ckpt"}


def test_two_nodes_fit_with_unfreezing(two_node_fit):
    d, logs = two_node_fit["digests"], two_node_fit["logs"]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    assert "unfroze 2 layer group(s)" in logs[0]
    assert set(d) == {0, 1} and all(set(d[e]) == {0, 1} for e in d)
    assert d[1][0]["trainable"] > d[0][0]["trainable"]  # the unfreeze happened on both nodes
    for e in (0, 1):
        assert d[e][0]["digest"] == d[e][1]["digest"]  # bit-identical parameters across the nodes
    assert d[1][0]["digest"] != d[0][0]["digest"]  # and the unfrozen groups trained
    assert two_node_fit["ckpt"].is_file()


def test_two_nodes_feature_extraction_equals_one_process(tmp_path):
    from lightning_app.cli import TransferCLI
    from lightning_app.data.features import FeatureStore

    cfg = config(tmp_path, "extract", stage="extract", hidden=[16])
    common = ["--config", str(cfg), "--trainer.max_epochs", "1"]
    logs = torchrun_two_nodes(["fit", *common, "--features.cache_dir", str(tmp_path / "two"),
                               "--checkpoint.dirpath", str(tmp_path / "ck2")], tmp_path, "extract")
    assert "extracting test_resnet features of the train split" in logs[0]
    TransferCLI(args=["fit", *common, "--features.cache_dir", str(tmp_path / "one"), "--checkpoint.dirpath",
                      str(tmp_path / "ck1"), "--trainer.accelerator", "cpu", "--trainer.devices", "1"])
    metas = {m.parent.name: json.loads(m.read_text()) for m in (tmp_path / "two").rglob("meta.json")}
    assert sorted(n.split("-")[0] for n in metas) == ["train", "val"]
    assert not list((tmp_path / "two").rglob("*.shards"))  # shards merged and removed
    for name, meta in metas.items():
        one = FeatureStore(tmp_path / "one", meta["key"]).load()  # same key: same weights, data and settings
        two = FeatureStore(tmp_path / "two", meta["key"]).load()
        assert len(two) == meta["rows"] == len(one)
        np.testing.assert_array_equal(two.labels, one.labels)
        np.testing.assert_allclose(np.asarray(two.features), np.asarray(one.features), rtol=1e-5, atol=1e-6)


def test_two_nodes_robustness_table_equals_one_process(two_node_fit, tmp_path):
    from lightning_app.cli import TransferCLI

    ckpt = str(two_node_fit["ckpt"])
    common = ["--config", str(ROOT / "configs" / "robustness.yaml"), "--ckpt_path", ckpt,
              "--data.init_args.corruptions", "[gaussian_noise, spatter, frost]", "--data.init_args.severities", "[1, 5]",
              "--data.init_args.attacks", "[{name: fgsm, eps: 8/255}]", "--data.init_args.limit_per_loader", "101",
              "--data.init_args.datamodule.init_args.batch_size", "16", "--trainer.enable_progress_bar", "false"]
    torchrun_two_nodes(["test", *common, "--trainer.logger.init_args.save_dir", str(tmp_path / "two")], tmp_path, "rob")
    TransferCLI(args=["test", *common, "--trainer.logger.init_args.save_dir", str(tmp_path / "one"),
                      "--trainer.accelerator", "cpu", "--trainer.devices", "1"])

    def table(root):
        with open(next(Path(root).rglob("robustness.csv")), newline="") as f:
            return {(r["perturbation"], r["severity"]): r for r in csv.DictReader(f)}

    one, two = table(tmp_path / "one"), table(tmp_path / "two")
    assert len(one) == 1 + 3 * 2 + 1 and set(one) == set(two)
    for key, r in one.items():
        assert two[key]["n"] == r["n"] == "101", key  # every image counted once across the two nodes
        assert two[key]["top1"] == r["top1"] and two[key]["top5"] == r["top5"], key
