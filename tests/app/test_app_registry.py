"""AppTest: a strategy added to the registry is offered by the dashboard with nothing else changed."""

from __future__ import annotations

TOY = "every_other_top"


def test_registered_strategy_in_the_prune_selectbox_and_the_evaluate_picker(open_app, toy_strategy):
    at = open_app("pages/3_prune.py")
    at.run()
    assert not at.exception and not at.error
    box = at.selectbox(key="pr_strategy")
    assert "Every other layer, from the top (toy)" in box.options  # options are shown by label
    box.set_value(TOY).run()
    assert not at.exception and not at.error
    layers = {m.label: m.value for m in at.metric}["Layers"]
    assert layers == "4 / 6"  # round(0.25 * 6) = 2 layers go: the toy's 2 and 4
    plan = at.session_state["ll_plan"]
    assert plan.strategy == TOY and plan.remove == (2, 4)

    ev = open_app("pages/4_evaluate.py")
    ev.run()
    assert not ev.exception
    assert "Every other layer, from the top (toy)" in ev.multiselect(key="ev_strategies").options
