"""ImageNet top-1 / top-5 of a zoo model on the user's validation folder, beside the published Keras figure.

``python -m converters evaluate --model NAME --data DIR``. The folder holds one subfolder per class
(``DIR/<class>/<image>``, the usual layout of the ILSVRC2012 validation set after ``valprep.sh``);
a subset of the classes is fine. Class folders are named by

* WordNet id (``n01440764``), mapped to the model's output index through Keras's
  ``imagenet_class_index.json`` (``{"0": ["n01440764", "tench"], ...}``): ``--class-index FILE``,
  else Keras's cached copy (``~/.keras/models/imagenet_class_index.json``, written by
  ``keras.applications.imagenet_utils.decode_predictions``); nothing is downloaded. Without either,
  exactly the 1000 ILSVRC2012 synsets are mapped in sorted order (that is Keras's class order);
* or output index (``0`` ... ``999``).

Each image is decoded as Keras decodes it (``lightning_app.data.images.load_rgb``), its shorter
side resized to ``floor(size / crop_pct)`` (bilinear, antialiased), centre-cropped to ``size``,
then normalised with the model's Keras preprocessing (``Normalize``). The published figures are the
keras-applications README's (TF backend, single centre crop; its crop ratio is not stated).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lightning_app.data.folders import find_classes, index_class_folders
from lightning_app.data.images import ImageDecodeError, load_rgb, scan_images
from lightning_app.errors import ConfigError, DatasetFileError, DatasetLayoutError
from lightning_app.zoo.factory import WeightsArg, create_backbone
from lightning_app.zoo.normalize import Normalize
from lightning_app.zoo.registry import ZooEntry, get_entry

CLASS_INDEX_URL = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"
CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"
NUM_CLASSES = 1000
DEFAULT_CROP_PCT = 0.875
_WNID = re.compile(r"n\d{8}")

__all__ = ["EvalResult", "class_indices", "evaluate", "keras_cached_class_index", "load_class_index"]


@dataclass(frozen=True)
class EvalResult:
    model: str
    images: int
    classes: int
    size: int
    crop_pct: float
    top1: float  # percent
    top5: float  # percent
    skipped: int = 0  # unreadable files left out (named in a warning)
    mapping: str = ""  # how folder names became class indices


def keras_cached_class_index() -> Path:
    """Where Keras caches ``imagenet_class_index.json`` (``$KERAS_HOME`` or ``~/.keras``, then ``models/``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models" / "imagenet_class_index.json"


def load_class_index(path: Union[str, os.PathLike]) -> Dict[str, int]:
    """WordNet id -> output index from a file in Keras's ``imagenet_class_index.json`` layout."""
    path = Path(path)
    fix = (f"pass Keras's file ({CLASS_INDEX_URL}, md5 {CLASS_INDEX_MD5}) or one in its layout, "
           '{"0": ["n01440764", "tench"], ...}')
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetFileError(f"class-index file {str(path)!r} does not exist: {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetFileError(f"class-index file {str(path)!r} is not readable JSON ({err}): {fix}") from None
    out: Dict[str, int] = {}
    try:
        for key, value in raw.items():
            index, wnid = int(key), value[0]
            if not (0 <= index < NUM_CLASSES and isinstance(wnid, str)) or wnid in out:
                raise ValueError(f"entry {key!r}: {value!r}")
            out[wnid] = index
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as err:
        raise DatasetFileError(f"class-index file {str(path)!r} is not in Keras's layout ({err}): {fix}") from None
    if not out:
        raise DatasetFileError(f"class-index file {str(path)!r} is empty: {fix}")
    return out


def class_indices(folders: Sequence[str], class_index: Optional[Union[str, os.PathLike]] = None,
                  data: Union[str, os.PathLike] = "") -> Tuple[List[int], str]:
    """Output index of each class folder name, and a line saying how they were mapped."""
    where = f" in {str(data)!r}" if data else ""
    if class_index is None and all(f.isdigit() for f in folders):
        bad = [f for f in folders if int(f) >= NUM_CLASSES]
        if bad:
            raise DatasetLayoutError(f"class folder(s) {bad[:5]}{where} are not ImageNet class indices (0 to "
                                     f"{NUM_CLASSES - 1}): name the folders by index or by WordNet id")
        return [int(f) for f in folders], "folder names are class indices"
    if class_index is None and keras_cached_class_index().is_file():
        class_index = keras_cached_class_index()
    if class_index is not None:
        table = load_class_index(class_index)
        unknown = [f for f in folders if f not in table]
        if unknown:
            raise DatasetLayoutError(
                f"{len(unknown)} class folder(s){where} are not in the class index {str(class_index)!r}: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}. Name the class folders by WordNet id "
                "(n01440764, ...) as in that file, or by class index (0 to 999) without --class-index")
        return [table[f] for f in folders], f"WordNet ids through {class_index}"
    if len(folders) == NUM_CLASSES and all(_WNID.fullmatch(f) for f in folders):
        return list(range(NUM_CLASSES)), "1000 WordNet ids in sorted order (Keras's class order)"
    raise DatasetLayoutError(
        f"cannot tell which ImageNet class each of the {len(folders)} class folders{where} is "
        f"(e.g. {list(folders[:3])}): pass --class-index imagenet_class_index.json (Keras's file, "
        f"{CLASS_INDEX_URL}, md5 {CLASS_INDEX_MD5}; folders named by WordNet id such as n01440764), or name the "
        f"folders by class index (0 to 999). Without a class index only all 1000 WordNet-id folders can be mapped")


def center_crop_transform(image: torch.Tensor, size: int, crop_pct: float) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> ``(3, size, size)`` uint8: shorter side to ``floor(size / crop_pct)``, centre crop."""
    short = math.floor(size / crop_pct)
    if min(image.shape[-2:]) != short:
        image = TF.resize(image, short, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(image, [size, size])


class _CropDataset(Dataset):
    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int, crop_pct: float) -> None:
        self.paths, self.labels, self.size, self.crop_pct = list(paths), list(labels), size, crop_pct

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        try:
            array = load_rgb(self.paths[i])
        except ImageDecodeError as err:
            raise DatasetFileError(f"{err}: remove or replace the file and run again") from None
        image = torch.tensor(array).permute(2, 0, 1).contiguous()  # a copy: the decoded array is read-only
        return center_crop_transform(image, self.size, self.crop_pct), self.labels[i]


def evaluate(
    model: str,
    data: Union[str, os.PathLike],
    class_index: Optional[Union[str, os.PathLike]] = None,
    weights: WeightsArg = "imagenet",
    size: Optional[int] = None,
    crop_pct: float = DEFAULT_CROP_PCT,
    batch_size: int = 64,
    workers: int = 4,
    device: Optional[str] = None,
) -> EvalResult:
    """Top-1 / top-5 (%) of the zoo model ``model`` (Keras ImageNet weights by default) on ``data``."""
    entry: ZooEntry = get_entry(model)
    size = size or entry.input_size
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    if size < 32 or batch_size < 1 or workers < 0:
        raise ConfigError(f"need --size >= 32, --batch-size >= 1 and --workers >= 0 "
                          f"(got {size}, {batch_size}, {workers})")
    folders = find_classes(data)
    indices, mapping = class_indices(folders, class_index, data)
    paths, positions = index_class_folders(data, folders)
    good, bad = scan_images(paths, verify="header")
    if not good:
        raise DatasetLayoutError(f"no readable images in {str(data)!r} ({len(bad)} unreadable file(s))")
    labels = [indices[positions[i]] for i in good]
    loader = DataLoader(_CropDataset([paths[i] for i in good], labels, size, crop_pct), batch_size=batch_size,
                        num_workers=workers, pin_memory=False)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = nn.Sequential(Normalize(entry.mean, entry.std), create_backbone(entry.keras_name, weights=weights))
    net = net.to(dev).eval()
    top1 = top5 = 0
    with torch.inference_mode():
        for images, target in loader:
            logits = net(images.to(dev, non_blocking=True).float().div_(255))
            best = logits.topk(5, dim=1).indices.cpu()
            hit = best == target.view(-1, 1)
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(dim=1).sum())
    n = len(labels)
    return EvalResult(entry.keras_name, n, len(folders), size, crop_pct, 100.0 * top1 / n, 100.0 * top5 / n,
                      skipped=len(bad), mapping=mapping)


def format_result(result: EvalResult) -> str:
    """The ported model's figures beside the published Keras ones (keras-applications README)."""
    entry = get_entry(result.model)
    short = math.floor(result.size / result.crop_pct)
    skipped = f", {result.skipped} unreadable file(s) skipped" if result.skipped else ""
    lines = [f"{result.model} on {result.images:,} images in {result.classes} classes{skipped} "
             f"({result.mapping}; shorter side {short}, centre crop {result.size})",
             f"{'':<24}{'top-1':>8}{'top-5':>8}",
             f"{'ours (ported weights)':<24}{result.top1:>8.3f}{result.top5:>8.3f}"]
    fig = lambda v: f"{v:>8.3f}" if v is not None else f"{'-':>8}"  # noqa: E731
    published_size = entry.published_size or entry.input_size
    note = "keras-applications README, TF backend, 50,000 images"
    if published_size != result.size:
        note += f"; measured at {published_size} px (--size {published_size} to compare)"
    if entry.top1 is None and entry.top5 is None:
        lines.append(f"{'Keras (published)':<24}{'not published':>16}")
    else:
        lines.append(f"{'Keras (published)':<24}{fig(entry.top1)}{fig(entry.top5)}  ({note})")
    return "\n".join(lines)
