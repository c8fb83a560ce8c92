"""Feature extraction through the product's own path (``extract_features``: the Trainer's predict loop, the feature
writer, the cache) with the inference engine off (``model.inference.enabled: false``: plain eager float32, NCHW)
and on (BatchNorm folded, channels_last, bf16 where native, torch.compile), each run twice on the same module (the
second run is warm: compiled, cached graphs), in one process, interleaved. The engine's variants can be named
(``--variants``). benchmarks/extract.py times the same path through the CLI against Keras.

Prints one row per (model, variant): warm images/s (whole predict loop: loading, resize, backbone, writer) and
the first run's seconds (compilation included).

Usage:
  python benchmarks/engine_paths.py --models ResNet50 --batch 16 --n-images 160          # CPU (2 cores)
  python benchmarks/engine_paths.py --models ResNet50 InceptionV3 --batch 64 --n-images 4096   # GPU
Variants: before (engine off), engine (shipped defaults: compile "auto" compiles on CUDA, and on a CPU only for
runs estimated above 5 minutes), engine-eager (never compiled), engine-compiled (always compiled),
engine-nocudagraphs (compile mode None), engine-fp32.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from lightning_app.data import ArrayDataModule
from lightning_app.data.features import extract_features
from lightning_app.engine import InferenceOptions
from lightning_app.module import TransferModule
from lightning_app.zoo import get_entry

VARIANTS = {
    "before": InferenceOptions(enabled=False),
    "engine": InferenceOptions(),
    "engine-eager": InferenceOptions(compile=False),
    "engine-compiled": InferenceOptions(compile=True),
    "engine-nocudagraphs": InferenceOptions(mode=None),
    "engine-fp32": InferenceOptions(precision="fp32"),
}


def run(model: TransferModule, dm: ArrayDataModule, args: argparse.Namespace, cache: Path) -> float:
    """One extraction of the train split (cache rebuilt), as ``fit`` with ``stage: extract`` runs it; seconds."""
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=cache)
    start = time.perf_counter()
    extract_features(trainer, model, dm, "train", cache_dir=cache, rebuild=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ResNet50"])
    p.add_argument("--variants", nargs="+", default=["before", "engine"], choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-images", type=int, default=160)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--accelerator", default="auto")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    device = "cuda" if torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda") else "cpu"
    print(f"torch {torch.__version__}, {device}"
          f"{' ' + torch.cuda.get_device_name() if device == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"batch {args.batch}, {args.n_images} images (32x32 uint8 upsampled to the native size)", flush=True)
    print("| model | variant | warm img/s | first run s | engine |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.n_images, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(args.n_images) % 10
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            size = get_entry(name).input_size
            for variant in args.variants:
                options = VARIANTS[variant]
                pl.seed_everything(0, verbose=False)
                model = TransferModule(name, 10, weights=None, stage="extract", inference=options)
                dm = ArrayDataModule(images, labels, [str(i) for i in range(10)], image_size=size,
                                     batch_size=args.batch, num_workers=args.workers, val_split=0.0, test_split=0.0)
                first = run(model, dm, args, Path(tmp))
                warm = run(model, dm, args, Path(tmp))
                status = model.engine.status if options.enabled else "off"
                print(f"| {name} | {variant} | {args.n_images / warm:.2f} | {first:.1f} | {status} |", flush=True)
                del model, dm


if __name__ == "__main__":
    main()
