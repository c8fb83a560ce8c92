"""Dataset errors whose messages say what to fix."""
from __future__ import annotations


class DatasetLayoutError(ValueError):
    """The data on disk does not have the expected layout (the message says what to fix)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk and could not be downloaded; the message says where to put it."""
