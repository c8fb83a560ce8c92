"""Helpers for the data tests: tiny image folders, bad files, CIFAR-10 / Food-101 layouts (no tests here)."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image


def solid(color: Sequence[int], size: Tuple[int, int] = (32, 32)) -> Image.Image:
    """An RGB image of one colour; ``size`` is (width, height) as in PIL."""
    return Image.new("RGB", size, tuple(int(c) for c in color))


def noise_image(seed: int, size: Tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_folder(root: Path, counts: Dict[str, int], size: Tuple[int, int] = (32, 32), ext: str = ".png") -> List[Path]:
    """``root/<class>/<class>_<i><ext>`` with distinct random images; returns the files."""
    files = []
    for c, (name, n) in enumerate(sorted(counts.items())):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = d / f"{name}_{i:03d}{ext}"
            noise_image(1000 * c + i, size).save(p)
            files.append(p)
    return files


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_bad_images(folder: Path) -> Dict[str, Path]:
    """One file per awkward kind; keys name the kind. Decodable kinds must become RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Path] = {}

    out["grayscale"] = folder / "gray.png"
    Image.fromarray(np.full((20, 30), 100, np.uint8), "L").save(out["grayscale"])

    out["rgba"] = folder / "rgba.png"
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: Keras drops alpha -> red
    Image.fromarray(rgba, "RGBA").save(out["rgba"])

    out["cmyk"] = folder / "cmyk.jpg"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(out["cmyk"])  # red-ish in CMYK

    out["16bit"] = folder / "sixteen.png"
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(out["16bit"])

    out["palette"] = folder / "palette.png"
    pal = Image.new("P", (30, 20), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.info["transparency"] = 0
    pal.save(out["palette"], transparency=0)

    out["zero_byte"] = folder / "empty.jpg"
    out["zero_byte"].write_bytes(b"")

    out["not_an_image"] = folder / "notes.jpg"
    out["not_an_image"].write_text("this is a text file with an image extension\n")

    out["truncated"] = folder / "truncated.jpg"
    data = jpeg_bytes(noise_image(7, (64, 64)))
    out["truncated"].write_bytes(data[: len(data) // 2])

    out["corrupt_png"] = folder / "corrupt.png"
    buf = io.BytesIO()
    noise_image(8, (32, 32)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    for k in range(60, len(raw) - 20):  # scramble the IDAT payload, keep the header readable
        raw[k] = (raw[k] * 7 + 13) % 256
    out["corrupt_png"].write_bytes(bytes(raw))
    return out


def cifar_batch(n: int, seed: int) -> Tuple[np.ndarray, List[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in np.arange(n) % 10]
    return data, labels


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 10, test: int = 10) -> Dict[str, Tuple[np.ndarray, List[int]]]:
    """A tiny ``root/cifar-10-batches-py`` in the official python pickle format; returns its content."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    content = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_batch(test if name == "test_batch" else per_batch, seed=i)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": []}, f)
        content[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return content


def tar_folder(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def write_food101(root: Path, classes: Sequence[str], n_train: int, n_test: int) -> Path:
    """A tiny ``root/food-101`` in torchvision's layout (JPEG images + meta json)."""
    base = root / "food-101"
    train: Dict[str, List[str]] = {}
    test: Dict[str, List[str]] = {}
    for c, name in enumerate(classes):
        d = base / "images" / name
        d.mkdir(parents=True, exist_ok=True)
        ids = [f"{100 + i}" for i in range(n_train + n_test)]
        for i, id_ in enumerate(ids):
            noise_image(50 * c + i, (40, 30)).save(d / f"{id_}.jpg", quality=90)
        train[name] = [f"{name}/{i}" for i in ids[:n_train]]
        test[name] = [f"{name}/{i}" for i in ids[n_train:]]
    (base / "meta").mkdir(parents=True, exist_ok=True)
    (base / "meta" / "train.json").write_text(json.dumps(train))
    (base / "meta" / "test.json").write_text(json.dumps(test))
    (base / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    return base
