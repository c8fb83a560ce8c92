"""Peak memory of feature extraction against the number of images: the cache must stream to disk.

Each size runs in a fresh process: ``N`` random 8x8 RGB images (a memory-mapped file, like a dataset on disk)
resized to 32 px, a backbone with wide pooled features (``tf_mobilenetv3_small_100``: 1,024 floats = 4 KiB per
image), ``extract_features`` (the product's path: Lightning's predict loop, per-rank shard files, merge into the
memory-mapped cache), then one pass over the cached features as the head-training loader serves them. Reported:

* peak anonymous RSS (``RssAnon`` of ``/proc/self/status``, sampled every 10 ms) per phase: memory the process
  owns; features held in memory would add ``N x 4 KiB`` there. Phases: ``extract`` (predict loop, shards, merge,
  opening the cache), ``serve memmap`` (one epoch of the head-training loader with ``features.in_memory: false``:
  rows read from the memory map chunk by chunk), ``serve auto`` (the default ``in_memory: null``: the split is
  copied to the training device when it takes at most half of its free memory, by design);
* peak RSS (``VmHWM``): also counts pages of memory-mapped files (the dataset, the cache) that are resident;
* ``--control``: the extraction through ``trainer.predict`` with Lightning's default ``return_predictions=True``,
  which keeps every batch's features: the measurement must see that growth.

    python benchmarks/extract_memory.py [--sizes 2000 8000 32000] [--control 2000 8000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "tf_mobilenetv3_small_100"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakAnon:
    """Samples ``RssAnon`` in a background thread; ``peak`` in MiB."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak_kib, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakAnon":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))

    @property
    def peak(self) -> float:
        return self.peak_kib / 1024


def worker(n: int, control: bool, batch_size: int, workdir: Path) -> Dict[str, float]:
    import numpy as np
    import pytorch_lightning as pl
    import torch

    sys.path.insert(0, str(ROOT))
    from lightning_app.data import ArrayDataModule
    from lightning_app.data.feature_loader import FeatureLoader
    from lightning_app.data.features import FeatureExtractor, prepare_feature_datamodule
    from lightning_app.module import TransferModule

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    images_path = workdir / f"images_{n}.npy"
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, 8, 8, 3))
    for start in range(0, n, 65536):
        images[start:start + 65536] = rng.integers(0, 256, size=(min(65536, n - start), 8, 8, 3), dtype=np.uint8)
    images.flush()
    del images
    images = np.load(images_path, mmap_mode="r")
    labels = np.arange(n) % 10
    dm = ArrayDataModule(images, labels, [str(i) for i in range(10)], image_size=32, batch_size=batch_size,
                         val_split=0.0, test_split=0.0, num_workers=0)
    model = TransferModule(BACKBONE, 10, weights=None, stage="extract")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    base_anon = _status_kib("RssAnon") / 1024
    start = time.perf_counter()
    row = {"images": n, "feature_dim": model.num_features, "anon_before_mib": base_anon}
    if control:
        dm.predict_split = "train"
        with PeakAnon() as peak:
            out = trainer.predict(FeatureExtractor(model.feature_extractor()), datamodule=dm)
        row.update(mode="control: return_predictions=True", rows=sum(len(o) for o in out), extract_mib=peak.peak)
    else:
        with PeakAnon() as peak:
            fdm = prepare_feature_datamodule(trainer, model, dm, splits=("train",), cache_dir=workdir / "cache",
                                             in_memory=False)
        row.update(mode="feature cache", rows=len(fdm.sets["train"]), extract_mib=peak.peak)
        fs = fdm.sets["train"]
        for name, resident in (("serve_memmap_mib", False), ("serve_auto_mib", None)):
            with PeakAnon() as peak:  # one epoch, as head training reads it (features.in_memory false / null)
                for _ in FeatureLoader(fs.features, fs.labels, batch_size, resident=resident):
                    pass
            row[name] = peak.peak
    row.update(seconds=time.perf_counter() - start, peak_rss_mib=_status_kib("VmHWM") / 1024)
    return row


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--control", type=int, nargs="*", default=[], metavar="N",
                   help="sizes to also run with Lightning's default return_predictions=True")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-control", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.worker_control, args.batch_size, Path(args.workdir))))
        return
    rows = []
    for control, sizes in ((False, args.sizes), (True, args.control)):
        for n in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--worker", str(n), "--workdir", tmp, "--batch-size", str(args.batch_size)]
                if control:
                    cmd.append("--worker-control")
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    raise SystemExit(out.stdout[-2000:] + out.stderr[-4000:])
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    def mib(r, key):
        return f"{r[key]:.0f}" if key in r else "-"

    print("\n| mode | images | feature bytes | anon before | peak anon: extract | serve memmap | serve auto "
          "| peak RSS | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fbytes = r["rows"] * r["feature_dim"] * 4 / 2**20
        print(f"| {r['mode']} | {r['images']:,} | {fbytes:.0f} MiB | {r['anon_before_mib']:.0f} | {mib(r, 'extract_mib')} "
              f"| {mib(r, 'serve_memmap_mib')} | {mib(r, 'serve_auto_mib')} | {r['peak_rss_mib']:.0f} "
              f"| {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
