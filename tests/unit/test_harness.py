"""lm-eval tasks through its Python API on the live pruned model: equal to the harness on the same model
saved and reloaded; local multiple-choice and generation task YAMLs; clear errors for unknown/offline tasks."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from harness_tasks import write_tasks  # noqa: E402

from layerlens.errors import DataError  # noqa: E402
from layerlens.harness import parse_tasks, resolve_tasks, run_tasks  # noqa: E402
from layerlens.loading import load_model  # noqa: E402
from layerlens.plans import PrunePlan  # noqa: E402
from layerlens.surgery import apply_plan  # noqa: E402


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def test_live_pruned_model_equals_saved_and_reloaded(tiny_llama, local_tasks, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    plan = PrunePlan(6, "remove", remove=(1, 4), strategy="manual")
    live = apply_plan(lm.model, plan)
    specs = [str(p) for p in local_tasks]
    got = run_tasks(live, lm.tokenizer, specs, batch_size=4)
    assert set(got.tasks) == {"ll_local_mc", "ll_local_gen"}
    mc, gen = got.tasks["ll_local_mc"], got.tasks["ll_local_gen"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(mc) and mc["n"] == 12
    assert 0.0 <= mc["acc"] <= 1.0 and mc["acc_stderr"] > 0
    assert any(k.startswith("exact_match") for k in gen) and gen["n"] == 8
    assert got.meta["lm_eval"] == "0.4.13" and got.meta["versions"]["ll_local_mc"] == 1.0

    live.save_pretrained(tmp_path / "pruned")
    lm.tokenizer.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype="float32").eval()
    assert reloaded.config.num_hidden_layers == 4
    want = run_tasks(reloaded, lm.tokenizer, specs, batch_size=4)
    assert got.tasks == want.tasks
    # and the harness sees the pruning: the unpruned model scores differently on the same requests
    full = run_tasks(lm.model, lm.tokenizer, specs[:1], batch_size=4)
    assert full.tasks["ll_local_mc"] != mc or pytest.fail("pruning changed nothing the harness measures")


def test_task_specs_and_errors(local_tasks, tmp_path):
    assert parse_tasks(" hellaswag, arc_easy ,") == ["hellaswag", "arc_easy"]
    names, folders = resolve_tasks([str(local_tasks[0]), "arc_easy"])
    assert names == ["ll_local_mc", "arc_easy"] and folders == [str(local_tasks[0].parent.resolve())]
    with pytest.raises(DataError, match="does not exist"):
        resolve_tasks([str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(DataError, match="no `task:` name"):
        resolve_tasks([str(tmp_path / "bad.yaml")])


def test_offline_task_without_data_names_it(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    lm = load_model(str(tiny_llama), device="cpu", dtype="float32")
    with pytest.raises(DataError, match="'arc_easy'.*Offline"):
        run_tasks(lm.model, lm.tokenizer, "arc_easy")
    with pytest.raises(DataError, match="Unknown lm-eval task 'no_such_task_xyz'"):
        run_tasks(lm.model, lm.tokenizer, "no_such_task_xyz")
