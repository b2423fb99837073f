"""Benchmark -- Ray: the same sweep on a local Ray with 2 workers vs one process.

The sweep: BI and reverse over --ratios (perplexity on --windows held-out windows of --seq-len tokens;
--mmlu-per-subject adds MMLU), nothing persisted (every point computed). Variants, interleaved (order
rotated per repeat):

* ``single``: ``sweep`` in this process with torch's threads (all cores: the fair baseline);
* ``single-1t``: the same with 1 thread (what each CPU worker gets; its rows must equal Ray's bit for bit);
* ``ray-warm``: ``sweep(..., executor=RayExecutor(workers=2))`` with the actors already started and holding
  the model (a second sweep on the same executor);
* ``ray-cold`` (measured once, first): the same including ``ray.init`` and the actors loading the model.

Reported: seconds of each, the ratios single / ray-warm and single / ray-cold, and whether Ray's rows equal
``single-1t`` exactly. On a 2-core box two 1-thread workers can at best match one 2-thread process (the
work is split, not multiplied); what Ray buys is scale-out to more GPUs and machines, which one box cannot
show. On the project's shared 2-core machine the numbers are taken under load from other processes (the
load average is recorded).
"""

from __future__ import annotations

import time

import common


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--mmlu-per-subject", type=int, default=0, help="0: perplexity only")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.ratios, args.seq_len, args.windows = "0,0.2", 64, 2
    common.setup_torch(args)

    import ray
    import torch

    from layerlens.data import load_texts
    from layerlens.distributed import ModelSpec, RayExecutor
    from layerlens.metrics import CaptureConfig, analyze
    from layerlens.questions import load_questions
    from layerlens.sweep import SweepConfig, sweep

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = str(next(model.parameters()).device)
    machine = common.machine_info(device, common.model_dtype(model))
    threads = torch.get_num_threads()
    report = analyze(model, tok, load_texts("default", role="calibration"), CaptureConfig(samples=4, seq_len=64))
    config = SweepConfig(["bi", "reverse"], [float(r) for r in args.ratios.split(",")], seq_len=args.seq_len,
                         max_windows=args.windows)
    data = dict(ppl_texts=load_texts("default", role="eval"),
                questions=load_questions("default", limit=args.mmlu_per_subject) if args.mmlu_per_subject else None)

    def single(n_threads: int):
        def run():
            torch.set_num_threads(n_threads)
            try:
                return sweep(model, tok, report, config, **data).frame
            finally:
                torch.set_num_threads(threads)
        return run

    executor = RayExecutor(ModelSpec.of(loaded.info), workers=args.workers)
    t0 = time.perf_counter()
    cold = sweep(model, tok, report, config, executor=executor, **data).frame
    cold_s = time.perf_counter() - t0
    print(f"ray-cold: {cold_s:.1f} s", flush=True)
    variants = {"single": single(threads), "single-1t": single(1),
                "ray-warm": lambda: sweep(model, tok, report, config, executor=executor, **data).frame}
    times: dict[str, list[float]] = {k: [] for k in variants}
    frames = {}
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dt, frames[name] = common.timed(variants[name], device)
            times[name].append(dt)
            print(f"{name}: {dt:.1f} s", flush=True)
    executor.close()
    if ray.is_initialized():
        ray.shutdown()

    cols = ["perplexity", "mmlu_accuracy", "mmlu_prob_correct"]
    exact = all(frames["ray-warm"][c].equals(frames["single-1t"][c]) and cold[c].equals(frames["single-1t"][c])
                for c in cols)
    close = float((frames["ray-warm"].perplexity / frames["single"].perplexity - 1).abs().max())
    med = {k: common.median(v) for k, v in times.items()}
    rows = [{"variant": k, "seconds": med[k], "points": len(frames[k])} for k in names]
    rows.append({"variant": "ray-cold (init + load)", "seconds": cold_s, "points": len(cold)})
    common.print_table(rows, f"Sweep: one process ({threads} threads) vs local Ray ({args.workers} workers x 1 thread)")
    warm = med["single"] / med["ray-warm"]
    cold_ratio = med["single"] / cold_s
    print(f"single / ray-warm = {warm:.2f}x, single / ray-cold = {cold_ratio:.2f}x, "
          f"single-1t / ray-warm = {med['single-1t'] / med['ray-warm']:.2f}x; Ray rows == 1-thread rows bit for bit: "
          f"{exact}; max relative perplexity difference vs {threads} threads: {close:.2e}")
    common.write_result("ray", args, machine, {
        "ratios": args.ratios, "seq_len": args.seq_len, "windows": args.windows,
        "mmlu_per_subject": args.mmlu_per_subject, "workers": args.workers, "repeats": args.repeats,
        "threads_single": threads}, {
        "seconds": med, "raw": times, "ray_cold_seconds": cold_s, "speedup_warm": warm, "speedup_cold": cold_ratio,
        "bit_identical_to_1_thread": exact, "max_rel_ppl_diff_vs_single": close}, rows)


if __name__ == "__main__":
    main()
