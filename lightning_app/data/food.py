"""Food-101 in torchvision's layout: ``root/food-101/images/<class>/<id>.jpg`` + ``meta/{train,test}.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from lightning_app.data.augment import AugmentArg
from lightning_app.data.base import BaseImageDataModule, Split
from lightning_app.data.filesets import build_file_splits
from lightning_app.data.images import Verify, check_verify_mode
from lightning_app.data.resize import ImageSize, ResizeMode, ResizeOn
from lightning_app.data.sources import SplitDataset
from lightning_app.errors import DatasetLayoutError, DatasetNotFoundError

FOOD101_URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"  # = torchvision.datasets.Food101._URL
FOOD101_ARCHIVE = "food-101.tar.gz"
FOOD101_ARCHIVE_MD5 = "85eeb15f3717b99a5da872d97d918f87"
FOOD101_FOLDER = "food-101"

#: The 101 classes, sorted as torchvision sorts them (``sorted(train.json keys)``).
FOOD101_CLASSES: List[str] = sorted("""
apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap bread_pudding
breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche cheese_plate cheesecake
chicken_curry chicken_quesadilla chicken_wings chocolate_cake chocolate_mousse churros clam_chowder
club_sandwich crab_cakes creme_brulee croque_madame cup_cakes deviled_eggs donuts dumplings edamame
eggs_benedict escargots falafel filet_mignon fish_and_chips foie_gras french_fries french_onion_soup
french_toast fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad grilled_cheese_sandwich
grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog huevos_rancheros hummus ice_cream lasagna
lobster_bisque lobster_roll_sandwich macaroni_and_cheese macarons miso_soup mussels nachos omelette onion_rings
oysters pad_thai paella pancakes panna_cotta peking_duck pho pizza pork_chop poutine prime_rib
pulled_pork_sandwich ramen ravioli red_velvet_cake risotto samosa sashimi scallops seaweed_salad
shrimp_and_grits spaghetti_bolognese spaghetti_carbonara spring_rolls steak strawberry_shortcake sushi tacos
takoyaki tiramisu tuna_tartare waffles
""".split())
assert len(FOOD101_CLASSES) == 101


def food101_missing(root: os.PathLike) -> List[str]:
    """Required Food-101 paths missing under ``root/food-101``."""
    base = Path(root) / FOOD101_FOLDER
    need = [base / "images", base / "meta" / "train.json", base / "meta" / "test.json"]
    return [str(p) for p in need if not p.exists()]


def _not_found_message(root: Path, missing: List[str], cause: str) -> str:
    return (
        f"Food-101 not found ({cause}). Put either the extracted folder {str(root / FOOD101_FOLDER)!r} "
        f"(images/<class>/<id>.jpg, meta/train.json, meta/test.json) or the archive "
        f"{str(root / FOOD101_ARCHIVE)!r} (from {FOOD101_URL}, md5 {FOOD101_ARCHIVE_MD5}) there, "
        f"or run once with download=True on a machine with internet access. Missing: {', '.join(missing)}"
    )


def ensure_food101(root: os.PathLike, download: bool = True) -> Path:
    """Use ``root/food-101``, else extract ``root/food-101.tar.gz``, else download (when ``download``)."""
    root = Path(root)
    if not food101_missing(root):
        return root / FOOD101_FOLDER
    archive = root / FOOD101_ARCHIVE
    if archive.is_file():
        from torchvision.datasets.utils import extract_archive

        extract_archive(str(archive), str(root))
    elif download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(FOOD101_URL, str(root), filename=FOOD101_ARCHIVE, md5=FOOD101_ARCHIVE_MD5)
        except Exception as err:  # URLError, timeouts, md5 mismatch
            raise DatasetNotFoundError(
                _not_found_message(root, food101_missing(root), f"download failed: {type(err).__name__}: {err}")
            ) from err
    missing = food101_missing(root)
    if missing:
        cause = "the archive did not contain the expected files" if archive.is_file() else "download=False"
        raise DatasetNotFoundError(_not_found_message(root, missing, cause))
    return root / FOOD101_FOLDER


def read_food101_split(base: os.PathLike, split: str, class_names: List[str]) -> Tuple[List[str], List[int]]:
    """(image paths, labels) listed in ``meta/<split>.json``."""
    path = Path(base) / "meta" / f"{split}.json"
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetLayoutError(f"cannot read {str(path)!r}: {err}") from err
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(meta) - set(index))
    if unknown:
        raise DatasetLayoutError(f"{str(path)!r} has classes {unknown} not in {class_names}")
    paths: List[str] = []
    labels: List[int] = []
    images = Path(base) / "images"
    for cls in sorted(meta):
        for rel in meta[cls]:
            paths.append(str(images.joinpath(*f"{rel}.jpg".split("/"))))
            labels.append(index[cls])
    return paths, labels


class Food101DataModule(BaseImageDataModule):
    """Food-101 (101 classes; 750 train + 250 test images each): a seeded stratified ``val_split`` of the
    official training list is held out for validation; the official test list is the test split.

    ``class_names`` come from ``meta/train.json`` when present (so a subset with fewer classes works),
    else the official 101 names. ``verify="none"`` by default (101k files): a file that fails to
    decode at load time is warned about and replaced by the next readable sample.

    Args:
        root: folder holding ``food-101`` (or where it is downloaded, about 5 GB).
        download: download when missing.
        Other args: :class:`BaseImageDataModule` / :class:`ImageFolderDataModule`.
    """

    def __init__(
        self,
        root: str = "data",
        image_size: ImageSize = 224,
        batch_size: int = 32,
        num_workers: Optional[int] = None,
        val_split: float = 0.1,
        seed: int = 0,
        download: bool = True,
        verify: Verify = "none",
        augment: AugmentArg = True,
        resize: ResizeMode = "squash",
        antialias: bool = False,
        predict_split: Split = "all",
        drop_last: bool = False,
        pin_memory: Optional[bool] = None,
        resize_on: ResizeOn = "auto",
    ) -> None:
        super().__init__(
            image_size=image_size, batch_size=batch_size, num_workers=num_workers, augment=augment,
            resize=resize, antialias=antialias, seed=seed, predict_split=predict_split,
            drop_last=drop_last, pin_memory=pin_memory, resize_on=resize_on,
        )
        check_verify_mode(verify)
        self.root = Path(os.path.expanduser(root))
        self.base = self.root / FOOD101_FOLDER
        self.val_split = float(val_split)
        self.download = bool(download)
        self.verify: Verify = verify
        self._set_class_names(self._local_class_names() or FOOD101_CLASSES)

    def _local_class_names(self) -> Optional[List[str]]:
        path = self.base / "meta" / "train.json"
        if not path.is_file():
            return None
        try:
            with open(path) as f:
                return sorted(json.load(f))
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetLayoutError(f"cannot read {str(path)!r}: {err}") from err

    def prepare_data(self) -> None:
        """Extract or download when needed (Lightning runs this on one process per node)."""
        ensure_food101(self.root, download=self.download)

    def _build_splits(self) -> Dict[str, SplitDataset]:
        ensure_food101(self.root, download=False)
        local = self._local_class_names()
        if local != self.class_names:
            raise RuntimeError(
                f"classes in {str(self.base / 'meta' / 'train.json')!r} ({len(local or [])}) differ from those fixed "
                f"at construction ({self.num_classes}); re-create the DataModule after the download"
            )
        lists = {
            "train": read_food101_split(self.base, "train", self.class_names),
            "val": None,
            "test": read_food101_split(self.base, "test", self.class_names),
        }
        source, ids = build_file_splits(
            lists, self.class_names, self.val_split, 0.0, self.seed, self.verify, root=self.base
        )
        return {s: self._split_dataset(source, ids[s]) for s in ("train", "val", "test")}
