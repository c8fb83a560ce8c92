"""Errors raised while reading or converting Keras weight files."""


class WeightFileError(ValueError):
    """A weight file is unreadable, truncated, or not a Keras weight file."""


class LayerMismatchError(ValueError):
    """A weight file does not match the model it is converted for."""
