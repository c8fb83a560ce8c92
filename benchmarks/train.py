"""Training benchmarks: ours (Lightning + TransferModule) against Keras 3 ``fit`` on TensorFlow, same run.

(a) Head training on cached features: the same float32 arrays (default 50,000 x 2048 with 10 classes, the
    shape of the CIFAR-10 InceptionV3 cache), the same head ``Dense(256, relu) -> Dropout(0.5) -> Dense(10)``,
    batch size 32, Adam(1e-3), cross-entropy, accuracy tracked. Time per epoch = median over the epochs after
    the first (tracing / warm-up).
    Ours: ``TransferModule(stage="extract")`` on ``FeatureDataModule`` (in memory) with a Lightning Trainer,
    once with one optimizer step per Lightning step and once with ``steps_per_execution`` (several
    optimizer steps per Lightning step, same batches in the same order; Keras has the same option).
(b) Full fine-tuning step throughput: ResNet50 at 224 x 224, batch 32, Adam(1e-4), all layers trainable,
    random weights and images. Keras: ``keras.applications.ResNet50`` ``fit``; ours: the zoo's Keras-equivalent
    ResNet50 as ``TransferModule(stage="finetune")`` under a Lightning Trainer. Images/s = median over timed
    windows after warm-up.

The reference is the ``bench`` extra: Keras 3 on ``tensorflow-cpu``, so Keras always runs on the CPU; ours
runs on every device given by ``--devices`` (default: cuda when available, and cpu), so the table has a
same-device (CPU vs CPU) ratio and an as-deployed (GPU vs Keras' CPU) ratio. Keras runs in a subprocess
with ``KERAS_BACKEND=tensorflow`` set before keras is imported (TensorFlow and torch never share a process).

Usage: python benchmarks/train.py [--parts a b] [--devices cuda cpu] [--n 50000] [--epochs 3]
                                  [--ft-steps 12] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


# ----------------------------------------------------------------------------- Keras worker (subprocess)
def keras_head(data: Path, batch: int, epochs: int, hidden: int, lr: float) -> dict:
    import keras

    keras.utils.set_random_seed(SEED)
    x = np.load(data / "features.npy")
    y = np.load(data / "labels.npy")
    classes = int(y.max()) + 1
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(classes),
    ])
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    hist = model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=True, callbacks=[Timer()])
    return {"epoch_s": times, "final_acc": float(hist.history["accuracy"][-1])}


def keras_finetune(batch: int, steps: int, size: int, lr: float) -> dict:
    import keras

    keras.utils.set_random_seed(SEED)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=10,
                                        classifier_activation=None)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(SEED)
    x = rng.random((batch * steps, size, size, 3), dtype=np.float32) * 2 - 1
    y = rng.integers(0, 10, batch * steps)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, b, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, b, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(x, y, batch_size=batch, epochs=2, verbose=0, shuffle=False, callbacks=[Timer()])
    timed = times[steps + 2:]  # second epoch, after two more warm-up steps
    return {"images_per_s": batch / statistics.median(timed), "steps_timed": len(timed)}


def run_keras(kind: str, args: argparse.Namespace, data: Path = None) -> dict:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(args.batch), "--epochs", str(args.epochs),
           "--hidden", str(args.hidden), "--ft-steps", str(args.ft_steps), "--ft-batch", str(args.ft_batch),
           "--ft-size", str(args.ft_size)]
    if data is not None:
        cmd += ["--data", str(data)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"Keras worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- ours
def _trainer(device: str, callbacks: list, **kw):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=callbacks, **kw)


def ours_head(device: str, data: Path, batch: int, epochs: int, hidden: int, lr: float, steps_per_execution: int) -> dict:
    import warnings
    from functools import partial

    import pytorch_lightning as pl
    import torch

    from lightning_app.data.features import FeatureDataModule, FeatureSet
    from lightning_app.module import TransferModule

    warnings.filterwarnings("ignore")
    pl.seed_everything(SEED, verbose=False)
    x = np.load(data / "features.npy", mmap_mode="r")
    y = np.load(data / "labels.npy")
    fused = {"fused": True}  # one kernel per step (CUDA and, since torch 2.4, CPU)
    model = TransferModule("InceptionV3", int(y.max()) + 1, weights=None, stage="extract", hidden=[hidden],
                           dropout=0.5, optimizer=partial(torch.optim.Adam, lr=lr, **fused),
                           steps_per_execution=steps_per_execution)
    assert model.num_features == x.shape[1]
    dm = FeatureDataModule(FeatureSet(x, y, data), num_classes=int(y.max()) + 1, batch_size=batch, in_memory=True,
                           steps_per_execution=steps_per_execution)
    times = []

    class Timer(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    t = _trainer(device, [Timer()], max_epochs=epochs)
    t.fit(model, dm)
    return {"epoch_s": times, "final_acc": float(t.callback_metrics["train_acc"])}


class _FixedBatches:
    """``n`` copies of one batch already on the device (measures the training step, not the input pipeline)."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


def ours_finetune(device: str, batch: int, steps: int, size: int, lr: float, precision: str, channels_last: bool) -> dict:
    import warnings
    from functools import partial

    import pytorch_lightning as pl
    import torch

    from lightning_app.module import TransferModule

    warnings.filterwarnings("ignore")
    pl.seed_everything(SEED, verbose=False)
    fused = {"fused": True}  # one kernel per step (CUDA and, since torch 2.4, CPU)
    model = TransferModule("ResNet50", 10, weights=None, stage="finetune",
                           optimizer=partial(torch.optim.Adam, lr=lr, **fused), channels_last=channels_last)
    g = torch.Generator().manual_seed(SEED)
    dev = torch.device(device)
    images = torch.rand(batch, 3, size, size, generator=g).to(dev)
    labels = torch.randint(0, 10, (batch,), generator=g).to(dev)
    idx = torch.arange(batch, device=dev)
    times = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    n = steps + 3
    t = _trainer(device, [Timer()], max_epochs=1, precision=precision)
    t.fit(model, train_dataloaders=_FixedBatches((images, labels, idx), n))
    timed = times[3:]
    return {"images_per_s": batch / statistics.median(timed), "steps_timed": len(timed)}


# ----------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument("--devices", nargs="+", default=None, help="devices for ours (default: cuda if available, cpu)")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-execution", type=int, default=64)
    p.add_argument("--ft-steps", type=int, default=12)
    p.add_argument("--ft-batch", type=int, default=32)
    p.add_argument("--ft-size", type=int, default=224)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-keras", action="store_true", help="ours only (machines without the bench extra)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker == "keras-head":
        print(json.dumps(keras_head(args.data, args.batch, args.epochs, args.hidden, 1e-3)))
        return
    if args.worker == "keras-finetune":
        print(json.dumps(keras_finetune(args.ft_batch, args.ft_steps, args.ft_size, 1e-4)))
        return

    sys.path.insert(0, str(ROOT))
    import torch

    devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    results = {"config": vars(args) | {"json": str(args.json)}, "devices": devices}

    class Rows(list):
        def append(self, row):  # print each result as soon as it exists (partial runs still report)
            super().append(row)
            print("RESULT", json.dumps(row), flush=True)

    rows = Rows()
    env = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    results["env"] = env

    if "a" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            rng = np.random.default_rng(SEED)
            centers = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
            labels = rng.integers(0, args.classes, args.n)
            feats = (centers[labels] * 0.3 + rng.normal(size=(args.n, args.dim)).astype(np.float32)).clip(0, None)
            np.save(data / "features.npy", feats.astype(np.float32))  # ReLU-like pooled features
            np.save(data / "labels.npy", labels.astype(np.int64))
            del feats
            k_epoch = float("nan")
            if not args.no_keras:
                keras_a = run_keras("keras-head", args, data)
                k_epoch = statistics.median(keras_a["epoch_s"][1:])
                results["a_keras"] = keras_a
                rows.append(("a", "Keras 3 fit (TF, cpu)", "epoch s", k_epoch, 1.0, keras_a["final_acc"]))
            for dev in devices:
                for spe in (1, args.steps_per_execution):
                    r = ours_head(dev, data, args.batch, args.epochs, args.hidden, 1e-3, spe)
                    e = statistics.median(r["epoch_s"][1:])
                    results[f"a_ours_{dev}_spe{spe}"] = r
                    rows.append(("a", f"ours Lightning ({dev}, {spe} step/exec)", "epoch s", e, k_epoch / e,
                                 r["final_acc"]))
    if "b" in args.parts:
        k_ips = float("nan")
        if not args.no_keras:
            keras_b = run_keras("keras-finetune", args)
            results["b_keras"] = keras_b
            k_ips = keras_b["images_per_s"]
            rows.append(("b", "Keras 3 fit ResNet50 (TF, cpu, fp32)", "img/s", k_ips, 1.0, None))
        variants = []
        for dev in devices:
            if dev == "cuda":
                variants += [("cuda", "32-true", False), ("cuda", "bf16-mixed", True)]
            else:
                variants += [("cpu", "32-true", False), ("cpu", "32-true", True), ("cpu", "bf16-mixed", True)]
        for dev, prec, cl in variants:
            r = ours_finetune(dev, args.ft_batch, args.ft_steps, args.ft_size, 1e-4, prec, cl)
            results[f"b_ours_{dev}_{prec}_{'cl' if cl else 'nchw'}"] = r
            rows.append(("b", f"ours Lightning ResNet50 ({dev}, {prec}{', channels_last' if cl else ''})", "img/s",
                         r["images_per_s"], r["images_per_s"] / k_ips, None))

    print(f"\nenvironment: {env}")
    print(f"{'part':4} {'runner':58} {'metric':8} {'value':>10} {'ratio vs Keras':>15} {'train acc':>10}")
    for part, name, metric, value, ratio, acc in rows:
        acc_s = f"{acc:.3f}" if acc is not None else ""
        print(f"{part:4} {name:58} {metric:8} {value:10.3f} {ratio:14.2f}x {acc_s:>10}")
    results["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
