"""Turn per-split file lists into one scanned :class:`FileSource` plus split ids."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lightning_app.data.images import PathLike, Verify, scan_images
from lightning_app.data.sources import FileSource
from lightning_app.data.splits import stratified_split
from lightning_app.errors import DatasetLayoutError

FileList = Tuple[Sequence[str], Sequence[int]]


def build_file_splits(
    lists: Dict[str, Optional[FileList]],
    class_names: Sequence[str],
    val_split: float,
    test_split: float,
    seed: int,
    verify: Verify,
    root: Optional[PathLike] = None,
) -> Tuple[FileSource, Dict[str, np.ndarray]]:
    """Scan the files of ``lists`` (``train`` required; ``val``/``test`` may be ``None``), drop
    unreadable ones (one warning naming them), and carve missing ``val``/``test`` out of ``train``
    with a seeded stratified split (``val_split`` / ``test_split`` fractions of ``train``).

    Raises :class:`DatasetLayoutError` when a class loses every training image to the scan.
    """
    if lists.get("train") is None:
        raise ValueError("a training file list is required")
    paths: List[str] = []
    labels: List[int] = []
    ranges: Dict[str, Tuple[int, int]] = {}
    for split in ("train", "val", "test"):
        fl = lists.get(split)
        if fl is None:
            continue
        p, y = fl
        ranges[split] = (len(paths), len(paths) + len(p))
        paths.extend(os.fspath(x) for x in p)
        labels.extend(int(v) for v in y)
    source = FileSource(paths, labels, root=root)

    good, _bad = scan_images(paths, verify)
    good_arr = np.asarray(good, dtype=np.int64)
    ids = {s: good_arr[(good_arr >= a) & (good_arr < b)] for s, (a, b) in ranges.items()}

    train_ids = ids["train"]
    a, b = ranges["train"]
    listed = set(source.labels[a:b].tolist())
    kept = set(source.labels[train_ids].tolist())
    lost = sorted(listed - kept)
    if lost:
        where = [os.path.dirname(paths[a + int(np.flatnonzero(source.labels[a:b] == c)[0])]) for c in lost]
        raise DatasetLayoutError(
            "every training image of class(es) "
            + ", ".join(f"{class_names[c]!r} (in {w!r})" for c, w in zip(lost, where))
            + " is unreadable (see the warning above): replace the files or remove the folder"
        )

    need_val = "val" not in ids
    need_test = "test" not in ids
    tr, va, te = stratified_split(
        source.labels[train_ids],
        val_split if need_val else 0.0,
        test_split if need_test else 0.0,
        seed,
    )
    out = {"train": train_ids[tr]}
    out["val"] = train_ids[va] if need_val else ids["val"]
    out["test"] = train_ids[te] if need_test else ids["test"]
    return source, out
