"""AppTest: the Evaluate page's "Run on" choice: a local Ray sweep shows the same curves and saves the same
points as this process (so switching back reads them all back); a cluster without an address is one error."""

from __future__ import annotations

import json

import pytest
from conftest import APP
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.ray


def _open() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.switch_page("pages/4_evaluate.py")
    at.run()
    at.multiselect(key="ev_strategies").set_value(["bi", "reverse"])
    at.multiselect(key="ev_ratios").set_value([0.0, 0.2, 0.4])
    at.number_input(key="ev_windows").set_value(2)
    at.number_input(key="ev_seq_len").set_value(64)
    at.checkbox(key="ev_mmlu").set_value(False)
    at.checkbox(key="ev_current").set_value(False)
    at.run()
    return at


def test_a_sweep_on_local_ray_equals_this_process(app_env):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             configure_logging=False)
    try:
        at = _open()
        assert at.radio(key="ev_run_on").options == ["this process", "local Ray", "cluster address"]
        at.radio(key="ev_run_on").set_value("local Ray").run()
        at.button(key="ev_run").click().run()
        assert not at.exception and not at.error
        on_ray = at.dataframe[0].value
        assert not on_ray["cached"].any() and on_ray["perplexity"].notna().all()
        figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
        assert {"bi", "reverse"} <= {t["name"] for t in figs[0]["data"]}
    finally:
        ray.shutdown()
    at.radio(key="ev_run_on").set_value("this process").run()
    at.button(key="ev_run").click().run()  # same settings: every point Ray saved is read back here
    here = at.dataframe[0].value
    assert not at.exception and here["cached"].all()
    assert list(here["perplexity"]) == list(on_ray["perplexity"])


def test_a_cluster_without_an_address_is_one_error(app_env):
    pytest.importorskip("ray")
    at = _open()
    at.radio(key="ev_run_on").set_value("cluster address").run()
    at.button(key="ev_run").click().run()
    assert not at.exception
    assert any("address" in e.value and "ray://" in e.value for e in at.error)
