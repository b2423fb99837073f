"""Benchmark 2 -- memory flat in data size: peak extra memory of analyze with 8x the samples vs 1x.

Each measurement runs in a FRESH subprocess: load the model, then (CPU) reset the RSS high-water mark
(``/proc/self/clear_refs`` 5, which also resets ``getrusage().ru_maxrss``; where that is not allowed, the
high-water mark of loading is the baseline) and record the current RSS; run ``analyze``; the peak extra
memory is ``ru_maxrss`` after minus RSS before. On CUDA it is ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` minus the allocated bytes before. ``tracemalloc`` reports the Python-heap
peak as well (token lists and other Python objects). 1x and 8x children alternate, ``--repeats`` each.

Target: median peak(8x) / median peak(1x) <= 1.1.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time

import common


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        m = re.search(rf"^{field}:\s+(\d+)", f.read(), re.M)
    return int(m.group(1)) if m else 0


def child(args) -> None:
    import tracemalloc

    import torch

    common.setup_torch(args)
    from layerlens.data import load_texts
    from layerlens.metrics import CaptureConfig, analyze

    loaded = common.load(args)
    texts = load_texts("default", role="calibration")
    cfg = CaptureConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                        cka_estimator=args.cka)
    cuda = args.device.startswith("cuda")
    model = loaded.model
    with torch.no_grad():  # page the weights in (safetensors loads lazily): they are the baseline, not analyze
        for prm in model.parameters():
            prm.sum()
    if args.warmup:  # optional: one tiny forward first, so one-time library set-up is in the baseline too
        from layerlens.data import batches, calibration_tokens

        ids = calibration_tokens(loaded.tokenizer, texts, 1, 8)
        with torch.inference_mode():
            for b in batches(loaded.tokenizer, ids, 1, next(model.parameters()).device):
                model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    reset = False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    rss_before = _status_kib("VmRSS") * 1024
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    trace: list[list[int]] = []

    def progress(done: int, total: int, _msg: str) -> None:  # RSS and high-water mark after each batch
        trace.append([_status_kib("VmRSS") * 1024, _status_kib("VmHWM") * 1024])

    tracemalloc.start()
    t = time.perf_counter()
    report = analyze(model, loaded.tokenizer, texts, cfg, progress=progress)
    seconds = time.perf_counter() - t
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"model_bytes": sum(t.untyped_storage().nbytes() for t in
                              {id(x): x for x in list(model.parameters()) + list(model.buffers())}.values()),
           "samples": report.meta["samples"], "tokens": report.meta["tokens"], "seconds": seconds,
           "hwm_reset": reset, "rss_before": rss_before, "maxrss_before": maxrss_before,
           "maxrss_after": maxrss_after,
           "peak_extra_rss": maxrss_after - (rss_before if reset else maxrss_before),
           "python_heap_peak": py_peak, "trace_rss_hwm": trace}
    if cuda:
        torch.cuda.synchronize()
        out["cuda_peak_extra"] = torch.cuda.max_memory_allocated() - cuda_before
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8, help="the 1x sample count")
    p.add_argument("--factor", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cka", default="minibatch", choices=["minibatch", "exact"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", action="store_true", help="one tiny forward before the baseline is taken")
    p.add_argument("--diagnose", action="store_true",
                   help="also measure with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=1 MiB): "
                        "allocator growth vs kept data")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    args = p.parse_args()
    if args.quick:
        args.samples, args.batch_size, args.seq_len, args.repeats, args.factor = 2, 2, 32, 1, 4
    if args.child:
        child(args)
        return
    common.setup_torch(args)
    machine = common.machine_info(args.device)
    sizes = {"1x": args.samples, f"{args.factor}x": args.samples * args.factor}
    variants = {"library": ({}, [])}
    if args.diagnose:
        variants["library, MALLOC_MMAP_THRESHOLD_=1MiB"] = ({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}, [])
    results_by_variant = {}
    key = "cuda_peak_extra" if args.device.startswith("cuda") else "peak_extra_rss"
    big = f"{args.factor}x"
    for vname, (venv, vflags) in variants.items():
        print(f"variant: {vname}")
        runs = measure(args, sizes, dict(os.environ, **venv), vflags)
        med = {k: common.median([x[key] for x in v]) for k, v in runs.items()}
        results_by_variant[vname] = {"runs": runs, "median_peak_extra_bytes": med, "ratio": med[big] / med["1x"]}
    runs = results_by_variant["library"]["runs"]
    med = results_by_variant["library"]["median_peak_extra_bytes"]
    py = {k: common.median([x["python_heap_peak"] for x in v]) for k, v in runs.items()}
    ratio = med[big] / med["1x"]
    rows = [{"size": k, "samples": runs[k][0]["samples"], "tokens": runs[k][0]["tokens"],
             "peak_extra_MiB": med[k] / 2**20, "python_heap_peak_MiB": py[k] / 2**20,
             "seconds": common.median([x["seconds"] for x in runs[k]])} for k in sizes]
    common.print_table(rows, f"peak extra memory over the loaded model ({key}, median of {args.repeats})")
    print(f"\npeak({big}) / peak(1x) = {ratio:.3f}  (target <= 1.1: {common.verdict(ratio, 1.1)})")
    var_rows = [{"variant": v, "peak_1x_MiB": r["median_peak_extra_bytes"]["1x"] / 2**20,
                 f"peak_{big}_MiB": r["median_peak_extra_bytes"][big] / 2**20, "ratio": r["ratio"]}
                for v, r in results_by_variant.items()]
    if len(var_rows) > 1:
        common.print_table(var_rows, "diagnosis")
    machine["dtype"] = "model default" if args.dtype == "auto" else args.dtype
    common.write_result("memory", args, machine, {
        "samples_1x": args.samples, "factor": args.factor, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "cka_estimator": args.cka, "repeats": args.repeats, "measure": key, "warmup_forward": args.warmup},
        {"variants": results_by_variant, "median_python_heap_peak": py, "ratio": ratio},
        [{"figure": f"peak extra memory {big} / 1x samples", "ratio": ratio, "target": "<= 1.1",
          "verdict": common.verdict(ratio, 1.1)}] + rows + [
            {"figure": f"diagnosis: {r['variant']}", "ratio": r["ratio"], "peak_1x_MiB": r["peak_1x_MiB"],
             f"peak_{big}_MiB": r[f"peak_{big}_MiB"]} for r in var_rows[1:]])


def measure(args, sizes: dict[str, int], env: dict[str, str], flags: list[str]) -> dict[str, list[dict]]:
    """Alternate fresh child processes for each size, ``args.repeats`` rounds."""
    runs: dict[str, list[dict]] = {k: [] for k in sizes}
    for r in range(args.repeats):
        order = list(sizes) if r % 2 == 0 else list(sizes)[::-1]
        for name in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--samples", str(sizes[name]),
                   "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--cka", args.cka,
                   "--model", args.model, "--device", args.device, "--dtype", args.dtype, *flags]
            cmd += ["--warmup"] if args.warmup else []
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"child failed ({name}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(line[len("RESULT "):])
            runs[name].append(res)
            print(f"  round {r + 1}/{args.repeats} {name}: {res['samples']} samples, {res['tokens']} tokens, "
                  f"peak extra RSS {res['peak_extra_rss'] / 2**20:.1f} MiB"
                  + (f", CUDA {res['cuda_peak_extra'] / 2**20:.1f} MiB" if "cuda_peak_extra" in res else "")
                  + f", python heap peak {res['python_heap_peak'] / 2**20:.2f} MiB, {res['seconds']:.1f} s")
    return runs


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
