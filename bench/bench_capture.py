"""Benchmark 1 -- capture overhead: ``layerlens.metrics.analyze`` (all metrics) vs bare forward passes.

Same calibration batches, three (four with --proposed) variants run interleaved, order rotated each
round, after one untimed warm-up of each:

* ``analyze``          -- the library call (tokenization + hooks + every metric: cosine, CKA, BI, block
                          distance, magnitude);
* ``backbone``         -- ``model.base_model(...)`` over the same batches (the exact call analyze makes);
* ``full``             -- ``model(...)`` over the same batches (backbone + LM head logits);
* ``analyze_proposed`` -- (--proposed) analyze with ``BufferedCapture`` (hooks copy into one reused block)
                          and ``proposed_update`` of bench/accumulate_steps.py patched in, in this
                          process only: what the suggested library fix would give.

Target: analyze / backbone <= 1.15 (median of per-round ratios). Then, unless --no-profile: cProfile of
one analyze call (forward vs ``_Accumulators.update``), and the update split into its steps on the
states of one real batch (bench/accumulate_steps.py), each as a fraction of one backbone forward.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections import defaultdict

import common
import torch


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cka", default="minibatch", choices=["minibatch", "exact"])
    p.add_argument("--proposed", action="store_true", help="also time analyze with the proposed update")
    p.add_argument("--proposed-gram", default="float32", choices=["float64", "float32"],
                   help="Gram dtype of the proposed update in analyze_proposed (float32, like the library)")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.samples, args.seq_len, args.repeats = 4, 64, 2
    common.setup_torch(args)

    import accumulate_steps as steps

    from layerlens.capture import ResidualCapture
    from layerlens.data import batches, calibration_tokens, load_texts
    from layerlens.metrics import CaptureConfig, _Accumulators, analyze

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    texts = load_texts("default", role="calibration")
    cfg = CaptureConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                        cka_estimator=args.cka)
    token_lists = calibration_tokens(tok, texts, args.samples, args.seq_len)
    bl = list(batches(tok, token_lists, args.batch_size, device))
    n_tokens = sum(b.num_tokens for b in bl)
    print(f"{len(token_lists)} samples, {n_tokens} tokens, {len(bl)} batches of <= {args.batch_size} x "
          f"{args.seq_len}; {machine['torch_threads']} threads; load {machine['loadavg_start']}")

    def run_analyze():
        return analyze(model, tok, texts, cfg)

    def run_backbone():
        with torch.inference_mode():
            for b in bl:
                model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def run_full():
        with torch.inference_mode():
            for b in bl:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    original_update = _Accumulators.update
    gram_dtype = torch.float64 if args.proposed_gram == "float64" else torch.float32

    def patched_update(self, states, mask):
        sums = {"cos": self.cos_sum, "mag": self.mag_sum, "hsic": self.hsic_sum}
        self.tokens += int(mask.sum())
        bufs = self.__dict__.setdefault("_bench_bufs", {})
        self.cka_minibatches += steps.proposed_update(states, mask, sums, bufs=bufs, gram_dtype=gram_dtype)

    import layerlens.metrics as metrics_module

    def run_proposed():
        _Accumulators.update = patched_update
        metrics_module.ResidualCapture = steps.BufferedCapture
        try:
            return analyze(model, tok, texts, cfg)
        finally:
            _Accumulators.update = original_update
            metrics_module.ResidualCapture = ResidualCapture

    variants = {"analyze": run_analyze, "backbone": run_backbone, "full": run_full}
    if args.proposed and args.cka == "minibatch":
        variants["analyze_proposed"] = run_proposed
    print("warm-up")
    for fn in variants.values():
        fn()
    if "analyze_proposed" in variants:
        a, b = run_analyze(), run_proposed()
        diff = max(abs(x - y) for ra, rb in ((a.cosine, b.cosine), (a.cka, b.cka)) for xa, xb in zip(ra, rb, strict=True)
                   for x, y in zip(xa, xb, strict=True))
        proposed_max_abs_diff = max(diff, max(abs(x - y) for x, y in zip(a.magnitude, b.magnitude, strict=True)))
        print(f"proposed update: max |diff| of cosine/CKA/magnitude vs library = {proposed_max_abs_diff:.2e}")
    else:
        proposed_max_abs_diff = None
    print(f"timing: {args.repeats} interleaved rounds")
    times = common.interleaved(variants, args.repeats, device)
    med = {k: common.median(v) for k, v in times.items()}
    ratios = {
        "analyze/backbone": common.median(common.paired_ratios(times["analyze"], times["backbone"])),
        "analyze/full": common.median(common.paired_ratios(times["analyze"], times["full"])),
        "full/backbone": common.median(common.paired_ratios(times["full"], times["backbone"])),
    }
    if "analyze_proposed" in times:
        ratios["analyze_proposed/backbone"] = common.median(
            common.paired_ratios(times["analyze_proposed"], times["backbone"]))
    rows = [{"variant": k, "median_s": med[k], "min_s": min(times[k]), "tokens_per_s": n_tokens / med[k],
             "vs_backbone": med[k] / med["backbone"]} for k in variants]
    common.print_table(rows, "capture overhead (median of interleaved rounds)")
    print("\nmedian of per-round ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    print(f"target analyze/backbone <= 1.15: {common.verdict(ratios['analyze/backbone'], 1.15)}")

    profile: dict = {}
    if not args.no_profile:
        # cProfile of one analyze call: where its wall time goes.
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        analyze(model, tok, texts, cfg)
        prof.disable()
        total = time.perf_counter() - t0
        st = pstats.Stats(prof)
        cum = defaultdict(float)
        for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            if file.endswith("layerlens/metrics.py") and func in ("update", "finish"):
                cum[f"accumulators.{func}"] += ct
            elif file.endswith("layerlens/capture.py") and func in ("hook", "_pre_hook", "take"):
                cum["capture hooks"] += ct
            elif file.endswith("layerlens/data.py") and func in ("calibration_tokens",):
                cum["tokenization"] += ct
            elif file.endswith("layerlens/data.py") and func == "batches":
                cum["batching"] += ct
        fwd = [ct for (file, _l, func), (_a, _b, _c, ct, _d) in st.stats.items()  # type: ignore[attr-defined]
               if file.endswith("modeling_llama.py") and func == "forward"]
        cum["backbone forward (incl. hooks)"] = max(fwd) if fwd else float("nan")
        profile["cprofile_analyze_s"] = total
        profile["cprofile_parts_s"] = dict(cum)
        prof_rows = [{"part": k, "seconds": v, "share_of_analyze": v / total} for k, v in cum.items()]
        common.print_table(prof_rows, f"cProfile of one analyze call ({total:.2f} s)")

        if args.cka == "minibatch":
            # The update's steps on the states of one real (first) batch.
            b0 = bl[0]
            with ResidualCapture(model) as cap, torch.inference_mode():
                fwd_t, _ = common.timed(lambda: model.base_model(input_ids=b0.input_ids,
                                                                 attention_mask=b0.attention_mask,
                                                                 use_cache=False), device)
                states = cap.take()
                hidden = states[0].shape[-1]
                mirror = steps.new_sums(len(states), device)
                steps.current_steps(states, b0.attention_mask, mirror, defaultdict(float))
                lib = steps.library_sums(states, b0.attention_mask, hidden)
                check = steps.max_rel_diff(mirror, lib)
                assert max(check.values()) < 1e-9, f"the step mirror drifted from the library: {check}"
                bufs: dict = {}
                prop = steps.new_sums(len(states), device)
                steps.proposed_update(states, b0.attention_mask, prop, bufs=bufs)
                prop_diff = steps.max_rel_diff(prop, lib)
                prop64 = steps.new_sums(len(states), device)
                steps.proposed_update(states, b0.attention_mask, prop64, gram_dtype=torch.float64, bufs=bufs)
                prop64_diff = steps.max_rel_diff(prop64, lib)
                fwd_times = [common.timed(lambda: model.base_model(input_ids=b0.input_ids,
                                                                   attention_mask=b0.attention_mask,
                                                                   use_cache=False), device)[0]
                             for _ in range(3)]
                cur = steps.time_steps(steps.current_steps, states, b0.attention_mask, args.repeats)
                new = steps.time_steps(steps.proposed_update, states, b0.attention_mask, args.repeats, bufs=bufs)
                new64 = steps.time_steps(steps.proposed_update, states, b0.attention_mask, args.repeats,
                                         bufs=bufs, gram_dtype=torch.float64)
            fwd_med = common.median(fwd_times + [fwd_t])
            step_rows = [{"step (library update)": k, "ms_per_batch": 1000 * v,
                          "pct_of_backbone_fwd": 100 * v / fwd_med} for k, v in cur.items()]
            step_rows.append({"step (library update)": "TOTAL", "ms_per_batch": 1000 * sum(cur.values()),
                              "pct_of_backbone_fwd": 100 * sum(cur.values()) / fwd_med})
            common.print_table(step_rows, f"update steps on one batch {tuple(b0.input_ids.shape)} "
                                          f"(backbone forward {fwd_med * 1000:.0f} ms)")
            new_rows = [{"step (proposed update)": k, "ms_per_batch": 1000 * v,
                         "pct_of_backbone_fwd": 100 * v / fwd_med} for k, v in new.items()]
            new_rows.append({"step (proposed update)": "TOTAL", "ms_per_batch": 1000 * sum(new.values()),
                             "pct_of_backbone_fwd": 100 * sum(new.values()) / fwd_med})
            common.print_table(new_rows, "proposed update (bench/accumulate_steps.py, float32 Gram), same batch, "
                                         "buffers reused as across batches")
            print(f"proposed (float32 Gram) vs library sums: max rel diff {prop_diff}")
            print(f"proposed with float64 Gram: total {1000 * sum(new64.values()):.0f} ms "
                  f"({100 * sum(new64.values()) / fwd_med:.1f}% of forward; Gram "
                  f"{1000 * new64.get('CKA: batched Gram', 0):.0f} ms); max rel diff {prop64_diff}")
            profile.update(batch_shape=list(b0.input_ids.shape), backbone_forward_s=fwd_med,
                           library_steps_s=cur, proposed_steps_s=new, proposed_vs_library=prop_diff,
                           proposed_f64_steps_s=new64, proposed_f64_vs_library=prop64_diff)

    rows_out = [{"figure": "analyze / backbone forward", "ratio": ratios["analyze/backbone"], "target": "<= 1.15",
                 "verdict": common.verdict(ratios["analyze/backbone"], 1.15)},
                {"figure": "analyze / full-model forward", "ratio": ratios["analyze/full"], "target": "",
                 "verdict": ""}]
    if "analyze_proposed/backbone" in ratios:
        rows_out.append({"figure": "analyze with proposed update / backbone",
                         "ratio": ratios["analyze_proposed/backbone"], "target": "<= 1.15",
                         "verdict": common.verdict(ratios["analyze_proposed/backbone"], 1.15)})
    common.write_result("capture", args, machine, {
        "samples": len(token_lists), "tokens": n_tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "cka_estimator": args.cka, "repeats": args.repeats, "data": "default (Shakespeare calibration)",
        "proposed_gram": args.proposed_gram if args.proposed else None},
        {"times_s": times, "median_s": med, "ratios": ratios, "proposed_max_abs_diff": proposed_max_abs_diff,
         "profile": profile}, rows_out)


if __name__ == "__main__":
    main()
