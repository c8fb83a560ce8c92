"""(d) The robustness test loop (clean + corruptions + FGSM) as ``python -m lightning_app test --config
configs/robustness.yaml`` runs it, against Keras 3 (JAX and TensorFlow backends) on the same images.

Data: an offline image folder (``train/<class>/``, ``test/<class>/``, JPEG crops of the photographs bundled
with scikit-image) at the model's native size; the test split (``--n-images``, a multiple of the batch) is
evaluated once per loader.
Ours: the CLI's own ``test`` with the shipped robustness config; overridden: backbone + weights file (the
Keras run's; the dense head is random, as in the Keras run), the inner DataModule (the ``data:`` block of
``configs/food.yaml`` pointed at the folder, as the config's comment tells users to do), ``corruptions``,
``severities``, ``attacks``, ``table auto`` (the config's advice for 224+ px images: ImageNet-C's
224 or 299 px table). Every perturbation runs where the product runs it (in the
robustness DataModule's ``on_after_batch_transfer``, on the accelerator). Per test loader: ``img_s`` =
its images / its wall time (data loading, perturbation or attack, forward pass, metrics), from the end of
the previous loader's last batch to the end of its own (on a GPU: CUDA events, no synchronisation added to
the loop); ``steady`` leaves its first batch (warm-up, compilation) out and is the figure compared with Keras.
Keras: the same backbone + a dense head; per loader, ``predict`` on the very arrays ours perturbed (exported
after the timed run, rounded to uint8: the corruption itself is ours and is NOT timed on the Keras side),
and for FGSM one compiled function (input gradient of the summed cross-entropy, ``clip(x + eps * sign)``,
forward pass) per batch; each function warmed up on one batch first.

Usage: python benchmarks/robustness.py [--models InceptionV3] [--n-images 128] [--corruptions ...] [--json out.json]
Defaults: 1,024 images on a GPU, 64 on the CPU (two batches per loader); severity 3 of gaussian_noise,
defocus_blur, fog, jpeg_compression; FGSM 8/255.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (KERAS_RUNNERS, OURS, ROOT, Results, add_common_args, check_precision, class_names,
                      config_value, cuda_available, engine_runs_bf16, exit_on_sigterm, keras_backends, keras_env,
                      keras_model_spec, keras_policy, photo_crops, run_worker, workdir, write_image_folder)  # noqa: E402

CONFIG = ROOT / "configs" / "robustness.yaml"
DATA_CONFIG = ROOT / "configs" / "food.yaml"
CORRUPTIONS = ["gaussian_noise", "defocus_blur", "fog", "jpeg_compression"]


# ----------------------------------------------------------------------------- ours (worker)
def ours_robustness(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from _ours import common_overrides, env_info, run_cli
    from lightning_app.data.base import to_float01

    attacks = [{"name": "fgsm", "eps": spec["eps"]}]
    args = ["test", "--config", spec["config"], *common_overrides(spec["run_dir"]),
            "--model.backbone", spec["model"], "--model.weights", spec["h5"],
            "--data.init_args.datamodule", json.dumps(spec["inner"]),
            "--data.init_args.corruptions", json.dumps(spec["corruptions"]),
            "--data.init_args.severities", json.dumps([spec["severity"]]),
            "--data.init_args.attacks", json.dumps(attacks), "--data.init_args.table", "auto",
            "--data.init_args.limit_per_loader", spec["n"]]
    cli, timer = run_cli(args)
    rdm = cli.datamodule
    loaders = timer.loader_windows("test")
    for w in loaders:
        p = rdm.perturbation(w["dataloader_idx"])
        w.update(loader=p.key, kind=p.kind)
    env = env_info(cli.trainer)
    out = {"env": env, "device": "cuda" if env.get("accelerator") == "cuda" else "cpu",
           "precision": str(cli.trainer.precision), "batch": max(b[2] for b in timer.batches["test"]),
           "loaders": loaders, "wall_s": timer.first("end:test") - timer.first("start:test")}
    if cli.model.inference_options.enabled:  # the test loop's forward is the engine's ("engine-bf16" / "-fp32")
        out["precision"] = cli.model.engine.describe(cli.trainer.strategy.root_device)
    # export the evaluated images, clean and as each corruption left them, for the Keras side (not timed)
    ds = rdm.test_dataset()
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items])
    indices = torch.tensor([it[2] for it in items])
    export = Path(spec["export"])
    export.mkdir(parents=True, exist_ok=True)
    np.save(export / "labels.npy", labels.numpy())
    files: List[List[str]] = []
    clean01 = to_float01(images)
    for k, p in enumerate(rdm.perturbations):
        path = export / f"{p.key}.npy"
        if p.kind == "attack":
            path = export / "clean.npy"  # Keras attacks the clean images itself
        elif p.kind == "corruption":
            x = torch.cat([rdm.perturb_batch(clean01[s:s + 64], labels[s:s + 64], indices[s:s + 64], k)
                           for s in range(0, len(clean01), 64)])
            np.save(path, (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        else:
            np.save(path, images.permute(0, 2, 3, 1).numpy())
        files.append([p.key, p.kind, str(path)])
    out["export"] = files
    out["labels"] = str(export / "labels.npy")
    return out


# ----------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["InceptionV3"])
    p.add_argument("--n-images", type=int, default=None, help="test images per loader (rounded to the batch)")
    p.add_argument("--batch", type=int, default=None, help="batch size for both (default: food.yaml's)")
    p.add_argument("--corruptions", nargs="*", default=CORRUPTIONS)
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--data-config", type=Path, default=DATA_CONFIG, help="its data: block is the inner DataModule")
    add_common_args(p)
    args = p.parse_args()
    exit_on_sigterm()

    from fractions import Fraction

    from lightning_app.zoo import get_entry

    device = "cuda" if cuda_available() else "cpu"
    inner: Dict[str, Any] = json.loads(json.dumps(config_value(args.data_config, "data")))
    batch = args.batch or inner["init_args"].get("batch_size", 32)
    n = args.n_images or (1024 if device == "cuda" else 64)
    n = max(batch, n // batch * batch)
    names = class_names(n)
    policy = keras_policy(args.keras_policy, device, engine_runs_bf16(args.config, device))
    config = dict(vars(args), device=device, n_images=n, batch=batch, keras_policy=policy)
    res = Results("robustness", args.json, config)
    backends = keras_backends(args.keras, res)
    work, tmp = workdir(args.workdir, "robustness")
    print(f"work dir {work}; {device}; {args.models}; {n} images x (clean + {len(args.corruptions)} corruptions + "
          f"FGSM), batch {batch}; Keras {backends} ({policy})", flush=True)
    try:
        for model in args.models:
            entry = get_entry(model)
            size = entry.input_size
            root = work / f"images{size}"
            if not root.is_dir():
                pool = photo_crops(n + len(names), size, seed=size)
                write_image_folder(root / "train", pool[:len(names)], np.arange(len(names)), names)
                write_image_folder(root / "test", pool[len(names):], np.arange(n) % len(names), names)
            data = json.loads(json.dumps(inner))
            data["init_args"].update(root=str(root), image_size=size, batch_size=batch, val_split=0.0,
                                     test_split=0.0)
            for k in ("augment",):
                data["init_args"].pop(k, None)
            h5 = work / f"{model}_notop.h5"
            h5.unlink(missing_ok=True)
            hidden = config_value(args.config, "model", "hidden", default=[])
            if backends:  # the shared weights (ours runs first: it exports the perturbed arrays Keras predicts on)
                r = run_worker(ROOT / "benchmarks" / "_keras.py",
                               {"job": "save_weights", "runner": KERAS_RUNNERS[backends[0]], "model": model,
                                "size": size, "h5": str(h5), "save_h5": True},
                               work / "logs", keras_env(backends[0]), args.timeout)
                if "error" in r:
                    res.note(f"{model}: saving the Keras weights failed ({r['error']}); ours runs with random init")
            ours = run_worker(Path(__file__).resolve(),
                              {"job": "ours", "runner": OURS, "model": model, "config": str(args.config),
                               "run_dir": str(work / "runs"), "h5": str(h5) if h5.is_file() else "null",
                               "inner": data, "corruptions": args.corruptions, "severity": args.severity,
                               "eps": args.eps, "n": n, "export": str(work / f"export_{model}")},
                              work / "logs", None, args.timeout)
            keras_rows = {}
            for backend in backends if "error" not in ours else []:
                runner = KERAS_RUNNERS[backend]
                keras_rows[runner] = run_worker(
                    ROOT / "benchmarks" / "_keras.py",
                    {**keras_model_spec(entry), "job": "robustness", "runner": runner, "model": model, "size": size,
                     "h5": str(h5), "hidden": hidden, "classes": len(names), "batch": batch,
                     "eps": float(Fraction(args.eps)), "labels": ours["labels"], "loaders": ours["export"],
                     "policy": policy, "tf_jit": args.tf_jit},
                    work / "logs", keras_env(backend), args.timeout)
            _add_rows(res, model, size, OURS, ours)
            if backends:
                check_precision(res, model, ours.get("precision"), policy)
            for runner, r in keras_rows.items():
                _add_rows(res, model, size, runner, r)
    finally:
        res.print_table(f"Robustness test loop, {n} images per loader, batch {batch}, severity {args.severity}, "
                        f"{device} (steady img/s per loader; Keras: predict on ours' perturbed arrays)",
                        keys=["model", "loader"], metric="steady_img_s", unit="img/s", higher_is_better=True,
                        extra=[("ours img/s incl. first batch", OURS, "img_s", ".1f"),
                               ("ours first batch s", OURS, "first_batch_s", ".2f")])
        if tmp is not None:
            tmp.cleanup()


def _add_rows(res: Results, model: str, size: int, runner: str, r: Dict[str, Any]) -> None:
    """One row per loader (or one error row)."""
    if r is None:
        return
    if "error" in r:
        res.add(dict(r, model=model, size=size, runner=runner, loader="-"))
        return
    common = {k: v for k, v in r.items() if k not in ("loaders", "export", "labels")}
    for w in r["loaders"]:
        row = dict(common, **w, model=model, size=size, runner=runner)
        if runner != OURS:
            row["steady_img_s"] = w["img_s"]
        res.add(row)
        common.pop("env", None)


if __name__ == "__main__":
    from _harness import use_checkout, worker_main

    use_checkout()
    if not worker_main({"ours": ours_robustness}, sys.argv[1:]):
        main()
