"""LayerLens dashboard: ``streamlit run app.py``.

The router only: page config, session init from a share link, navigation, URL sync. Pages live in
``pages/`` and stay thin (read widgets -> call the library -> draw with ``layerlens.plots``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `pages._ui` and `layerlens` importable however the app is started
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from pages import _ui as ui  # noqa: E402

st.set_page_config(page_title="LayerLens", page_icon=":material/biotech:", layout="wide")
ui.init_session()

PAGES = [
    st.Page("pages/1_model_data.py", title="Model & data", icon=":material/deployed_code:", default=True),
    st.Page("pages/2_redundancy.py", title="Redundancy", icon=":material/grid_on:"),
    st.Page("pages/3_prune.py", title="Prune", icon=":material/content_cut:"),
    st.Page("pages/4_evaluate.py", title="Evaluate", icon=":material/show_chart:"),
    st.Page("pages/5_export.py", title="Export", icon=":material/save:"),
    st.Page("pages/6_summary.py", title="Summary", icon=":material/summarize:"),
]
page = st.navigation(PAGES)
try:
    page.run()
finally:  # also when a page stops early: the URL and sidebar always reflect the session's state
    ui.sync_query_params()
    ui.sidebar_status()
