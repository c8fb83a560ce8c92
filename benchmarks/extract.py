"""Feature-extraction throughput: our backbones against Keras, same model, same weights, same run.

The reference is what users run today: Keras 3 on TensorFlow (``pip install -e ".[bench]"``),
``model.predict`` of an ``include_top=False, pooling="avg"`` model at the native size.
Keras on the torch backend is reported too. Ours is timed plain (eager) and with each
inference optimisation added in turn, so the table shows what each buys:

  eager          model(x) under torch.no_grad, NCHW
  +inference     torch.inference_mode + channels_last memory format
  +bn-fold       torch.jit.trace + freeze (folds BatchNorm into convolutions)
  +onednn        torch.jit.optimize_for_inference (oneDNN / MKLDNN kernels on CPU)
  +compile       torch.compile (inductor) with weight freezing: BN folding and oneDNN weight prepacking
                 at compile time (skip with --no-compile; compiling takes ~30 s per model on 2 cores)

Usage: python benchmarks/extract.py [--models InceptionV3 Xception] [--batch 16] [--repeats 3] [--no-compile]
Each Keras backend runs in its own subprocess (a Keras backend is fixed per process).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import images_per_second  # noqa: E402

SEED = 0


def keras_worker(backend: str, model_name: str, size: int, mode: str, h5: Path, batch: int, repeats: int,
                 save: bool) -> dict:
    """Runs in a subprocess with KERAS_BACKEND set: time model.predict on one batch.

    It imports nothing of ours (our package imports torch, which must not share a process with TensorFlow).
    """
    import keras

    assert keras.backend.backend() == backend, keras.backend.backend()
    keras.utils.set_random_seed(SEED)
    model = getattr(keras.applications, model_name)(weights=None, include_top=False, pooling="avg",
                                                     input_shape=(size, size, 3))
    if save:  # the reference process writes the weights every runner uses
        from keras.src.legacy.saving import legacy_h5_format
        import h5py

        with h5py.File(h5, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
    else:
        model.load_weights(h5)
    x = np.random.default_rng(SEED).random((batch, size, size, 3), dtype=np.float32) * 255
    x = keras.applications.imagenet_utils.preprocess_input(x, mode=mode)
    ips = images_per_second(lambda: model.predict(x, batch_size=batch, verbose=0), batch, repeats)
    features = model.predict(x[:2], batch_size=2, verbose=0)
    return {"images_per_s": ips, "features": np.asarray(features).tolist()}


def run_keras(backend: str, entry, h5: Path, args, save: bool) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, __file__, "--worker", backend, "--models", entry.keras_name, "--h5", str(h5),
           "--size", str(entry.input_size), "--mode", entry.mode,
           "--batch", str(args.batch), "--repeats", str(args.repeats)] + (["--save"] if save else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"Keras ({backend}) worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def our_variants(model, example, use_compile: bool):
    """(name, callable) for each cumulative optimisation of our backbone."""
    import torch

    model = model.eval()
    x = example

    def eager():
        with torch.no_grad():
            return model(x)

    cl_model = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def inference():
        with torch.inference_mode():
            return cl_model(x_cl)

    variants = [("eager", eager), ("+inference", inference)]
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(cl_model, x_cl))
    variants.append(("+bn-fold", lambda: frozen(x_cl)))
    with torch.no_grad():
        onednn = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(cl_model, x_cl)))
    variants.append(("+onednn", lambda: onednn(x_cl)))
    if use_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold weights: BN folding, oneDNN weight prepacking
        compiled = torch.compile(cl_model)

        def compiled_step():
            with torch.inference_mode():
                return compiled(x_cl)

        variants.append(("+compile", compiled_step))
    return variants


def bench_model(model_name: str, args) -> dict:
    import torch

    from converters.convert import convert, save_converted
    from lightning_app.zoo import create_backbone, get_entry

    entry = get_entry(model_name)
    with tempfile.TemporaryDirectory() as tmp:
        h5 = Path(tmp) / f"{model_name}_notop.h5"
        keras_tf = run_keras("tensorflow", entry, h5, args, save=True)
        keras_torch = run_keras("torch", entry, h5, args, save=False)
        weights = save_converted(convert(model_name, h5), Path(tmp) / "ours.safetensors")
        model = create_backbone(model_name, weights=weights, num_classes=0)
    size = entry.input_size
    rng = np.random.default_rng(SEED)
    images = torch.from_numpy(rng.random((args.batch, size, size, 3), dtype=np.float32)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(entry.mean).view(1, 3, 1, 1), torch.tensor(entry.std).view(1, 3, 1, 1)
    x = ((images - mean) / std).contiguous()
    row = {"model": model_name, "keras_tf": keras_tf["images_per_s"], "keras_torch": keras_torch["images_per_s"]}
    reference = np.asarray(keras_tf["features"])
    for name, step in our_variants(model, x, args.compile):
        row[name] = images_per_second(step, args.batch, args.repeats)
        ours = step()[:2].float().numpy()
        row[f"diff {name}"] = float(np.abs(ours - reference).max() / np.abs(reference).max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--h5", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = keras_worker(args.worker, args.models[0], args.size, args.mode, args.h5, args.batch, args.repeats,
                              args.save)
        print(json.dumps(result))
        return

    import torch

    from lightning_app.zoo import list_models

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, native sizes, CPU",
          flush=True)
    header = None
    for name in args.models or list_models():
        r = bench_model(name, args)  # one row at a time: a long run still leaves its finished rows
        ours_cols = [c for c in r if c.startswith(("eager", "+"))]
        if header is None:
            header = ("| model | Keras-TF img/s | Keras-torch img/s | " + " | ".join(f"ours {c}" for c in ours_cols)
                      + " | best / Keras-TF | max rel. diff vs Keras-TF |")
            print(header)
            print("|" + "---|" * (header.count("|") - 1))
        best = max(r[c] for c in ours_cols)
        cells = " | ".join(f"{r[c]:.2f}" for c in ours_cols)
        diff = max(r[f"diff {c}"] for c in ours_cols)
        print(f"| {r['model']} | {r['keras_tf']:.2f} | {r['keras_torch']:.2f} | {cells} | "
              f"{best / r['keras_tf']:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
