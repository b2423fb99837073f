"""Errors at the UI boundary: a user error is one ``st.error`` sentence (never a traceback), an
unexpected one is one sentence naming the log file that holds its traceback, and the results already on
screen stay."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import streamlit as st

from layerlens.cli import FLAGS
from layerlens.errors import LayerLensError, for_interface
from layerlens.runs import write_error_log

log = logging.getLogger("layerlens.dashboard")

# Library messages name parameters in backticks (`seq_len`); the dashboard shows them as it always has, by
# the CLI's flag names (tests/app pin "seq-len"). Widget labels instead would be a visible change.
PARAMETER_NAMES = FLAGS


@contextlib.contextmanager
def guarded(what: str) -> Iterator[None]:
    """Show a user error as one ``st.error`` sentence, an unexpected one as :func:`unexpected` (never a
    traceback, never ``st.exception``); earlier results stay on screen."""
    try:
        yield
    except LayerLensError as exc:
        st.error(for_interface(str(exc), PARAMETER_NAMES), icon=":material/error:")
    except MemoryError:
        st.error(f"Out of memory while {what}; lower the samples, sequence length or batch size, or load the "
                 "model in bfloat16.", icon=":material/error:")
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback in the UI
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            st.error(f"Out of memory while {what}; lower the samples, sequence length or batch size, or load "
                     "the model in bfloat16.", icon=":material/error:")
        else:
            st.error(unexpected(exc, what), icon=":material/error:")


def unexpected(exc: BaseException, what: str) -> str:
    """One sentence for an error nobody foresaw (never a traceback on screen): what failed, the error's
    type and first line, and the log file under the runs folder that holds the traceback."""
    details = "".join(traceback.format_exception(exc))
    log.error("unexpected error while %s:\n%s", what, details)
    path = write_error_log(f"dashboard: unexpected error while {what}\n\n{details}")
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "no message"
    where = f"the full log is in {path}" if path else "the server log has the details"
    return f"Unexpected error while {what} ({type(exc).__name__}: {first}); earlier results are kept, {where}."


@contextlib.contextmanager
def status_error_on_failure(status: Any) -> Iterator[None]:
    """Mark an ``st.status`` box failed when its work raises (the message itself comes from :func:`guarded`)."""
    try:
        yield
    except Exception:
        status.update(label="Failed — see the message below; earlier results are kept.", state="error",
                      expanded=False)
        raise


def run_job(job: Any, work: Callable[[], None]) -> None:
    """The body of a background job's thread: ``work()``; an exception is kept on ``job.error`` for the
    script run that follows the job to show (a thread cannot draw), and ``job.done`` is set either way."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - shown by the script run that follows the job
        job.error = exc
    finally:
        job.done.set()
