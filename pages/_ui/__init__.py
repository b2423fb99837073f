"""Dashboard plumbing shared by the pages (the streamlit side; the logic is in ``layerlens.dashboard``).

* :mod:`.keys` -- every session-state key;
* :mod:`.errors` -- user errors shown as one ``st.error`` sentence;
* :mod:`.session` -- the session's settings, report and plan; share-link in, URL sync out; the router guard;
* :mod:`.resources` -- the cached shared model and its lock, uploads, cached quick before/after numbers;
* :mod:`.jobs` -- the analysis: a thread that outlives a page change, followed with progress (Cancel);
* :mod:`.sweeping` -- the sweep: estimated time, progress with time left (Stop, resume);
* :mod:`.healing` -- healing the applied pruned model (a thread: live loss curve, Stop) and its result;
* :mod:`.widgets` -- charts, captions, the sidebar.

Caching rules (STYLE.md habit 8):

* ``st.cache_resource`` holds ONLY the loaded model (+ a lock), keyed by (id, revision, dtype, device,
  trust_remote_code). Every session shares it; nobody mutates it (surgery returns new models).
* ``st.cache_data`` holds small results (reports read from disk, quick before/after numbers).
* Everything per user -- settings, reports, plans, pruned models, uploads -- lives in ``st.session_state``
  under the ``ll_*`` keys of :mod:`.keys` and is never put in a cache shared across sessions.

Any forward pass through the shared model (or a model derived from it) runs under the model's lock: hooks
and ``surgery.pruned`` are not safe across threads, and two sessions must not see each other's activations.

This folder is no page: ``app.py`` lists the pages for ``st.navigation``, and Streamlit's automatic page
list (used only before the router first runs) takes ``pages/*.py`` files, not folders.
"""
