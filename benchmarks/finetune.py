"""(c) Fine-tuning steps, every layer trainable, as ``python -m lightning_app fit --config configs/food.yaml`` runs
them, against Keras 3 ``fit`` (JAX and TensorFlow backends), same images, same backbone weights, same run.

Data: an offline image folder (``<class>/<i>.jpg``, 10 classes) of ``--steps`` x batch JPEG crops of the
photographs bundled with scikit-image, at the model's native size.
Ours: the CLI's own ``fit`` with the shipped food config (optimizer, head, precision and every other default as
shipped); overridden: data root, image size, backbone, weights file (the Keras run's), ``augment false`` and no
val / test split (Keras gets neither), the config's ``LayerwiseUnfreezing`` callback left out (every layer
trains from the first step, as in the Keras run; the other callbacks stay), ``max_epochs 2``,
``test_after_fit false``. Images/s of the second epoch (the first is warm-up: compilation, worker start),
from a callback that synchronises at epoch boundaries only; ``between steps %``: the share of that epoch spent
between steps (waiting for the DataLoader's JPEG decoding, moving the batch, device-side batch preparation;
on a GPU the device's idle time there, from CUDA events); ``device ms/step`` against ``host ms/step`` (the host's
time inside a step: on a GPU launching its kernels) says whether the steps are launch-bound.
Keras: the same backbone (``keras.applications``, ``include_top=False, pooling="avg"``) + the config's dense
head, ``preprocess_input`` in the model, Adam, ``fit`` for two epochs on the decoded uint8 images held in
memory (Keras decodes nothing during the timed epoch); images/s of the second epoch.

Usage: python benchmarks/finetune.py [--models ResNet50 InceptionV3] [--steps 12] [--batch 32] [--json out.json]
Defaults: 40 steps per epoch on a GPU, 4 on the CPU (about 12 minutes on 2 cores); the config's batch size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (KERAS_RUNNERS, OURS, ROOT, Results, add_common_args, check_precision, class_names,
                      config_value, cuda_available, exit_on_sigterm, keras_backends, keras_env, keras_model_spec,
                      keras_policy, photo_crops, run_worker, workdir, write_image_folder)  # noqa: E402

CONFIG = ROOT / "configs" / "food.yaml"


# ----------------------------------------------------------------------------- ours (worker)
def cli_args(spec: Dict[str, Any]) -> List[Any]:
    """The CLI's ``fit`` arguments for one fine-tuning run of ours (``spec``: the worker's job)."""
    from _ours import common_overrides

    args = ["fit", "--config", spec["config"], *common_overrides(spec["run_dir"]),
            "--model.backbone", spec["model"], "--model.weights", spec["h5"],
            "--data.init_args.root", spec["data"], "--data.init_args.image_size", spec["size"],
            "--data.init_args.batch_size", spec["batch"], "--data.init_args.augment", "false",
            "--data.init_args.val_split", 0, "--data.init_args.test_split", 0,
            "--trainer.max_epochs", spec["epochs"],
            "--trainer.num_sanity_val_steps", 0, "--test_after_fit", "false"]
    if spec.get("compile_backbone") is not None:  # else the product's default for the device
        args += ["--model.compile_backbone", spec["compile_backbone"]]
    return args


def ours_finetune(spec: Dict[str, Any]) -> Dict[str, Any]:
    from _ours import env_info, run_cli

    args = cli_args(spec)
    cli, timer = run_cli(args, sync_batches=False, drop_callbacks=("LayerwiseUnfreezing",))
    module = cli.model
    frozen = [n for n, p in module.backbone.named_parameters() if not p.requires_grad]
    if frozen:
        raise RuntimeError(f"{len(frozen)} backbone parameters are frozen (first: {frozen[0]}): not full fine-tuning")
    epochs = timer.epoch_train_seconds()
    train = [b for b in timer.batches["train"]]
    per_epoch = len(train) // max(len(epochs), 1)
    last = train[-per_epoch:]
    images = sum(b[2] for b in last)
    # time between steps inside the last epoch (DataLoader wait, transfer, on_after_batch_transfer)
    wait = sum(b[3] - a[4] for a, b in zip(last, last[1:]))  # device timeline on a GPU (CUDA events)
    host = timer.host["train"][-per_epoch:]  # the same steps on the host clock: on a GPU, launching them
    return {"env": env_info(cli.trainer), "device": "cuda" if env_info(cli.trainer).get("accelerator") == "cuda"
            else "cpu", "precision": str(cli.trainer.precision), "images": images, "batch": last[0][2],
            "compile_backbone": module.training_speedups(module.device)["compile_backbone"],
            "epoch_s": epochs, "first_epoch_s": epochs[0], "img_s": images / epochs[-1],
            "between_steps_pct": 100 * wait / epochs[-1],
            "device_step_ms": 1e3 * sum(b[4] - b[3] for b in last) / len(last),
            "host_step_ms": 1e3 * sum(e - s for s, e in host) / len(host)}


# ----------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ResNet50", "InceptionV3"])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per epoch (2 epochs per runner)")
    p.add_argument("--batch", type=int, default=None, help="batch size for both (default: the config's)")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--compile-backbone", choices=["true", "false"], default=None,
                   help="ours with --model.compile_backbone set (default: the product's default for the device)")
    add_common_args(p)
    args = p.parse_args()
    exit_on_sigterm()

    from lightning_app.zoo import get_entry

    device = "cuda" if cuda_available() else "cpu"
    steps = args.steps or (40 if device == "cuda" else 4)
    batch = args.batch or config_value(args.config, "data", "init_args", "batch_size", default=32)
    policy = keras_policy(args.keras_policy, device)
    hidden = config_value(args.config, "model", "hidden", default=[])
    dropout = float(config_value(args.config, "model", "dropout", default=0.0))
    lr = float(config_value(args.config, "model", "optimizer", "init_args", "lr", default=1e-3))
    config = dict(vars(args), device=device, steps=steps, batch=batch, keras_policy=policy)
    res = Results("finetune", args.json, config)
    backends = keras_backends(args.keras, res)
    work, tmp = workdir(args.workdir, "finetune")
    n = steps * batch
    names = class_names(n, per_class=4)
    print(f"work dir {work}; {device}; {args.models}; {steps} steps x batch {batch}; Keras {backends} ({policy})",
          flush=True)
    try:
        for model in args.models:
            entry = get_entry(model)
            size = entry.input_size
            data = work / f"images{size}"
            if not data.is_dir():
                write_image_folder(data, photo_crops(n, size, seed=size), np.arange(n) % len(names), names)
            h5 = work / f"{model}_notop.h5"
            h5.unlink(missing_ok=True)
            common = dict(keras_model_spec(entry), model=model, h5=str(h5), data=str(data), batch=batch, epochs=2)
            for i, backend in enumerate(backends):
                runner = KERAS_RUNNERS[backend]
                r = run_worker(ROOT / "benchmarks" / "_keras.py",
                               dict(common, job="finetune", runner=runner, save_h5=i == 0, policy=policy,
                                    tf_jit=args.tf_jit, hidden=hidden, dropout=dropout, lr=lr,
                                    classes=len(names), class_names=names),
                               work / "logs", keras_env(backend), args.timeout)
                res.add(dict(r, model=model, size=size, runner=runner, policy=policy))
            if not h5.is_file():
                res.note(f"{model}: no Keras weights file, ours ran with random init")
            r = run_worker(Path(__file__).resolve(),
                           dict(common, job="ours", runner=OURS, h5=str(h5) if h5.is_file() else "null",
                                compile_backbone=args.compile_backbone,
                                config=str(args.config), run_dir=str(work / "runs")),
                           work / "logs", None, args.timeout)
            res.add(dict(r, model=model, size=size, runner=OURS))
            if backends:
                check_precision(res, model, r.get("precision"), policy)
    finally:
        res.print_table(f"Fine-tuning, all layers trainable, batch {batch}, {steps} steps/epoch, {device}",
                        keys=["model", "size"], metric="img_s", unit="img/s", higher_is_better=True,
                        extra=[("ours precision", OURS, "precision", "s"),
                               ("Keras policy", "keras-jax", "policy", "s"),
                               ("ours between steps %", OURS, "between_steps_pct", ".0f"),
                               ("ours device ms/step", OURS, "device_step_ms", ".1f"),
                               ("ours host ms/step", OURS, "host_step_ms", ".1f"),
                               ("ours first epoch s", OURS, "first_epoch_s", ".1f"),
                               ("Keras-JAX first epoch s", "keras-jax", "first_epoch_s", ".1f")])
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    from _harness import use_checkout, worker_main

    use_checkout()
    if not worker_main({"ours": ours_finetune}, sys.argv[1:]):
        main()
