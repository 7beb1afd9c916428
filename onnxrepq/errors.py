"""Errors the user can act on.

Anything raised as ``UserError`` is printed by the CLI as one line and exits 2; every other
exception is a bug of ours and exits 1. Keeping the distinction in one type means no caller has
to guess which messages are safe to show without a traceback.
"""


class UserError(Exception):
    """Bad input, bad option or a model we cannot handle: the user's to fix."""


class ModelError(UserError):
    """The model file is missing, unreadable, not ONNX, or rejected by the checker."""


class CalibrationError(UserError):
    """Calibration data that does not fit the model (shape, dtype, NaN/Inf, empty)."""
