"""Errors raised while reading or converting Keras weight files (defined in :mod:`lightning_app.errors`)."""
from lightning_app.errors import LayerMismatchError, WeightFileError

__all__ = ["LayerMismatchError", "WeightFileError"]
