"""The session's state: what was asked for (a share link, the last Analyze), the report and plan on
screen, the Evaluate page's settings; the share link read once per session and the URL kept in step with
the state; the router guard; :func:`stop_page`, the pages' way to end early."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import streamlit as st

from layerlens.dashboard.planning import PlanSettings, build_plan
from layerlens.dashboard.settings import AnalysisSettings
from layerlens.dashboard.share import from_query, sweep_from_query, to_query
from layerlens.dashboard.sweeps import SweepSettings
from layerlens.defaults import MMLU_SUBJECTS
from layerlens.plans import strategy_names

from .errors import guarded
from .keys import (
    SS_INIT,
    SS_PLAN,
    SS_PLAN_FROM_URL,
    SS_PLAN_SETTINGS,
    SS_REPORT,
    SS_REQUESTED,
    SS_SETTINGS,
    SS_SWEEP_REQUESTED,
    SS_SWEEP_SETTINGS,
)

log = logging.getLogger("layerlens.dashboard")

ROUTE_PARAM = "page"  # query parameter naming the page a deep link asked for (see require_router)


class PageStop(Exception):  # noqa: N818 - a signal, like Streamlit's StopException, not an error
    """Raised by :func:`stop_page` inside :func:`routed`: the page ends there, the router goes on."""


_run = threading.local()  # the router runs the page in its own thread: "is this run routed?" per thread


@contextlib.contextmanager
def routed() -> Iterator[None]:
    """app.py runs the page in this: :func:`stop_page` ends the page and app.py still syncs the URL and
    draws the sidebar afterwards."""
    _run.active = True
    try:
        yield
    except PageStop:  # a page ended early: what it drew stays
        pass
    finally:
        _run.active = False


def stop_page() -> NoReturn:
    """End the page here (instead of ``st.stop()``). After ``st.stop()`` every Streamlit call of the run
    raises again, so app.py could neither write the session's state into the URL nor draw the sidebar:
    a link copied from such a page lost its parameters. A run without the router (AppTest's later runs,
    Streamlit's pages-folder mode) has nothing after the page, so there it is ``st.stop()``."""
    if getattr(_run, "active", False):
        raise PageStop
    st.stop()


def require_router(page_file: str) -> None:
    """Pages run through app.py only. On a fresh server Streamlit can run a ``pages/`` file directly for
    the first deep link (its older pages-folder mode: no router, no session set-up, an automatic page
    list): send such a run through app.py, keeping the link's parameters and naming the page to open."""
    if st.session_state.get(SS_INIT):
        return
    params = {k: st.query_params.get(k) for k in st.query_params}
    params[ROUTE_PARAM] = Path(page_file).name
    st.switch_page("app.py", query_params=params)


def init_session() -> None:
    """Once per session: read a share link's query parameters into the session's settings."""
    ss = st.session_state
    if ss.get(SS_INIT):
        return
    ss[SS_INIT] = True
    try:
        params = {k: st.query_params.get(k) for k in st.query_params}
    except Exception:  # noqa: BLE001 - a malformed URL must not break the app
        params = {}
    settings, plan = from_query(params, AnalysisSettings.quick(), None)
    ss[SS_REQUESTED] = settings
    if plan is not None:
        ss[SS_PLAN_SETTINGS] = plan
        ss[SS_PLAN_FROM_URL] = True
    sweep = sweep_from_query(params, sweep_strategies(), tuple(MMLU_SUBJECTS))
    if sweep is not None:
        ss[SS_SWEEP_REQUESTED] = sweep
        ss[SS_SWEEP_SETTINGS] = sweep


def requested_settings() -> AnalysisSettings:
    return st.session_state.get(SS_REQUESTED) or AnalysisSettings.quick()


def current_report() -> Any | None:
    return st.session_state.get(SS_REPORT)


def current_settings() -> AnalysisSettings | None:
    return st.session_state.get(SS_SETTINGS)


def plan_settings() -> PlanSettings:
    return st.session_state.get(SS_PLAN_SETTINGS) or PlanSettings()


def set_plan_settings(ps: PlanSettings) -> None:
    st.session_state[SS_PLAN_SETTINGS] = ps


def current_plan(report: Any) -> Any | None:
    """The session's plan; built from the plan settings (defaults or a share link) when none exists yet."""
    plan = st.session_state.get(SS_PLAN)
    if plan is not None and plan.num_layers == report.num_layers:
        return plan
    plan = None
    with guarded("building the plan"):
        plan = build_plan(report, plan_settings())
        st.session_state[SS_PLAN] = plan
    return plan


def sweep_strategies() -> tuple[str, ...]:
    """The Evaluate page's curves: strategies sized by a ratio alone (read at call time: the registry grows)."""
    return tuple(strategy_names(size="count"))


def requested_sweep() -> SweepSettings:
    """The Evaluate page's starting settings: a share link's, else the defaults."""
    return st.session_state.get(SS_SWEEP_REQUESTED) or SweepSettings()


def set_sweep_settings(sweep: SweepSettings) -> None:
    st.session_state[SS_SWEEP_SETTINGS] = sweep


def sync_query_params() -> None:
    """Mirror the shareable state (model, data size, plan, Evaluate settings) into the URL; only writes on
    change. app.py calls it at the end of every run, however the page ended (see :func:`stop_page`)."""
    settings = current_settings() or requested_settings()
    want = to_query(settings, st.session_state.get(SS_PLAN_SETTINGS), st.session_state.get(SS_SWEEP_SETTINGS))
    try:
        have = {k: st.query_params.get(k) for k in st.query_params}
        if have != want:
            st.query_params.from_dict(want)
    except Exception:  # noqa: BLE001 - URL sync is best effort
        log.debug("query param sync failed", exc_info=True)
