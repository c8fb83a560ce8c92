"""(b) Head training on cached features, as ``python -m lightning_app fit --config configs/cifar10.yaml`` does it
once the features are cached, against Keras 3 ``fit`` on the same arrays (JAX and TensorFlow backends).

Ours: the CLI's own ``fit`` with the shipped config (InceptionV3 features, ``Dense(256, relu) -> Dropout(0.5)
-> Dense(10)``, Adam 1e-3, the config's batch size; only data root, cache dir, ``max_epochs``, random backbone
weights and ``test_after_fit false`` are overridden). Before ``fit`` starts, the benchmark writes a valid
feature cache for the CLI's own model and data (same key as the CLI computes: backbone weights digest,
dataset fingerprint, precision, ...; synthetic ReLU-like clustered features of ``--rows`` x 2048, written by the
product's ``FeatureStore``), so ``fit`` takes the cache-hit path a second run of the seed workflow takes.
Keras: ``Sequential([Dense(256, relu), Dropout(0.5), Dense(10)])``, Adam(1e-3), sparse cross-entropy from
logits, accuracy, ``fit(validation_data=...)`` on exactly those arrays (``.npy`` files of the cache).
Beside it: the compute limit of those steps (``lightning_app.head_steps.matmul_limit``: the step's matrix products
alone, timed with ``torch.mm`` at its shapes, best of N, times the steps per epoch), the fused Adam kernel's time
per epoch, and which step runner the module used (``lean`` on CPU, ``cuda-graph`` on one GPU).
Metric: seconds per training epoch, validation excluded (both sides time it and subtract it); steady state =
median of the epochs after the first; the first epoch (tracing, compilation, warm-up) is reported apart. What
the CLI does between epochs (checkpointing, reports) is outside the epoch on both sides; ``ours between epochs s``
shows it, and ``fit wall s`` is the whole ``fit`` (all epochs, validation, checkpoints) on each side.

Usage: python benchmarks/head.py [--rows 50000] [--epochs 3] [--rounds 1] [--keras jax tensorflow] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (KERAS_RUNNERS, OURS, ROOT, Results, add_common_args, best_round, config_value,
                      cuda_available, exit_on_sigterm, keras_backends, keras_env, run_worker, workdir,
                      write_cifar10)  # noqa: E402

CONFIG = ROOT / "configs" / "cifar10.yaml"
CLASSES = 10


def images_for_train_rows(rows: int, val_split: float, classes: int = CLASSES) -> int:
    """Images per CIFAR-format training set so that the config's stratified split leaves ``rows`` for training."""
    per_class = -(-rows // classes)
    n = int(per_class / (1 - val_split))
    while n - round(n * val_split) < per_class:
        n += 1
    return n * classes


def synthetic_features(labels: np.ndarray, dim: int, seed: int, classes: int = CLASSES) -> np.ndarray:
    """ReLU-like pooled features with class structure (a head can learn them, like real CNN features): the class
    centres are the same for every split, the noise depends on ``seed``."""
    centers = np.random.default_rng(1234).normal(size=(classes, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), dim), np.float32)
    for s in range(0, len(labels), 8192):
        y = labels[s:s + 8192]
        out[s:s + 8192] = np.maximum(centers[y] * 0.3 + rng.standard_normal((len(y), dim), dtype=np.float32), 0)
    return out


# ----------------------------------------------------------------------------- ours (worker)
def ours_head(spec: Dict[str, Any]) -> Dict[str, Any]:
    from _ours import common_overrides, env_info, run_cli
    from _timing import median
    from lightning_app.data.features import FeatureStore, backbone_digest, extraction_cache_key

    written: Dict[str, str] = {}

    def write_cache(cli) -> None:
        """Write the feature cache the CLI is about to look for, through the product's own FeatureStore."""
        dm, module, trainer = cli.datamodule, cli.model, cli.trainer
        digest = backbone_digest(module.backbone)
        for i, split in enumerate(("train", "val")):
            labels = np.asarray(dm.dataset(split).labels, np.int64)
            key = extraction_cache_key(module, trainer, dm, split, digest)
            store = FeatureStore(spec["cache"], key)
            shards = store.shard_dir()
            shards.mkdir(parents=True, exist_ok=True)
            synthetic_features(labels, module.num_features, seed=i).tofile(shards / "rank0.features.bin")
            labels.tofile(shards / "rank0.labels.bin")
            np.arange(len(labels), dtype=np.int64).tofile(shards / "rank0.indices.bin")
            (shards / "rank0.json").write_text(json.dumps({"rows": len(labels), "dim": module.num_features}))
            written[split] = str(store.merge_shards(1, len(labels)).path)
        # fail fast, never extract 50,000 images by accident: with a cache hit the predict loop runs 0 batches anyway
        trainer.limit_predict_batches = 0

    args = ["fit", "--config", spec["config"], *common_overrides(spec["run_dir"]),
            "--model.weights", "null", "--data.init_args.root", spec["data"],
            "--features.cache_dir", spec["cache"], "--trainer.max_epochs", spec["epochs"], "--test_after_fit", "false"]
    try:
        cli, timer = run_cli(args, sync_batches=False, before_fit_hook=write_cache)
    except RuntimeError as err:
        raise RuntimeError(f"the CLI did not take the feature cache written for it ({err}); the cache key or "
                           "layout changed: update benchmarks/head.py::ours_head") from err
    used = {s: str(cli.datamodule.sets[s].path) for s in ("train", "val")}
    if used != written:
        raise RuntimeError(f"the CLI used caches {used}, the benchmark wrote {written}")
    epochs = [e for e in timer.epochs if "end" in e]
    train_s = timer.epoch_train_seconds()
    # the compute limit of the same steps (lightning_app.head_steps): the step's matrix products alone, and the fused
    # Adam kernel, timed at the step's shapes on the same device, per epoch
    # (in float32 whatever the Trainer's precision, as the head steps run; on CUDA replayed from a CUDA graph)
    from lightning_app.head_steps import adam_kernel_time, matmul_limit

    rows, batch_size = len(cli.datamodule.sets["train"]), cli.datamodule.batch_size
    steps = -(-rows // batch_size)
    limit_s = matmul_limit(cli.model.head, batch_size, cli.model.device) * steps
    adam_s = adam_kernel_time(cli.model.head, cli.model.device) * steps
    steady = median(train_s[1:])
    return {"env": env_info(cli.trainer), "device": "cuda" if cli.trainer.accelerator.__class__.__name__.startswith(
                "CUDA") else "cpu", "precision": str(cli.trainer.precision), "rows": len(cli.datamodule.sets["train"]),
            "matmul_limit_s": limit_s, "adam_kernel_s": adam_s, "over_matmul_limit": steady / limit_s,
            "head_steps": getattr(getattr(cli.model, "_head_steps", None), "name", None),
            "val_rows": len(cli.datamodule.sets["val"]),
            "features": {s: str(Path(p) / "features.npy") for s, p in used.items()},
            "labels": {s: str(Path(p) / "labels.npy") for s, p in used.items()},
            "epoch_s": train_s, "val_s": [e["val_s"] for e in epochs], "first_epoch_s": train_s[0],
            "steady_epoch_s": median(train_s[1:]), "between_epochs_s": median(timer.between_epochs_seconds()),
            "fit_wall_s": timer.first("end:train") - timer.first("start:train"),
            "train_acc": float(cli.trainer.callback_metrics.get("train_acc", float("nan"))),
            "val_acc": float(cli.trainer.callback_metrics.get("val_acc", float("nan")))}


# ----------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000, help="training rows (2048-d); val: the config's split")
    p.add_argument("--epochs", type=int, default=3, help="epochs per runner (first = warm-up, the rest steady)")
    p.add_argument("--keras-steps-per-execution", type=int, default=1,
                   help="Keras compile(steps_per_execution=...) (1 = the seed notebook's default)")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every runner this many times, alternating; each reports its fastest round (best of N, "
                        "as timeit does: on a shared or virtual machine the slow spells are noise, not the code)")
    add_common_args(p)
    args = p.parse_args()
    exit_on_sigterm()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is warm-up)")

    device = "cuda" if cuda_available() else "cpu"
    val_split = float(config_value(args.config, "data", "init_args", "val_split", default=0.1))
    n = images_for_train_rows(args.rows, val_split)
    config = dict(vars(args), device=device, images=n)
    res = Results("head", args.json, config)
    backends = keras_backends(args.keras, res)
    work, tmp = workdir(args.workdir, "head")
    print(f"work dir {work}; {device}; {args.rows} training rows ({n} CIFAR-format images); Keras {backends}",
          flush=True)
    labels = np.arange(n) % CLASSES
    write_cifar10(work / "data", np.zeros((n, 32, 32, 3), np.uint8), labels, np.zeros((10, 32, 32, 3), np.uint8),
                  np.arange(10))
    hidden = config_value(args.config, "model", "hidden", default=[256])
    dropout = float(config_value(args.config, "model", "dropout", default=0.5))
    lr = float(config_value(args.config, "model", "optimizer", "init_args", "lr", default=1e-3))
    batch = config_value(args.config, "features", "batch_size") or \
        config_value(args.config, "data", "init_args", "batch_size", default=32)
    rounds: Dict[str, List[Dict[str, Any]]] = {}
    try:
        for _ in range(args.rounds):  # runners alternate, so a slow spell of the machine hits each of them alike
            ours = run_worker(Path(__file__).resolve(),
                              {"job": "ours", "runner": OURS, "config": str(args.config), "data": str(work / "data"),
                               "cache": str(work / "cache"), "run_dir": str(work / "runs"), "epochs": args.epochs},
                              work / "logs", None, args.timeout)
            rounds.setdefault(OURS, []).append(dict(ours, case=f"{args.rows}x2048", runner=OURS))
            if "error" in ours:
                res.note("ours failed: no arrays for Keras either")
                return
            # Keras in the precision ours trained in (auto: mixed_bfloat16 where ours ran bf16, else float32)
            policy = args.keras_policy if args.keras_policy != "auto" else \
                "mixed_bfloat16" if "bf16" in str(ours.get("precision")) else "float32"
            res.doc["config"]["keras_policy"] = policy
            for backend in backends:
                runner = KERAS_RUNNERS[backend]
                r = run_worker(ROOT / "benchmarks" / "_keras.py",
                               {"job": "head", "runner": runner, "train_x": ours["features"]["train"],
                                "train_y": ours["labels"]["train"], "val_x": ours["features"]["val"],
                                "val_y": ours["labels"]["val"], "classes": CLASSES, "hidden": hidden,
                                "dropout": dropout, "lr": lr, "batch": batch, "epochs": args.epochs, "policy": policy,
                                "tf_jit": args.tf_jit, "steps_per_execution": args.keras_steps_per_execution},
                               work / "logs", keras_env(backend), args.timeout)
                rounds.setdefault(runner, []).append(dict(r, case=f"{args.rows}x2048", runner=runner, policy=policy))
    finally:
        for rows in rounds.values():  # also after an interruption: the rounds that finished
            res.add(best_round(rows, "steady_epoch_s", higher_is_better=False))
        res.print_table(f"Head training on cached features ({args.rows} x 2048, batch {batch}), s/epoch, {device}",
                        keys=["case"], metric="steady_epoch_s", unit="s/epoch", higher_is_better=False,
                        extra=[("ours precision", OURS, "precision", "s"), ("Keras policy", "keras-jax", "policy", "s"),
                               ("matmul limit s/epoch", OURS, "matmul_limit_s", ".2f"),
                               ("ours / matmul limit", OURS, "over_matmul_limit", ".2f"),
                               ("Adam kernel s/epoch", OURS, "adam_kernel_s", ".2f"),
                               ("ours head steps", OURS, "head_steps", "s"),
                               ("ours between epochs s", OURS, "between_epochs_s", ".2f"),
                               ("ours first epoch s", OURS, "first_epoch_s", ".2f"),
                               ("Keras-JAX first epoch s", "keras-jax", "first_epoch_s", ".2f"),
                               ("Keras-TF first epoch s", "keras-tensorflow", "first_epoch_s", ".2f"),
                               ("ours fit wall s", OURS, "fit_wall_s", ".1f"),
                               ("Keras-JAX fit wall s", "keras-jax", "fit_wall_s", ".1f"),
                               ("ours val acc", OURS, "val_acc", ".3f"),
                               ("Keras-JAX val acc", "keras-jax", "val_acc", ".3f")])
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    from _harness import use_checkout, worker_main

    use_checkout()
    if not worker_main({"ours": ours_head}, sys.argv[1:]):
        main()
