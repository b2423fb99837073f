"""User-facing errors: one clear sentence that names the fix.

Everything a user can cause (bad model id, empty data, out-of-range plan) raises
:class:`LayerLensError`. The CLI prints its message and exits non-zero; the dashboard
shows it with ``st.error``. Anything else is a bug and keeps its traceback. Messages name
parameters, not CLI flags; :func:`for_interface` renames them for each face.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


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


_PARAMETER = re.compile(r"`([A-Za-z_]\w*)(?:=([^`]+))?`")


def for_interface(message: str, names: Mapping[str, str]) -> str:
    """``message`` with each backticked parameter named the way one interface names it.

    Library messages name parameters in backticks (`` `seq_len` ``, or `` `dtype=float32` `` with a
    value) so that each face speaks its own language: the CLI maps parameter -> flag (``--seq-len``,
    ``--dtype float32``), the dashboard parameter -> widget label. A name missing from ``names`` is
    shown as the bare parameter (``seq_len``, ``dtype=float32``).
    """

    def rename(match: re.Match[str]) -> str:
        param, value = match.group(1), match.group(2)
        if param not in names:
            return match.group(0).strip("`")
        return names[param] if value is None else f"{names[param]} {value}"

    return _PARAMETER.sub(rename, message)


def check_made_for(what: str, have: int, want: int | None, fix: str, error: type[LayerLensError] = LayerLensError) -> None:
    """Refuse a saved file (``what``, e.g. "The plan in 'p.json'") made for a model with another layer count."""
    if want is not None and have != want:
        raise error(f"{what} is for a {have}-layer model but the model has {want} layers{fix}.")
