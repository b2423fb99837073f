"""Layer-by-layer execution equals the in-memory path: report, perplexity, MMLU, sweeps and export.

Each test builds the in-memory reference with the ordinary code (load_model + metrics.analyze, apply_plan +
the tasks' plain forward, apply_plan + save_pretrained) and compares the layer-wise result to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from layerlens import surgery
from layerlens.data import TextSet
from layerlens.errors import LayerLensError
from layerlens.evaluation import MMLUTask, PerplexityTask, plain_forward
from layerlens.export import save_pruned
from layerlens.layerwise import Checkpoint, LayerwiseModel, parse_size, wants_layerwise
from layerlens.layerwise import sweep as layerwise_sweep
from layerlens.layerwise_export import export_pruned
from layerlens.loading import load_model
from layerlens.metrics import CaptureConfig, analyze
from layerlens.plans import PrunePlan
from layerlens.questions import load_questions
from layerlens.sweep import SweepConfig, sweep

DATA = Path(__file__).parents[1] / "data"
ARCHS = ["llama", "qwen2", "gpt2", "gemma2"]  # gemma2: sliding/full masks per layer, soft-capped logits


@pytest.fixture(scope="module")
def questions():
    return load_questions(str(DATA / "mmlu_sample.jsonl"), limit=2)


def _texts(sample_texts) -> TextSet:
    # short texts among long ones: batches with right padding (and a 3-token sample: no CKA minibatch)
    texts = [sample_texts[0], "To be, or not.", sample_texts[1], "Good night.", *sample_texts[2:7], "O!"]
    return TextSet(tuple(texts), "test", "padded test texts")


def _plans(n: int) -> list[PrunePlan]:
    return [PrunePlan(n, "remove"), PrunePlan(n, "remove", remove=(2, 4)), PrunePlan(n, "remove", remove=(2,)),
            PrunePlan(n, "merge", merge=((1, 2, 3),), merge_formula="task_vector"),
            PrunePlan(n, "merge", merge=((3, 4),), merge_formula="mean")]


# report fields compared (when the in-memory report has them: sublayers, bootstrap) and their tolerance
FIELDS = {"bi": 1e-4, "magnitude": 1e-4, "cosine": 1e-4, "block_distance": 1e-4, "cka": 2e-3,
          "attn_bi": 1e-4, "mlp_bi": 1e-4, "attn_magnitude": 1e-4, "mlp_magnitude": 1e-4, "bi_ci_low": 1e-4,
          "bi_ci_high": 1e-4, "attn_bi_ci_low": 1e-4, "mlp_bi_ci_high": 1e-4, "rank_stability": 1e-9}
OPTIONS = [dict(skip_first=0), dict(skip_first=1),
           dict(skip_first=1, last_state="post-norm", block_distance="last-token")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "skip1", "postnorm-lasttoken"])
def test_report_equals_in_memory_analysis(tiny_model_factory, sample_texts, arch, options):
    path = tiny_model_factory(arch)
    lm = load_model(str(path), device="cpu", dtype="float32")
    known = {f.name for f in __import__("dataclasses").fields(CaptureConfig)}
    if not set(options) <= known:
        pytest.skip("this CaptureConfig has no last_state/block_distance options")
    config = CaptureConfig(samples=10, seq_len=40, batch_size=4, **options)
    texts = _texts(sample_texts)
    ref = analyze(lm.model, lm.tokenizer, texts, config)
    lw = LayerwiseModel(str(path), device="cpu", dtype="float32")
    got = lw.analyze(texts, config)
    assert got.meta["tokens"] == ref.meta["tokens"] and got.meta["cka_minibatches"] == ref.meta["cka_minibatches"]
    assert ref.meta["tokens"] < 10 * 40 - options["skip_first"] * 10  # padding was present
    compared = 0
    for name, tol in FIELDS.items():
        if getattr(ref, name, None) is None:
            assert getattr(got, name, None) is None, name
            continue
        a = ref.array(name) if name == "block_distance" else np.asarray(getattr(ref, name), dtype=float)
        b = got.array(name) if name == "block_distance" else np.asarray(getattr(got, name), dtype=float)
        assert np.allclose(a, b, atol=tol, rtol=0, equal_nan=True), (name, np.nanmax(np.abs(a - b)))
        compared += 1
    assert compared >= 5
    same_meta = {k: v for k, v in ref.meta.items() if k not in ("seconds", "created", "device")}
    assert {k: got.meta.get(k) for k in same_meta} == same_meta
    assert got.meta["execution"] == "layerwise"
    stats = got.meta["layerwise"]
    assert stats["layers_loaded"] == lw.num_layers
    # one pass over the weights: every tensor except the LM head is read once
    head = sum(lw.checkpoint.nbytes(k) for k in lw.checkpoint.meta if k in ("lm_head.weight", "embed_out.weight"))
    assert stats["bytes_read"] == lw.checkpoint.total_bytes - head


@pytest.mark.parametrize("arch", ARCHS)
def test_perplexity_and_mmlu_of_plans_equal_in_memory(tiny_model_factory, sample_texts, questions, arch):
    path = tiny_model_factory(arch)
    lm = load_model(str(path), device="cpu", dtype="float32")
    lw = LayerwiseModel(str(path), device="cpu", dtype="float32")
    plans = _plans(lw.num_layers)
    tasks = [PerplexityTask(lw.tokenizer, sample_texts, seq_len=48, batch_size=3, max_windows=5),
             MMLUTask(lw.tokenizer, questions, batch_size=5, max_length=lw.harness_max_length()),
             MMLUTask(lw.tokenizer, questions, batch_size=5, max_length=lw.harness_max_length(),
                      padding_side="left")]
    assert any(b.attention_mask is not None and not bool(b.attention_mask.all()) for b in tasks[1].batches)
    results = lw.evaluate(tasks, plans)
    for p, plan in enumerate(plans):
        model = surgery.apply_plan(lm.model, plan)
        ppl = tasks[0].run(plain_forward(model))
        assert results[0][p].perplexity == pytest.approx(ppl.perplexity, rel=1e-6)
        for t in (1, 2):
            ref = tasks[t].run(plain_forward(model))
            assert results[t][p].choices == ref.choices
            assert np.allclose(results[t][p].loglikelihoods, ref.loglikelihoods, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_kl_to_the_original_equals_in_memory(tiny_model_factory, sample_texts, arch):
    import inspect

    if "kl" not in inspect.signature(PerplexityTask).parameters:
        pytest.skip("this evaluation has no KL to the original")
    path = tiny_model_factory(arch)
    lm = load_model(str(path), device="cpu", dtype="float32")
    lw = LayerwiseModel(str(path), device="cpu", dtype="float32")
    plans = _plans(lw.num_layers)[1:]  # the original is not among them: it is added for the reference
    task = PerplexityTask(lw.tokenizer, sample_texts, seq_len=48, batch_size=3, max_windows=4, kl=True)
    got = lw.evaluate([task], plans)[0]
    ref_task = PerplexityTask(lm.tokenizer, sample_texts, seq_len=48, batch_size=3, max_windows=4, kl=True)
    ref_task.keep_reference(lm.model)
    for p, plan in enumerate(plans):
        ref = ref_task.run(plain_forward(surgery.apply_plan(lm.model, plan)))
        assert got[p].kl == pytest.approx(ref.kl, rel=1e-5, abs=1e-9) and ref.kl > 0
        assert got[p].top1_agreement == ref.top1_agreement


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plans_dropping_sublayers_equal_in_memory(tiny_model_factory, sample_texts, tmp_path, arch):
    import dataclasses

    if "drop_attn" not in {f.name for f in dataclasses.fields(PrunePlan)}:
        pytest.skip("this PrunePlan has no sublayer drops")
    path = tiny_model_factory(arch)
    lm = load_model(str(path), device="cpu", dtype="float32")
    lw = LayerwiseModel(str(path), device="cpu", dtype="float32")
    plans = [PrunePlan(6, "remove", drop_attn=(1, 3)), PrunePlan(6, "remove", remove=(2,), drop_mlp=(4,)),
             PrunePlan(6, "remove", drop_attn=(1,), drop_mlp=(1, 5))]
    task = PerplexityTask(lw.tokenizer, sample_texts, seq_len=48, batch_size=3, max_windows=4)
    got = lw.evaluate([task], plans)[0]
    for p, plan in enumerate(plans):
        ref = task.run(plain_forward(surgery.apply_plan(lm.model, plan)))
        assert got[p].perplexity == pytest.approx(ref.perplexity, rel=1e-6)
    # exported shard by shard, dropped sublayers as zeroed output projections: the same folder as in memory
    for p, plan in enumerate(plans):
        ref, got_dir = tmp_path / f"ref{p}", tmp_path / f"lw{p}"
        save_pruned(surgery.apply_plan(lm.model, plan), lm.tokenizer, plan, ref)
        record = export_pruned(lw, plan, got_dir, max_shard_bytes=60_000)
        _assert_same_checkpoint(ref, got_dir)
        assert record["plan"] == plan.to_dict()
        zeroed = [v for k, v in AutoModelForCausalLM.from_pretrained(got_dir).state_dict().items()
                  if (".o_proj." in k or ".attn.c_proj." in k or ".down_proj." in k or ".mlp.c_proj." in k)
                  and k.endswith(".weight") and not v.any()]  # (the tiny gpt2's biases are zeros anyway)
        assert len(zeroed) == len(plan.drop_attn) + len(plan.drop_mlp)


def test_removed_layers_are_never_read(tiny_llama, sample_texts):
    lw = LayerwiseModel(str(tiny_llama), device="cpu", dtype="float32")
    task = PerplexityTask(lw.tokenizer, sample_texts, seq_len=32, batch_size=2, max_windows=2)
    lw.evaluate([task], [PrunePlan(lw.num_layers, "remove", remove=(1, 3, 4))])
    layer_bytes = {i: sum(lw.checkpoint.nbytes(k) for k in lw.checkpoint.meta if k.startswith(f"model.layers.{i}."))
                   for i in range(lw.num_layers)}
    rest = lw.checkpoint.total_bytes - sum(layer_bytes.values())
    assert lw.stats.bytes_read == rest + layer_bytes[0] + layer_bytes[2] + layer_bytes[5]
    assert lw.stats.layers_loaded == 3


def test_layerwise_sweep_rows_equal_in_memory_sweep(tiny_model_factory, sample_texts, questions):
    path = tiny_model_factory("qwen2")
    lm = load_model(str(path), device="cpu", dtype="float32")
    texts = _texts(sample_texts)
    report = analyze(lm.model, lm.tokenizer, texts, CaptureConfig(samples=8, seq_len=40, batch_size=4))
    config = SweepConfig(["bi", "reverse", "magnitude"], [0.0, 0.2, 0.4], seq_len=48, max_windows=4,
                         ppl_batch_size=2, mmlu_batch_size=5)
    ref = sweep(lm.model, lm.tokenizer, report, config, ppl_texts=sample_texts, questions=questions).frame
    lw = LayerwiseModel(str(path), device="cpu", dtype="float32")
    got = layerwise_sweep(lw, report, config, ppl_texts=sample_texts, questions=questions)
    assert list(got.frame.columns) == list(ref.columns)
    assert list(got.frame.removed_layers) == list(ref.removed_layers)
    assert np.allclose(got.frame.perplexity, ref.perplexity, rtol=1e-6)
    assert np.allclose(got.frame.mmlu_accuracy, ref.mmlu_accuracy)
    if "kl" in ref.columns:
        assert np.allclose(got.frame.kl, ref.kl, rtol=1e-5, atol=1e-9, equal_nan=True)
        assert np.allclose(got.frame.top1_agreement, ref.top1_agreement, equal_nan=True)
    # one read per original layer across all plans (shared prefixes computed once)
    assert lw.stats.layers_loaded == lw.num_layers
    assert got.meta["execution"] == "layerwise"


def test_layerwise_sweep_persists_points_and_reads_them_back(tiny_llama, sample_texts, tmp_path):
    lw = LayerwiseModel(str(tiny_llama), device="cpu", dtype="float32")
    plans = [(f"p{i}", 0.0, p) for i, p in enumerate(_plans(lw.num_layers))]
    config = SweepConfig(plans=plans, seq_len=32, max_windows=2, ppl_batch_size=2)
    first = layerwise_sweep(lw, config=config, ppl_texts=sample_texts, runs_dir=tmp_path)
    assert not first.frame.cached.any() and len(list((tmp_path / "sweep" / "points").glob("*.json"))) == 5
    again = layerwise_sweep(LayerwiseModel(str(tiny_llama), device="cpu", dtype="float32"), config=config,
                            ppl_texts=sample_texts, runs_dir=tmp_path)
    assert again.frame.cached.all() and again.stats.computed == 0
    assert list(again.frame.perplexity) == list(first.frame.perplexity)


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2", "gpt_neox"])
def test_export_equals_apply_plan_and_save_pretrained(tiny_model_factory, tmp_path, arch):
    path = tiny_model_factory(arch)
    lm = load_model(str(path), device="cpu", dtype="float32")
    lw = LayerwiseModel(str(path), device="cpu", dtype="float32")
    for i, plan in enumerate(_plans(lw.num_layers)[1:]):
        ref, out = tmp_path / f"ref{i}", tmp_path / f"out{i}"
        save_pruned(surgery.apply_plan(lm.model, plan), lm.tokenizer, plan, ref)
        before = lw.checkpoint.bytes_read
        record = export_pruned(lw, plan, out, max_shard_bytes=60_000)  # several shards
        assert (out / "model.safetensors.index.json").exists()
        _assert_same_checkpoint(ref, out)
        assert record["plan"] == plan.to_dict() and record["meta"]["execution"] == "layerwise"
        kept = sum(lw.checkpoint.nbytes(k) for k in lw.checkpoint.meta)
        assert lw.checkpoint.bytes_read - before <= kept  # removed layers never read


def test_sharded_source_opens_and_analyses_like_the_single_file(tiny_llama, tmp_path, sample_texts):
    lw = LayerwiseModel(str(tiny_llama), device="cpu", dtype="float32")
    sharded = tmp_path / "sharded"
    export_pruned(lw, PrunePlan(lw.num_layers, "remove"), sharded, max_shard_bytes=50_000)
    assert len(Checkpoint(sharded).files) > 2
    texts = _texts(sample_texts)
    config = CaptureConfig(samples=6, seq_len=32, batch_size=3)
    a = lw.analyze(texts, config)
    b = LayerwiseModel(str(sharded), device="cpu", dtype="float32").analyze(texts, config)
    assert a.cosine == b.cosine and a.cka == b.cka


def test_exact_cka_is_refused_with_the_fix(tiny_llama, sample_texts):
    lw = LayerwiseModel(str(tiny_llama), device="cpu", dtype="float32")
    with pytest.raises(LayerLensError, match="cka_estimator=minibatch"):
        lw.analyze(_texts(sample_texts), CaptureConfig(samples=4, seq_len=32, cka_estimator="exact"))


def test_sizes_and_when_layerwise_runs(tiny_llama, tmp_path):
    assert parse_size("1GB") == 2**30 and parse_size("512MB") == 512 * 2**20 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("800k") == 800 * 1024 and parse_size(None) is None and parse_size(4096) == 4096
    with pytest.raises(LayerLensError, match="max_memory"):
        parse_size("lots")
    assert wants_layerwise(str(tiny_llama), max_memory="1KB", device="cpu")
    assert not wants_layerwise(str(tiny_llama), max_memory="1GB", device="cpu")
    assert wants_layerwise(str(tiny_llama), layerwise=True)
    assert not wants_layerwise(str(tiny_llama))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LayerLensError, match="safetensors"):
        Checkpoint(tmp_path)


def test_states_in_memory_mapped_files_give_the_same_numbers(tiny_llama, sample_texts, tmp_path):
    texts = _texts(sample_texts)
    config = CaptureConfig(samples=6, seq_len=32, batch_size=3)
    cpu = LayerwiseModel(str(tiny_llama), device="cpu", dtype="float32", states="cpu")
    disk = LayerwiseModel(str(tiny_llama), device="cpu", dtype="float32", states="disk", work_dir=tmp_path)
    a, b = cpu.analyze(texts, config), disk.analyze(texts, config)
    assert b.meta["layerwise"]["state_device"].startswith("disk")
    assert a.cosine == b.cosine and a.cka == b.cka and a.magnitude == b.magnitude
    task = PerplexityTask(cpu.tokenizer, sample_texts, seq_len=32, batch_size=2, max_windows=3)
    plans = _plans(cpu.num_layers)
    ra, rb = cpu.evaluate([task], plans), disk.evaluate([task], plans)
    assert [r.perplexity for r in ra[0]] == [r.perplexity for r in rb[0]]
    assert not list(tmp_path.iterdir())  # every state file and spill removed


def test_evaluation_progress_counts_layer_runs_and_heads(tiny_llama, sample_texts):
    """The pass reports its work in layer runs (one layer over every batch for one distinct prefix) and the
    LM head's scoring in layers' worth: monotonic, ending at the total, so its rate gives the time left."""
    from layerlens.layerwise import pass_schedule, pass_units

    lw = LayerwiseModel(str(tiny_llama), device="cpu", dtype="float32")
    n = lw.num_layers
    plans = [PrunePlan(n, "remove"), PrunePlan(n, "remove", remove=(n - 1,)), PrunePlan(n, "remove", remove=(1, 2))]
    schedule, finals = pass_schedule(plans, n)
    # unpruned: n runs; the last-layer removal shares all n-1 earlier ones; (1, 2) shares only layer 0 -> n-3 more
    assert pass_units(schedule) == n + (n - 3)
    assert len(set(finals)) == 3
    calls: list[tuple[int, int, str]] = []
    task = PerplexityTask(lw.tokenizer, sample_texts, seq_len=32, batch_size=2, max_windows=2)
    lw.evaluate([task], plans, progress=lambda d, t, label: calls.append((d, t, label)))
    done = [d for d, _, _ in calls]
    total = calls[0][1]
    assert all(t == total for _, t, _ in calls) and done == sorted(done) and done[-1] == total
    assert total == pass_units(schedule) + lw.head_units() * len(plans)
    assert lw.head_units() >= 1 and sum(label.startswith("scoring") for _, _, label in calls) == len(plans)


@pytest.mark.parametrize("sublayers", [False, True])
def test_leave_one_out_layer_by_layer_equals_in_memory(tiny_model_factory, sample_texts, sublayers):
    """Every removal (and with sublayers every attention/MLP drop) in one pass: the in-memory damage numbers."""
    from layerlens.damage import leave_one_out
    from layerlens.layerwise import leave_one_out as layerwise_leave_one_out

    path = tiny_model_factory("qwen2")
    lm = load_model(str(path), device="cpu", dtype="float32")
    ref = leave_one_out(lm.model, lm.tokenizer, sample_texts, sublayers=sublayers, seq_len=32, max_windows=4)
    lw = LayerwiseModel(str(path), device="cpu", dtype="float32")
    got = layerwise_leave_one_out(lw, sample_texts, sublayers=sublayers, seq_len=32, max_windows=4)
    assert got.baseline_ppl == pytest.approx(ref.baseline_ppl, rel=1e-6)
    assert [u.unit for u in got.units] == [u.unit for u in ref.units]
    for a, b in zip(got.units, ref.units, strict=True):
        assert a.ppl == pytest.approx(b.ppl, rel=1e-5) and a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-7)
        assert a.top1 == pytest.approx(b.top1)
    assert got.task == ref.task  # the same windows
    assert lw.stats.layers_loaded == lw.num_layers  # every layer read once for all the removals
    assert got.stats.layer_passes < got.stats.layer_passes_from_scratch
