"""Which model a robustness run tests: a ``fit`` checkpoint, or a zoo model with its Keras ImageNet top."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

from lightning_app.checkpoint import load_checkpoint
from lightning_app.errors import CheckpointError, DataMismatchError
from lightning_app.module import TransferModule

#: The six models of the seed notebook's comparison.
SEED_MODELS = ("NASNetLarge", "InceptionResNetV2", "InceptionV3", "DenseNet201", "ResNet152V2", "Xception")
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ModelSpec:
    """``label``: name in the tables; ``backbone``: zoo / timm name; ``checkpoint``: a ``fit`` checkpoint or None
    (then the Keras ImageNet top is used)."""

    label: str
    backbone: str
    checkpoint: Optional[str] = None


def _is_checkpoint_path(text: str) -> bool:
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    return text.endswith(".ckpt") or any(s in text for s in separators) or Path(text).is_file()


def checkpoint_hparams(path: str) -> Dict[str, Any]:
    """The ``hyper_parameters`` of a Lightning checkpoint (clear error if the file is missing or foreign)."""
    ckpt = load_checkpoint(path, mmap=True)  # CheckpointError: missing, truncated, not a checkpoint
    hp = ckpt.get("hyper_parameters")
    if not hp or "backbone" not in hp:
        raise CheckpointError(f"{path} is not a TransferModule checkpoint (no 'backbone' hyper-parameter); "
                              f"use a checkpoint written by `python -m lightning_app fit`")
    return dict(hp)


def parse_model_spec(text: str) -> ModelSpec:
    """``InceptionV3`` (ImageNet top), ``path/to/x.ckpt`` (label: its backbone) or ``label=path/to/x.ckpt``."""
    label: Optional[str] = None
    if "=" in text:
        label, text = text.split("=", 1)
        if not label:
            raise ValueError(f"empty label in model spec {label}={text}")
    if _is_checkpoint_path(text):
        hp = checkpoint_hparams(text)
        return ModelSpec(label or str(hp["backbone"]), str(hp["backbone"]), text)
    return ModelSpec(label or text, text, None)


def unique_labels(specs: list) -> list:
    """Specs with duplicate labels disambiguated by the checkpoint's file stem (``InceptionV3:best``)."""
    seen: Dict[str, int] = {}
    for s in specs:
        seen[s.label] = seen.get(s.label, 0) + 1
    out = []
    for s in specs:
        if seen[s.label] > 1 and s.checkpoint:
            s = ModelSpec(f"{s.label}:{Path(s.checkpoint).stem}", s.backbone, s.checkpoint)
        out.append(s)
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels repeat: {labels}; name them with label=path.ckpt")
    return out


def module_from_classifier(backbone: str, classifier: nn.Module, inference: Any = None) -> TransferModule:
    """A :class:`TransferModule` computing ``classifier`` (a timm model with its top, e.g. the Keras ImageNet
    classifier): body weights into ``backbone``, the final ``Linear`` into a linear head. ``inference``: the
    module's inference-engine options (default: bf16 where the device computes it natively; ``{"precision":
    "fp32"}``: ``classifier``'s float32 outputs)."""
    clf = classifier.get_classifier()
    if not isinstance(clf, nn.Linear):
        raise ValueError(f"{backbone}: its top is {type(clf).__name__}, not one Linear layer after pooling, "
                         f"so it cannot be a TransferModule head; use a fine-tuned checkpoint instead")
    module = TransferModule(backbone, num_classes=clf.out_features, weights=None, stage="head", hidden=[], dropout=0.0,
                            inference=inference)
    if module.num_features != clf.in_features:
        raise ValueError(f"{backbone}: pooled features {module.num_features} != classifier input {clf.in_features}")
    clf_name = next(n for n, m in classifier.named_modules() if m is clf)
    missing, unexpected = module.backbone.load_state_dict(classifier.state_dict(), strict=False)
    stray = [k for k in unexpected if not k.startswith(clf_name + ".")]
    if missing or stray:
        raise ValueError(f"{backbone}: body weights do not fit: missing {missing[:5]}, unexpected {stray[:5]}")
    module.head[-1].load_state_dict(clf.state_dict())
    return module


def imagenet_module(backbone: str) -> TransferModule:
    """The zoo model with its Keras ImageNet weights and 1000-class top (downloaded and converted once;
    offline, the zoo's error explains how to provide the files)."""
    from lightning_app.zoo import create_backbone

    return module_from_classifier(backbone, create_backbone(backbone, weights="imagenet", num_classes=None))


def load_module(spec: ModelSpec, num_classes: int) -> TransferModule:
    """The module to test for ``spec`` on data with ``num_classes`` classes."""
    if spec.checkpoint:
        module = TransferModule.load_from_checkpoint(spec.checkpoint, map_location="cpu", weights=None)
        if module.num_classes != num_classes:
            raise DataMismatchError(f"{spec.checkpoint} predicts {module.num_classes} classes, the test data have "
                                    f"{num_classes}: test it on data with its training classes")
        return module
    if num_classes != IMAGENET_CLASSES:
        raise DataMismatchError(
            f"{spec.label}: without a checkpoint a model is tested with its Keras ImageNet top, which needs "
            f"ImageNet-labelled data (1000 classes in Keras order); these data have {num_classes} classes. "
            f"Pass the checkpoints of your fine-tuned models instead: --models label=path/to/best.ckpt ..."
        )
    return imagenet_module(spec.backbone)


__all__ = ["IMAGENET_CLASSES", "ModelSpec", "SEED_MODELS", "checkpoint_hparams", "imagenet_module", "load_module",
           "module_from_classifier", "parse_model_spec", "unique_labels"]
