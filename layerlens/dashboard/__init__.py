"""The dashboard's logic without streamlit, one module per concern, unit-testable without a browser.

``paths`` where user input may be read from (data root, path confinement, uploads); ``settings`` what an
analysis loads and measures; ``planning`` the Prune page's plan settings; ``share`` the share-link URL;
``store`` where the dashboard keeps analyses and sweeps; ``tables`` CSV/marker views of results;
``mmlu`` the Summary page's MMLU comparison. The pages (``pages/``) read widgets, call these, and draw.
"""
