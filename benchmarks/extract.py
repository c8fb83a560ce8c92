"""(a) Feature extraction as ``python -m lightning_app fit --config configs/cifar10.yaml`` performs it, against
Keras 3 (JAX and TensorFlow backends) doing the seed notebook's job, same images, same weights, same run.

Data: an offline CIFAR-10-format folder (``cifar-10-batches-py``, the official pickle layout) of ``--n-images``
32x32 crops of the photographs bundled with scikit-image, upsampled to each model's native size.

Ours: the CLI's own ``fit`` (``TransferCLI`` from ``lightning_app.cli`` with the config as shipped; only the
data root, backbone, weights file, image size, cache dir and ``max_epochs 0`` are overridden), which extracts
train + val features through the Trainer's predict loop into the on-disk cache (``features.rebuild true``).
Timed with a callback: ``wall_s`` from ``before_fit`` to the start of head training (both splits, cache
written and merged, warm-up and compilation included); ``img_s`` the steady state of the train split (first
``--warmup-batches`` and a smaller last batch left out, data waits included); where the time goes inside that
window: ``model %`` = inside ``predict_step`` (the backbone; on a GPU its device time, from CUDA events, with no
synchronisation added to the loop), the rest = waiting for the DataLoader (decode, and the resize where it runs in
the CPU workers), the device-side batch preparation (the resize where it runs on the device: ``resize on``,
``data.resize_on``; uint8 -> float) and the cache writer. ``input pipeline alone img/s``: the image DataModule's
predict loader as the product builds it (``workers``: its worker count), the transfer and the device-side
preparation, no model, from the loader's start, over ``--loader-batches`` batches. ``--resize-on workers device``
runs ours once per value (a second table). ``limit img/s``: the backbone's FLOPs at the machine's best matrix-product
rate in the run's precision, measured in the same process (``_limits``); ``limit vs Keras-X`` is the most that any
implementation of the same arithmetic could gain over Keras-X.
Keras: ``Resizing`` + ``preprocess_input`` + ``include_top=False, pooling="avg"`` model, ``predict`` over the
same images, ``np.save`` (see ``_keras.extract``); ``img_s`` is a second, warm ``predict``. A callback times
that ``predict``'s batches (waiting for their outputs): ``outside batches s`` is the rest of it (Keras-TF on the
2-core CPU machine at times waits ~5.1 s there), ``ours vs Keras-X batches only`` the ratio against the batches
alone, Keras's best case (and ``limit vs Keras-X batches only`` the limit's).
Sanity guard: ours and Keras features of two images must agree (``rel diff``; ours resizes to uint8 (workers or
device), Keras in float on the device, so ~1e-2 is expected, bf16 more).

Usage: python benchmarks/extract.py [--models InceptionV3 ResNet50] [--n-images 448] [--batch 64] [--rounds 1]
                                    [--resize-on workers device]
                                    [--keras jax tensorflow] [--json out.json]
Defaults: on a GPU InceptionV3, ResNet50, Xception and VGG16 (the seed notebooks' backbones; the other four:
``--models NASNetLarge InceptionResNetV2 ResNet152V2 DenseNet201``, a second run: each model costs a Keras-JAX
XLA compilation and our warm-up) on 4,096 images; on the CPU InceptionV3 and ResNet50 on 448 images (about 10
minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (KERAS_RUNNERS, OURS, ROOT, Results, add_common_args, best_round, check_precision,
                      config_value, cuda_available, engine_runs_bf16, exit_on_sigterm, keras_backends, keras_env,
                      keras_model_spec, keras_policies, photo_crops, rel_diff, run_worker, tiled, workdir,
                      write_cifar10)  # noqa: E402

CONFIG = ROOT / "configs" / "cifar10.yaml"
SAMPLE_ROWS = 2  # images compared between ours and Keras
GPU_MODELS = ["InceptionV3", "ResNet50", "Xception", "VGG16"]


# ----------------------------------------------------------------------------- ours (worker)
def ours_extract(spec: Dict[str, Any]) -> Dict[str, Any]:
    from _ours import BatchProfiler, common_overrides, env_info, run_cli

    args = ["fit", "--config", spec["config"], *common_overrides(spec["run_dir"]),
            "--model.backbone", spec["model"], "--model.weights", spec["h5"],
            "--data.init_args.root", spec["data"], "--data.init_args.image_size", spec["size"],
            "--features.cache_dir", spec["cache"], "--features.rebuild", "true",
            "--trainer.max_epochs", 0, "--test_after_fit", "false"]
    if spec.get("resize_on"):
        args += ["--data.init_args.resize_on", spec["resize_on"]]
    if spec.get("batch_override"):
        args += ["--data.init_args.batch_size", spec["batch"], "--features.extract_batch_size", spec["batch"]]
    profiler = BatchProfiler(spec["profile_batches"]) if spec.get("profile_batches") else None
    hook = (lambda c: c.trainer.callbacks.append(profiler)) if profiler is not None else None
    cli, timer = run_cli(args, before_fit_hook=hook)
    runs = sorted({b[0] for b in timer.batches["predict"]})
    if not runs:
        raise RuntimeError("the predict loop ran no batch: was the cache reused despite features.rebuild?")
    steady = timer.window("predict", run=0, skip=spec["warmup_batches"])
    fit_setup = timer.first("setup:fit")
    first_start = timer.first("start:predict")
    first_end = timer.batches["predict"][0][4]
    images = sum(b[2] for b in timer.batches["predict"])
    out = {"env": env_info(cli.trainer), "images": images, "splits": len(runs),
           "batch": max(b[2] for b in timer.batches["predict"]),
           "wall_s": fit_setup - timer.first("before_fit"), "img_s": steady["img_s"],
           "model_img_s": steady["images"] / steady["step_s"] if steady["step_s"] else float("nan"),
           "model_pct": 100 * steady["step_s"] / steady["window_s"], "steady_images": steady["images"],
           "first_batch_s": first_end - first_start, "precision": str(cli.trainer.precision)}
    if cli.model.inference_options.enabled:  # the features' precision is the engine's ("engine-bf16" / "-fp32")
        out["precision"] = cli.model.engine.describe(cli.trainer.strategy.root_device)
    if steady["batches"]:  # the host's side of the same window, per batch
        out["host_step_ms"] = 1e3 * steady["host_step_s"] / steady["batches"]
        out["host_other_ms"] = 1e3 * steady["host_other_s"] / steady["batches"]
        out["device_step_ms"] = 1e3 * steady["step_s"] / steady["batches"]
    out["device"] = "cuda" if out["env"].get("accelerator") == "cuda" else "cpu"
    if profiler is not None:  # the val split's batches (the timed window is the train split's)
        out["profile"] = profiler.summary
    if cli.model.inference_options.enabled:  # what the engine made of the model (e.g. "BatchNorm folded 0/N")
        out["engine_status"] = cli.model.engine.status
    # the image DataModule the features came from, and the train split's first rows (sanity guard)
    fdm = cli.datamodule
    source = getattr(fdm, "source", None)
    try:
        ids = np.asarray(source.dataset("train").ids[:SAMPLE_ROWS])
        out["sample_ids"] = ids.tolist()
        out["sample_features"] = np.asarray(fdm.sets["train"].features[:SAMPLE_ROWS], np.float64).tolist()
    except (AttributeError, KeyError, TypeError) as err:
        out["sample_note"] = f"no sanity guard: the feature DataModule changed shape ({err})"
    out["resize_on"] = "device" if source is not None and source.resizes_on_device(source.dataset("train")) \
        else "workers"
    out["num_workers"] = source.loader_workers(source.dataset("train")) if source is not None else None
    if spec["loader_batches"] and source is not None:
        device = cli.trainer.strategy.root_device
        fmt = cli.model.engine.input_memory_format() if cli.model.inference_options.enabled else None  # the batches'
        out["loader_img_s"] = _input_pipeline_rate(source, device, spec["loader_batches"], fmt)
        out.update(_input_pipeline_stages(source, device, spec["loader_batches"], fmt))
    out.update(_compute_limit(spec["model"], int(spec["size"]), cli.trainer.strategy.root_device, out))
    return out


def _compute_limit(model: str, size: int, device: Any, out: Dict[str, Any]) -> Dict[str, Any]:
    """The backbone's arithmetic at the machine's best matrix-product rate, in the run's precision (see
    ``_limits``), measured in the same process after the run, and how close ours came to it."""
    import torch
    from _limits import gemm_flop_s, model_flops

    dtype = torch.bfloat16 if "bf16" in out["precision"] else torch.float32
    flops, rate = model_flops(model, size), gemm_flop_s(device, dtype)
    limit = rate / flops
    return {"model_gflop": flops / 1e9, "gemm_gflop_s": rate / 1e9, "limit_img_s": limit,
            "pct_of_limit": 100 * out["img_s"] / limit, "model_pct_of_limit": 100 * out["model_img_s"] / limit}


def _input_pipeline_rate(source: Any, device: Any, batches: int, memory_format: Any = None) -> float:
    """Images/s of the input pipeline alone (no model): the train split's predict loader as the product builds it
    (workers, pinned memory), the transfer to ``device`` and the DataModule's device-side preparation (resize where
    it runs there, uint8 -> float, into ``memory_format``), timed from the loader's start (batches the workers
    prefetch while the first one is awaited would otherwise look free) over up to ``batches`` batches, device work
    included."""
    from _timing import now, sync

    source.predict_split = "train"
    t, n = now(), 0
    for i, batch in enumerate(source.predict_dataloader()):
        batch = [b.to(device, non_blocking=True) for b in batch]
        source.prepare_batch(batch, memory_format=memory_format)
        n += len(batch[1])
        if i + 1 >= batches:
            break
    sync()
    return n / (now() - t) if n else float("nan")


def _input_pipeline_stages(source: Any, device: Any, batches: int, memory_format: Any = None) -> Dict[str, float]:
    """Where the input pipeline's time goes, milliseconds per batch (mean over up to ``batches`` batches after the
    first), each stage waited for before the next starts: ``fetch_ms`` the loader as built without pinned memory
    (a second pass), ``pin_ms`` what pinning adds (the loader as built, minus ``fetch_ms``), ``transfer_ms`` the
    copy to ``device``, ``prepare_ms`` the DataModule's device-side preparation (resize, uint8 -> float) into
    ``memory_format`` (what the module asks for: the inference engine's)."""
    from _timing import now, sync

    source.predict_split = "train"
    times: Dict[str, List[float]] = {"fetch": [], "loaded": [], "transfer": [], "prepare": []}
    pin = source.pin_memory
    try:
        source.pin_memory = False
        it = iter(source.predict_dataloader())
        for i in range(batches + 1):
            t = now()
            if next(it, None) is None:
                break
            if i:
                times["fetch"].append(now() - t)
    finally:
        source.pin_memory = pin
    it = iter(source.predict_dataloader())
    for i in range(batches + 1):
        t0 = now()
        batch = next(it, None)
        if batch is None:
            break
        t1 = now()
        batch = [b.to(device, non_blocking=True) for b in batch]
        sync()
        t2 = now()
        source.prepare_batch(batch, memory_format=memory_format)
        sync()
        t3 = now()
        if i:
            for key, dt in (("loaded", t1 - t0), ("transfer", t2 - t1), ("prepare", t3 - t2)):
                times[key].append(dt)
    ms = {k: 1e3 * sum(v) / len(v) if v else float("nan") for k, v in times.items()}
    return {"fetch_ms": ms["fetch"], "pin_ms": ms["loaded"] - ms["fetch"], "transfer_ms": ms["transfer"],
            "prepare_ms": ms["prepare"]}


def _run_ours(args: Any, common: Dict[str, Any], work: Path, h5_arg: str, resize_on: Any) -> Dict[str, Any]:
    """One run of ours (``resize_on``: the DataModule's, ``None`` = the config's)."""
    here = Path(__file__).resolve()
    return run_worker(here, dict(common, job="ours", runner=OURS, h5=h5_arg, config=str(args.config),
                                 cache=str(work / "cache"), run_dir=str(work / "runs"), resize_on=resize_on,
                                 batch_override=args.batch is not None, warmup_batches=args.warmup_batches,
                                 loader_batches=args.loader_batches, profile_batches=args.profile_batches),
                      work / "logs", None, args.timeout)


def _add_ours(res: Any, r: Dict[str, Any], keras_features: Dict[str, Path], backends: Any, policies: List[str],
              model: str, entry: Any) -> None:
    """Ours's (best) row with its sanity guard and its ratios to the Keras rows already in ``res``."""
    if "sample_ids" in r:
        for runner, path in keras_features.items():
            ref = np.load(path, mmap_mode="r")[r["sample_ids"]]
            r[f"rel_diff_{runner}"] = rel_diff(r["sample_features"], ref)
            if r[f"rel_diff_{runner}"] > 5e-2:
                res.note(f"{model}: ours and {runner} features differ by {r[f'rel_diff_{runner}']:.1e} "
                         "(max rel.) on the same images and weights: check before trusting the timing"
                         + (f" (ours' inference engine: {r['engine_status']})" if r.get("engine_status") else ""))
        r.pop("sample_features")
    for runner in KERAS_RUNNERS.values():  # the most any implementation of the same arithmetic gains over Keras
        ref = res.find(runner, model=model)
        if r.get("limit_img_s") and ref and ref.get("img_s"):
            r[f"limit_over_{runner}"] = r["limit_img_s"] / ref["img_s"]
        if ref and ref.get("batches_img_s"):  # against Keras's batches alone (its best case)
            if r.get("img_s"):
                r[f"over_{runner}_batches"] = r["img_s"] / ref["batches_img_s"]
            if r.get("limit_img_s"):
                r[f"limit_over_{runner}_batches"] = r["limit_img_s"] / ref["batches_img_s"]
    res.add(dict(r, model=model, size=entry.input_size, runner=OURS))
    prof = r.get("profile")
    if prof and "error" in prof:
        res.note(f"{model}: ours' profile failed ({prof['error']})")
    elif prof:  # where a profiled val batch's time went (the JSON row has the top operations)
        host, device = (", ".join(f"{o['op']} {o['self_ms_per_batch']:.2f}" for o in prof[k][:4]) or "-"
                        for k in ("host_ops", "device_ops"))
        print(f"profile: {model}, ours, {prof['batches']} val batches: {prof['wall_ms_per_batch']:.2f} ms per batch, "
              f"host ops {prof['host_ms_per_batch']:.2f} ms ({host}), device {prof['device_ms_per_batch']:.2f} ms "
              f"({device})", flush=True)
    if backends:
        check_precision(res, model, r.get("precision"), policies)


# ----------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="zoo models (default: 4 on GPU, 2 on CPU)")
    p.add_argument("--n-images", type=int, default=None, help="CIFAR-format training images (train + val splits)")
    p.add_argument("--batch", type=int, default=None, help="batch size for both (default: the config's)")
    p.add_argument("--warmup-batches", type=int, default=2, help="batches left out of the steady-state rate")
    p.add_argument("--loader-batches", type=int, default=16, help="batches of the loader-alone probe (0: skip)")
    p.add_argument("--profile-batches", type=int, default=0,
                   help="ours: torch.profiler over up to this many batches of the val split (after its first; the "
                        "timed window is the train split's, but wall_s includes them): per batch, the operations "
                        "with the most host and device time, in the row's 'profile' (0: no profile)")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every runner this many times per model, alternating; each reports its fastest round "
                        "(best of N, as timeit does: on a shared or virtual machine the slow spells are noise)")
    p.add_argument("--resize-on", nargs="+", default=[None], choices=["auto", "workers", "device"],
                   help="ours with these data.resize_on values, one row each (default: the config's)")
    add_common_args(p)
    args = p.parse_args()
    exit_on_sigterm()

    from lightning_app.zoo import get_entry

    device = "cuda" if cuda_available() else "cpu"
    models = args.models or (GPU_MODELS if device == "cuda" else ["InceptionV3", "ResNet50"])
    n = args.n_images or (4096 if device == "cuda" else 448)
    batch = args.batch or config_value(args.config, "features", "extract_batch_size") or \
        config_value(args.config, "data", "init_args", "batch_size", default=32)
    policies = keras_policies(args.keras_policy, device, engine_runs_bf16(args.config, device))
    config = dict(vars(args), models=models, n_images=n, batch=batch, device=device, keras_policy=policies)
    res = Results("extract", args.json, config)
    backends = keras_backends(args.keras, res)
    work, tmp = workdir(args.workdir, "extract")
    print(f"work dir {work}; {device}; models {models}; {n} images; batch {batch}; "
          f"Keras {backends} ({' / '.join(policies)})", flush=True)

    pool = photo_crops(min(n, 1024), 32, seed=0)
    labels = np.arange(n) % 10
    write_cifar10(work / "data", tiled(pool, n), labels, pool[:10], np.arange(10))
    try:
        for model in models:
            entry = get_entry(model)
            h5 = work / f"{model}_notop.h5"
            h5.unlink(missing_ok=True)
            common = dict(keras_model_spec(entry), model=model, h5=str(h5), data=str(work / "data"), batch=batch)
            keras_features: Dict[str, Path] = {}
            keras_rounds: Dict[str, List[Dict[str, Any]]] = {}
            ours_rounds: Dict[Any, List[Dict[str, Any]]] = {}
            for round_ in range(args.rounds):  # runners alternate: a slow spell of the machine hits each alike
                for i, backend in enumerate(backends):
                    runner = KERAS_RUNNERS[backend]
                    for j, policy in enumerate(policies):  # Keras keeps its faster policy (best_round below)
                        feats = work / f"{model}_{backend}_{policy}_features.npy"
                        r = run_worker(ROOT / "benchmarks" / "_keras.py",
                                       dict(common, job="extract", runner=runner,
                                            save_h5=i == 0 and j == 0 and round_ == 0, features=str(feats),
                                            policy=policy, tf_jit=args.tf_jit),
                                       work / "logs", keras_env(backend), args.timeout)
                        if "error" not in r and (j == 0 or runner not in keras_features):
                            keras_features[runner] = feats  # the sanity guard's: the first policy's (float32)
                        keras_rounds.setdefault(runner, []).append(dict(r, model=model, size=entry.input_size,
                                                                        runner=runner, policy=policy))
                if not h5.is_file():  # no Keras run saved weights: ours runs on its own random init
                    h5_arg = "null"
                    if round_ == 0:
                        res.note(f"{model}: no Keras weights file, ours ran with random init (no sanity guard)")
                else:
                    h5_arg = str(h5)
                for resize_on in args.resize_on:
                    ours_rounds.setdefault(resize_on, []).append(_run_ours(args, common, work, h5_arg, resize_on))
            for rows in keras_rounds.values():  # Keras at its best round and policy: its batches alone
                best = best_round(rows, "batches_img_s", higher_is_better=True)
                if len(policies) > 1:  # each policy's best, beside the one kept
                    best["policy_batches_img_s"] = {
                        p: max((r["batches_img_s"] for r in rows if r.get("policy") == p and "error" not in r
                                and r.get("batches_img_s") is not None), default=None) for p in policies}
                res.add(best)
            for rows in ours_rounds.values():
                _add_ours(res, best_round(rows, "img_s", higher_is_better=True), keras_features, backends,
                          policies, model, entry)
    finally:
        ref = "keras-jax" if "jax" in backends else "keras-tensorflow"
        res.print_table(
            f"Feature extraction, {n} CIFAR-format images upsampled to the native size, batch {batch}, {device}",
            keys=["model", "size"], metric="img_s", unit="img/s", higher_is_better=True,
            extra=[("ours wall s", OURS, "wall_s", ".1f"), ("Keras-JAX wall s", "keras-jax", "wall_s", ".1f"),
                   ("Keras-TF wall s", "keras-tensorflow", "wall_s", ".1f"),
                   ("ours model-only img/s", OURS, "model_img_s", ".1f"), ("ours model %", OURS, "model_pct", ".0f"),
                   ("input pipeline alone img/s", OURS, "loader_img_s", ".1f"),
                   ("fetch ms/batch", OURS, "fetch_ms", ".2f"), ("pin ms/batch", OURS, "pin_ms", ".2f"),
                   ("transfer ms/batch", OURS, "transfer_ms", ".2f"), ("prepare ms/batch", OURS, "prepare_ms", ".2f"),
                   ("device step ms", OURS, "device_step_ms", ".2f"), ("host step ms", OURS, "host_step_ms", ".2f"),
                   ("host between steps ms", OURS, "host_other_ms", ".2f"),
                   ("ours precision", OURS, "precision", ""), ("Keras-JAX policy", "keras-jax", "policy", ""),
                   ("Keras-TF policy", "keras-tensorflow", "policy", ""),
                   ("resize on", OURS, "resize_on", ""), ("workers", OURS, "num_workers", ".0f"),
                   ("rel diff", OURS, f"rel_diff_{ref}", ".1e"),
                   ("GFLOP/img", OURS, "model_gflop", ".2f"), ("GEMM GFLOP/s", OURS, "gemm_gflop_s", ".0f"),
                   ("limit img/s", OURS, "limit_img_s", ".1f"), ("ours % of limit", OURS, "pct_of_limit", ".0f"),
                   ("limit vs Keras-JAX", OURS, "limit_over_keras-jax", ".2f"),
                   ("limit vs Keras-TF", OURS, "limit_over_keras-tensorflow", ".2f"),
                   ("Keras-JAX outside batches s", "keras-jax", "outside_batches_s", ".2f"),
                   ("Keras-TF outside batches s", "keras-tensorflow", "outside_batches_s", ".2f"),
                   ("ours vs Keras-JAX batches only", OURS, "over_keras-jax_batches", ".2f"),
                   ("ours vs Keras-TF batches only", OURS, "over_keras-tensorflow_batches", ".2f"),
                   ("limit vs Keras-JAX batches only", OURS, "limit_over_keras-jax_batches", ".2f"),
                   ("limit vs Keras-TF batches only", OURS, "limit_over_keras-tensorflow_batches", ".2f")])
        if len(args.resize_on) > 1:  # ours once per resize_on value (the table above shows the first)
            res.print_table(f"Ours by resize_on, {n} images, batch {batch}, {device}", keys=["model", "size", "resize_on"],
                            metric="img_s", unit="img/s", higher_is_better=True,
                            extra=[("ours model-only img/s", OURS, "model_img_s", ".1f"),
                                   ("ours model %", OURS, "model_pct", ".0f"),
                                   ("input pipeline alone img/s", OURS, "loader_img_s", ".1f"),
                                   ("workers", OURS, "num_workers", ".0f"), ("wall s", OURS, "wall_s", ".1f")])
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    from _harness import use_checkout, worker_main

    use_checkout()
    if not worker_main({"ours": ours_extract}, sys.argv[1:]):
        main()
