"""Keras-equivalent backbones: the registry table, timm architectures and weights."""
from lightning_app.zoo import archs as _archs  # noqa: F401  (registers keras_* timm models)
from lightning_app.zoo.factory import create_backbone, preprocessing
from lightning_app.zoo.registry import REGISTRY, ZooEntry, get_entry, list_models

__all__ = ["REGISTRY", "ZooEntry", "create_backbone", "get_entry", "list_models", "preprocessing"]
