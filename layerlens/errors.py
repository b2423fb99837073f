"""User-facing errors: one clear sentence that names the fix.

Everything a user can cause (bad model id, empty data, out-of-range plan) raises
:class:`LayerLensError`. The CLI prints its message and exits non-zero; the dashboard
shows it with ``st.error``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LayerLensError(Exception):
    """An error caused by user input or environment, with a message that names the fix."""

    exit_code = 2


class UnsupportedArchitectureError(LayerLensError):
    """The model's layers cannot be located (or merged) by any adapter."""


class DataError(LayerLensError):
    """Calibration / evaluation data is missing, empty, or malformed."""


class PlanError(LayerLensError):
    """A pruning plan is invalid for the model (out of range, duplicate, removes everything)."""


class ResourceError(LayerLensError):
    """Not enough memory (or another resource) for the requested work."""
