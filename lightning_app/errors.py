"""User-facing errors: one type per kind of mistake, each message one paragraph that says how to fix it.

::

    UserError                      a mistake the user can fix (the command-line tools print it without a traceback)
    +-- ConfigError (ValueError)   a setting is out of range or contradicts another one
    |   +-- UnknownModelError (KeyError)             a model name the zoo does not have
    +-- DataError                  the data on disk / in memory is not what the run needs
    |   +-- DatasetLayoutError (ValueError)          wrong folder layout, empty class, split that cannot be made
    |   +-- DatasetNotFoundError (FileNotFoundError) not on disk and not downloadable: says where to put it
    |   +-- DatasetFileError (RuntimeError)          a dataset file is corrupt or not what it claims to be
    |   +-- DataMismatchError (ValueError)           data does not match the checkpoint (classes, input size)
    +-- WeightsError               backbone weights
    |   +-- WeightsUnavailableError (RuntimeError)   not cached and not downloadable: says where to put the file
    |   +-- WeightFileError (ValueError)             unreadable, truncated or not a Keras / converted weight file
    |   +-- LayerMismatchError (ValueError)          a weight file of another model
    |   +-- WeightsProvenanceError (ValueError)      a cached file that is not a conversion of the official file
    +-- CheckpointError (ValueError)                 a checkpoint that is truncated, not ours, or of another model

Each also derives from the built-in exception named in brackets, so ``except ValueError`` keeps working.
:mod:`lightning_app.entry` prints them for the command-line tools. ``UserError``, ``WeightsError``,
``WeightFileError`` and ``LayerMismatchError`` are defined in :mod:`converters.errors` (the converter library
raises them and never imports ``lightning_app``) and re-exported here.
"""
from __future__ import annotations

from converters.errors import LayerMismatchError, UserError, WeightFileError, WeightsError


class ConfigError(UserError, ValueError):
    """A setting is out of range or contradicts another setting."""

    kind = "configuration error"


class UnknownModelError(ConfigError, KeyError):
    """A model name that the zoo does not have (also a ``KeyError``, for lookups that fall back)."""

    __str__ = Exception.__str__  # the message, not KeyError's repr of it


class DataError(UserError):
    """The data is not what the run needs."""

    kind = "data error"


class DatasetLayoutError(DataError, ValueError):
    """The data on disk does not have the expected layout, or a requested split cannot be made from it."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset is not on disk and could not be downloaded; the message says where to put it."""


class DatasetFileError(DataError, RuntimeError):
    """A dataset file is corrupt (wrong checksum, unreadable) or not what it claims to be."""


class DataMismatchError(DataError, ValueError):
    """The data does not match what the checkpoint was trained on (class names, input size)."""


class WeightsUnavailableError(WeightsError, RuntimeError):
    """ImageNet weights are not in the cache and cannot be downloaded."""


class WeightsProvenanceError(WeightsError, ValueError):
    """A cached converted file does not come from the official Keras file it stands for."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is truncated, not a checkpoint of this application, or does not fit the model / data."""

    kind = "checkpoint error"


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataMismatchError",
    "DatasetFileError",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "LayerMismatchError",
    "UnknownModelError",
    "UserError",
    "WeightFileError",
    "WeightsError",
    "WeightsProvenanceError",
    "WeightsUnavailableError",
]
