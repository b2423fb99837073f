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

st.set_page_config(page_title="LayerLens", page_icon="🔬", layout="wide")
ui.init_session()

PAGES = [
    st.Page("pages/1_model_data.py", title="Model & data", icon="📦", default=True),
    st.Page("pages/2_redundancy.py", title="Redundancy", icon="🔥"),
    st.Page("pages/3_prune.py", title="Prune", icon="✂️"),
    st.Page("pages/4_evaluate.py", title="Evaluate", icon="📈"),
    st.Page("pages/5_export.py", title="Export", icon="💾"),
    st.Page("pages/6_summary.py", title="Summary", icon="🧾"),
]
page = st.navigation(PAGES)
ui.sidebar_status()
try:
    page.run()
finally:  # also when a page stops early: the URL always reflects the session's shareable state
    ui.sync_query_params()
