"""Errors raised while reading or converting Keras weight files.

They are the root of the application's user-error hierarchy (``lightning_app.errors`` re-exports
them and builds the rest on ``UserError``), defined here because the converter library never
imports ``lightning_app``: the command-line tools print any ``UserError`` as one paragraph.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""

    #: short name printed before the message (``"data error: ..."``)
    kind = "error"


class WeightsError(UserError):
    """Backbone weights cannot be used."""

    kind = "weights error"


class WeightFileError(WeightsError, ValueError):
    """A weight file is unreadable, truncated, or not a Keras / converted weight file."""


class LayerMismatchError(WeightsError, ValueError):
    """A weight file does not match the model it is converted for."""


__all__ = ["LayerMismatchError", "UserError", "WeightFileError", "WeightsError"]
