"""The strategy registry: one entry is all a new strategy needs; every consumer reads the table."""

from __future__ import annotations

import pytest

from layerlens import cli
from layerlens.errors import PlanError
from layerlens.plans import PrunePlan, get_strategy, make_plan, register, strategy_names, unregister
from layerlens.plans.registry import RATIO, Param
from layerlens.plots import strategy_color

TOY = "every_other_top"  # registered by the toy_strategy fixture (conftest)


def test_builtin_table_is_complete_and_consistent():
    names = strategy_names()
    assert names == ("bi", "reverse", "sequential", "magnitude", "random", "block", "streamline", "slm", "laco",
                     "oracle", "attn_bi", "mlp_bi", "finercut", "manual")
    assert strategy_names(sweep_default=True) == ("bi", "reverse", "sequential", "magnitude")
    assert strategy_names(on_prune_page=True) == ("bi", "reverse", "sequential", "magnitude", "block",
                                                  "streamline", "attn_bi", "mlp_bi")
    assert strategy_names(contiguous=True) == ("block", "streamline")
    colors = [get_strategy(n).color for n in names]
    assert len(set(colors)) == len(colors)
    slm = get_strategy("slm")
    assert slm.uses_report("cka") and not slm.uses_report("output") and slm.uses_data("output")
    assert not get_strategy("reverse").uses_report() and get_strategy("laco").uses_data()
    oracle = get_strategy("oracle")  # greedy by measured damage: forward passes, sized by a ratio (a sweep curve)
    assert oracle.uses_data() and not oracle.uses_report() and oracle.sweepable and not oracle.on_prune_page


def test_param_ranges_are_checked_with_the_parameter_name():
    assert RATIO.check(0.0) == 0.0
    for bad in (1.0, -0.1, float("nan"), True, "0.2"):
        with pytest.raises(PlanError, match="`ratio`"):
            RATIO.check(bad)
    crit = get_strategy("slm").param("criterion")
    with pytest.raises(PlanError, match="one of cka, cosine, output"):
        crit.check("l2")
    assert Param("m", int, lo=1).range_text() == "[1, inf]"


def test_a_registered_strategy_builds_plans_and_is_refused_twice(toy_strategy):
    plan = make_plan(TOY, None, ratio=0.5, num_layers=8)
    assert plan.remove == (0, 2, 4, 6) and plan.strategy == TOY  # round(0.5 * 8) = 4 of the even layers
    assert PrunePlan.from_json(plan.to_json()) == plan  # plan files accept the registered name
    assert strategy_color(TOY) == "#123456"
    with pytest.raises(PlanError, match="already registered"):
        register(toy_strategy)
    unregister(TOY)
    with pytest.raises(PlanError, match="Unknown strategy"):
        make_plan(TOY, None, ratio=0.5, num_layers=8)
    register(toy_strategy)


def test_a_registered_strategy_appears_in_the_cli_help(toy_strategy, capsys):
    for command in ("prune", "sweep"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert TOY in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_a_registered_strategy_runs_in_the_cli_plan_command(toy_strategy, tiny_llama, capsys):
    assert cli.main(["plan", "--model", str(tiny_llama), "--strategy", TOY, "--ratio", "0.5", "--device", "cpu"]) == 0
    assert f"{TOY}: remove [0, 2, 4]" in capsys.readouterr().out  # round(0.5 * 6) = 3 of the even layers


def test_a_registered_strategy_runs_in_a_sweep(toy_strategy, tiny_llama, sample_texts):
    from layerlens.loading import load_model
    from layerlens.sweep import SweepConfig, sweep

    lm = load_model(str(tiny_llama), device="cpu")
    result = sweep(lm.model, lm.tokenizer, None, SweepConfig(strategies=(TOY, "reverse"), ratios=(0.0, 0.34),
                                                             seq_len=32, max_windows=2),
                   ppl_texts=sample_texts)
    rows = result.frame
    toy = rows[rows["strategy"] == TOY]
    assert list(toy["removed_layers"]) == ["", "2,4"]  # round(0.34 * 6) = 2: the two highest even layers
    assert toy["perplexity"].notna().all()
