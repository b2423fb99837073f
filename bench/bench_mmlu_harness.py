"""Benchmark 4 -- MMLU scoring: ``layerlens.evaluation.mmlu`` vs lm-evaluation-harness (``lm-eval==0.4.13``).

``--shots K`` (e.g. 5): both sides use the same examples, the first K questions of each subject in the
bundled full test set (written to the harness as each task's ``dev`` split, its ``first_n`` sampler takes
them in order); the scored questions are the bundled subset minus those examples (LayerLens's rule). The
LayerLens side runs each subject's shared few-shot prefix once into a KV cache. Target for 5-shot: >= 3x.
``--prefix-cache`` also turns the cache on for 0-shot (the shared description only). ``--subjects a,b``
keeps the run short on a CPU (the ratio depends on questions per subject, not on the number of subjects).

Same questions (default: the bundled subset, 2 per subject = 114), same model OBJECT, same batch size:

* harness: ``lm_eval.simple_evaluate`` with ``HFLM(pretrained=model, tokenizer=tokenizer, batch_size=B)`` on
  57 local tasks written to a temporary folder: one per subject, each ``include``-ing a copy of the
  harness's own ``mmlu/default/_default_template_yaml`` where only the dataset moves to a local jsonl
  (``dataset_path: json``; the prompt, choices, target, few-shot split and metric lines are the harness's,
  asserted), with the description copied from the harness's ``mmlu_<subject>.yaml``; 0-shot.
* LayerLens: ``layerlens.evaluation.mmlu(model, tokenizer, questions, batch_size=B)``.

Checks: the per-question choice (argmax of the four log-likelihoods) identical for every question
(asserted), and the max |log-likelihood difference| printed. Timing, interleaved, order rotated:
``harness_scoring`` = the time inside ``HFLM.loglikelihood`` (tokenization + forwards + scoring, the part
that corresponds to ``layerlens.mmlu``); ``harness_total`` = the whole ``simple_evaluate`` call (plus task
and dataset loading). Target: harness_scoring / layerlens >= 2 (goal), >= 1 (at least as fast).
--profile adds a cProfile of each side (top functions by own time).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the harness's progress bars

import common  # noqa: E402


def harness_template() -> tuple[dict, Path]:
    import lm_eval
    import yaml

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    return yaml.safe_load((folder / "_default_template_yaml").read_text()), folder


def write_tasks(questions, folder: Path, examples: dict | None = None) -> list[str]:
    """One harness task per subject (jsonl + yaml), mirroring lm-eval's mmlu/default; returns task names."""
    import yaml

    template, harness_dir = harness_template()
    local = dict(template)
    local["dataset_path"] = "json"
    local.pop("dataset_name", None)
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "output_type", "test_split", "fewshot_split",
                "fewshot_config", "metric_list"):
        assert local.get(key) == template.get(key), key
    (folder / "_bench_template_yaml").write_text(yaml.safe_dump(local, sort_keys=False))
    by_subject: dict[str, list] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    names = []
    for subject, qs in by_subject.items():
        data = folder / f"{subject}.jsonl"
        with data.open("w", encoding="utf-8") as f:
            for q in qs:
                f.write(json.dumps({"question": q.question, "subject": subject, "choices": list(q.choices),
                                    "answer": int(q.answer)}) + "\n")
        harness_yaml = harness_dir / f"mmlu_{subject}.yaml"
        description = yaml.safe_load(harness_yaml.read_text())["description"] if harness_yaml.exists() else \
            f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
        name = f"bench_mmlu_{subject}"
        # The dev split is only there because the template names it; 0-shot never reads it.
        cfg = {"task": name, "include": "_bench_template_yaml", "description": description,
               "dataset_kwargs": {"data_files": {"test": str(data), "dev": str(data)}}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        if examples:  # the few-shot examples as the dev split (first_n takes them in this order)
            dev = folder / f"{subject}_dev.jsonl"
            with dev.open("w", encoding="utf-8") as f:
                for q in examples[subject]:
                    f.write(json.dumps({"question": q.question, "subject": subject, "choices": list(q.choices),
                                        "answer": int(q.answer)}) + "\n")
            cfg["dataset_kwargs"]["data_files"]["dev"] = str(dev)
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        names.append(name)
    return names


def _top(prof: cProfile.Profile, n: int = 12) -> list[dict]:
    st = pstats.Stats(prof, stream=io.StringIO())
    items = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:n]  # type: ignore[attr-defined]
    return [{"function": f"{Path(f).name}:{ln}({fn})", "own_s": tt, "cum_s": ct}
            for (f, ln, fn), (_cc, _nc, tt, ct, _callers) in items]


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--per-subject", type=int, default=2, help="questions per subject (57 subjects)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples (first K of each subject)")
    p.add_argument("--subjects", default=None, help="comma-separated subjects (default: all 57)")
    p.add_argument("--prefix-cache", action="store_true", help="LayerLens prefix KV cache at 0-shot too")
    p.add_argument("--no-warmup", action="store_true", help="one timed round, its outputs compared (slow CPUs)")
    args = p.parse_args()
    if args.quick:
        args.per_subject, args.repeats = 1, 1
    common.setup_torch(args)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from layerlens.evaluation import fewshot_examples, mmlu
    from layerlens.questions import load_questions

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    qset = load_questions("default", limit=args.per_subject, subjects=args.subjects)
    questions = list(qset.questions)
    if args.quick:
        questions = questions[:12]
    pool, examples = None, None
    if args.shots:
        pool = list(load_questions("full", subjects=args.subjects))
        examples = {s: fewshot_examples(s, pool, args.shots) for s in dict.fromkeys(q.subject for q in questions)}
        questions = [q for q in questions if q not in examples[q.subject]]  # examples are never scored
    print(f"{len(questions)} questions, {args.shots}-shot, batch size {args.batch_size}; "
          f"load {machine['loadavg_start']}")

    tmp = tempfile.TemporaryDirectory(prefix="bench-lmeval-")
    folder = Path(tmp.name)
    names = write_tasks(questions, folder, examples)
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    scoring_s: list[float] = []
    original_ll = hflm.loglikelihood

    def timed_ll(requests, *a, **kw):
        t = time.perf_counter()
        out = original_ll(requests, *a, **kw)
        scoring_s.append(time.perf_counter() - t)
        return out

    hflm.loglikelihood = timed_ll  # type: ignore[method-assign]

    import contextlib
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    def run_harness():
        with contextlib.redirect_stderr(io.StringIO()):  # the harness's progress bars and notices
            return lm_eval.simple_evaluate(model=hflm, tasks=names, num_fewshot=args.shots, log_samples=True,
                                           task_manager=tm, bootstrap_iters=0, verbosity="ERROR")

    def run_layerlens():
        return mmlu(model, tok, questions, shots=args.shots, dev=pool, batch_size=args.batch_size,
                    prefix_cache=True if args.prefix_cache or args.shots else None)

    if args.no_warmup:  # one timed round; its outputs are the ones compared
        t_h, harness_out = common.timed(run_harness, device)
        t_l, ll_out = common.timed(run_layerlens, device)
        times = {"harness_total": [t_h], "layerlens": [t_l]}
    else:
        print("warm-up (untimed): both once")
        harness_out = run_harness()
        ll_out = run_layerlens()
        scoring_s.clear()
        times = common.interleaved({"harness_total": run_harness, "layerlens": run_layerlens}, args.repeats, device)
    times["harness_scoring"] = list(scoring_s)

    # Per-question comparison (from the warm-up runs: the numbers do not depend on timing).
    index = {}
    per_subject_pos: dict[str, int] = {}
    for i, q in enumerate(questions):
        index[(q.subject, per_subject_pos.get(q.subject, 0))] = i
        per_subject_pos[q.subject] = per_subject_pos.get(q.subject, 0) + 1
    harness_choice = [None] * len(questions)
    harness_ll = [None] * len(questions)
    for task, samples in harness_out["samples"].items():
        subject = task.removeprefix("bench_mmlu_")
        for s in samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            i = index[(subject, int(s["doc_id"]))]
            harness_ll[i] = lls
            harness_choice[i] = max(range(4), key=lambda k, lls=lls: (lls[k], -k))
    assert all(c is not None for c in harness_choice), "some questions missing from the harness samples"
    mismatches = [i for i, c in enumerate(harness_choice) if c != ll_out.choices[i]]
    max_ll_diff = max(abs(a - b) for i in range(len(questions))
                      for a, b in zip(harness_ll[i], ll_out.loglikelihoods[i], strict=True))
    harness_acc = sum(c == q.answer for c, q in zip(harness_choice, questions, strict=True)) / len(questions)
    print(f"per-question choices identical: {not mismatches} ({len(questions) - len(mismatches)}/{len(questions)});"
          f" max |loglikelihood diff| {max_ll_diff:.2e}; accuracy harness {harness_acc:.4f}, "
          f"layerlens {ll_out.accuracy:.4f}")

    med = {k: common.median(v) for k, v in times.items()}
    ratios = {"harness_scoring/layerlens": common.median(common.paired_ratios(times["harness_scoring"],
                                                                              times["layerlens"])),
              "harness_total/layerlens": common.median(common.paired_ratios(times["harness_total"],
                                                                            times["layerlens"]))}
    rows = [{"variant": k, "median_s": v, "questions_per_s": len(questions) / v} for k, v in med.items()]
    common.print_table(rows, f"MMLU, {len(questions)} questions (median of {args.repeats} interleaved rounds)")
    print("\n" + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    r = ratios["harness_scoring/layerlens"]
    goal = 3.0 if args.shots else 2.0
    print(f"LayerLens at least as fast: {common.verdict(r, 1.0, True)}; goal {goal:g}x: {common.verdict(r, goal, True)}")

    profile = {}
    if args.profile:
        for name, fn in (("harness", run_harness), ("layerlens", run_layerlens)):
            prof = cProfile.Profile()
            prof.enable()
            fn()
            prof.disable()
            profile[name] = _top(prof)
            common.print_table(profile[name], f"cProfile {name}: top functions by own time")

    tmp.cleanup()
    assert not mismatches, f"{len(mismatches)} questions choose differently: {mismatches[:10]}"
    target = 3.0 if args.shots else 2.0
    common.write_result("mmlu_harness" + (f"_{args.shots}shot" if args.shots else ""), args, machine, {
        "questions": len(questions), "per_subject": args.per_subject, "batch_size": args.batch_size,
        "repeats": 1 if args.no_warmup else args.repeats, "shots": args.shots, "subjects": args.subjects,
        "prefix_cache": bool(args.prefix_cache or args.shots), "lm_eval": machine.get("lm_eval"),
        "tasks": len(names)},
        {"times_s": times, "median_s": med, "ratios": ratios, "choices_identical": not mismatches,
         "max_loglikelihood_abs_diff": max_ll_diff, "accuracy": {"harness": harness_acc,
                                                                 "layerlens": ll_out.accuracy},
         "profile": profile},
        [{"figure": "harness scoring / layerlens.mmlu time", "ratio": r, "target": f">= {target:g} (goal), >= 1",
          "verdict": common.verdict(r, target, True) if r >= target else (
              f"met (>= 1), goal {target:g}x not" if r >= 1 else "NOT met")},
         {"figure": "harness simple_evaluate / layerlens.mmlu time", "ratio": ratios["harness_total/layerlens"],
          "target": "", "verdict": ""},
         {"figure": "per-question choices identical", "ratio": float(not mismatches), "target": "1",
          "verdict": "met" if not mismatches else "NOT met"}])


if __name__ == "__main__":
    main()
