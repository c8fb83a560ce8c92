"""Keras-equivalent backbones: the zoo table (collected from the family files), timm architectures and weights."""
from lightning_app.zoo import families as _families  # noqa: F401  (registers every family's models)
from lightning_app.zoo.factory import create_backbone, preprocessing
from lightning_app.zoo.registry import REGISTRY, ZooEntry, get_entry, list_models, variants_of

__all__ = ["REGISTRY", "ZooEntry", "create_backbone", "get_entry", "list_models", "preprocessing", "variants_of"]
