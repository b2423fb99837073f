"""LayerLens dashboard: ``streamlit run app.py``.

The router only: page config, session init from a share link, navigation, URL sync. Pages live in
``pages/`` and stay thin (read widgets -> call the library -> draw with ``layerlens.plots``).
"""

from __future__ import annotations

# No sys.path editing: Streamlit puts this file's folder on sys.path while it runs the script (`streamlit
# run` and AppTest alike), so `pages._ui` imports; `layerlens` is an installed package.
from pathlib import Path

import streamlit as st

from pages._ui import session, widgets

# The tab icon is a file served by this server: a ":material/...:" page icon is fetched from a font CDN
# (the only request an offline demo made to another host; tests/e2e checks there is none).
ICON = Path(__file__).resolve().parent / "assets" / "layerlens.png"
st.set_page_config(page_title="LayerLens", page_icon=str(ICON), layout="wide")
session.init_session()

PAGE_FILES = {
    "1_model_data.py": ("Model & data", ":material/deployed_code:"),
    "2_redundancy.py": ("Redundancy", ":material/grid_on:"),
    "3_prune.py": ("Prune", ":material/content_cut:"),
    "7_heal.py": ("Heal", ":material/healing:"),
    "4_evaluate.py": ("Evaluate", ":material/show_chart:"),
    "5_export.py": ("Export", ":material/save:"),
    "6_summary.py": ("Summary", ":material/summarize:"),
}
PAGES = {name: st.Page(f"pages/{name}", title=title, icon=icon, default=name == "1_model_data.py")
         for name, (title, icon) in PAGE_FILES.items()}
page = st.navigation(list(PAGES.values()))
route = st.query_params.get(session.ROUTE_PARAM)
if route is not None:  # a deep link that Streamlit first ran without the router (session.require_router)
    del st.query_params[session.ROUTE_PARAM]
    if route in PAGES and PAGES[route] is not page:
        st.switch_page(PAGES[route], query_params={k: st.query_params.get(k) for k in st.query_params})
try:
    with session.routed():  # a page may end early (session.stop_page); what it drew stays
        page.run()
finally:  # also when a page stops early: the URL and sidebar always reflect the session's state
    session.sync_query_params()
    widgets.sidebar_status()
