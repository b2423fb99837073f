"""Drawing helpers shared by the pages: charts, captions, the sidebar's summary of the session."""

from __future__ import annotations

from typing import Any

import streamlit as st

from layerlens.defaults import DEFAULT_MODEL_ID

from .keys import SS_MODEL_INFO, SS_PLAN, SS_PRUNED
from .session import current_report

PLOT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def chart(fig: Any, key: str, **kw: Any) -> Any:
    return st.plotly_chart(fig, key=key, config=PLOT_CONFIG, **kw)


def human_params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def report_caption(report: Any) -> str:
    m = report.meta
    return (f"{m.get('model', '?')} · {report.num_layers} layers · {m.get('samples')} samples × "
            f"{m.get('seq_len')} tokens ({m.get('tokens')} tokens) of {m.get('data')} · CKA {report.cka_estimator} "
            + (f"· first {m['skip_first']} token(s) of each sample skipped " if m.get("skip_first") else "")
            + f"· {m.get('device')} {m.get('dtype')}")


def short_model(spec: str) -> str:
    """A model spec short enough for a title or the sidebar."""
    if spec == DEFAULT_MODEL_ID:
        return "default (SmolLM2-135M)"
    return spec if len(spec) <= 40 else "…" + spec[-38:]


def sidebar_status() -> None:
    """What is on screen for this session: model, analysis, plan (a glance from any page)."""
    with st.sidebar:
        st.caption("This session")
        report = current_report()
        info = st.session_state.get(SS_MODEL_INFO)
        if report is None or info is None:
            st.caption("No analysis yet.")
            return
        st.markdown(f"**Model** `{short_model(info['model'])}` · {info['num_layers']} layers")
        m = report.meta
        st.markdown(f"**Analysis** {m.get('samples')} × {m.get('seq_len')} tokens, {m.get('data')}")
        plan = st.session_state.get(SS_PLAN)
        if plan is not None:
            st.markdown(f"**Plan** {plan.strategy}: −{plan.n_removed} layers ({plan.ratio:.0%})")
        pruned = st.session_state.get(SS_PRUNED)
        if pruned is not None:
            st.markdown("**Pruned model** applied :material/check_circle:")
