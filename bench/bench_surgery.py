"""Benchmark 6 -- surgery: ``layerlens.surgery.apply_plan`` on the default model, time and extra memory.

Two plans from a small analysis of the default model (not timed): a ``remove`` plan (BI, --ratio) and an
SLM ``merge`` plan (sliding layer merging driven by --ratio as its target). For each: median wall time of
``apply_plan`` over --repeats calls (the first, cold call reported too), and the extra bytes = the sum of
the storages of the new model's parameters and buffers that are NOT storages of the original
(``untyped_storage().data_ptr()`` sets). The obvious alternative, ``copy.deepcopy(model)`` followed by
dropping the layers, is timed and measured the same way for the ratio.

Targets: time <= 1 s and (model bytes + extra bytes) / model bytes <= 1.1.
"""

from __future__ import annotations

import copy

import common
import torch


def storages(model: torch.nn.Module) -> dict[int, int]:
    """data_ptr -> nbytes of every distinct storage behind the model's parameters and buffers."""
    out: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def extra_bytes(new: torch.nn.Module, original: dict[int, int]) -> int:
    return sum(n for ptr, n in storages(new).items() if ptr not in original)


def deepcopy_prune(model: torch.nn.Module, plan) -> torch.nn.Module:
    """The obvious alternative: a full deep copy, then keep only the plan's layers (remove plans)."""
    from layerlens.adapters import adapter_for, decoder_layers, set_attr

    new = copy.deepcopy(model)
    layers = decoder_layers(new)
    set_attr(new, adapter_for(new).layers, torch.nn.ModuleList([layers[i] for i in plan.kept_layers]))
    return new


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.25, help="BI ratio and SLM target ratio")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--samples", type=int, default=8, help="analysis samples for the plans (not timed)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.samples = 3, 2
    common.setup_torch(args)

    from layerlens.data import load_texts
    from layerlens.metrics import CaptureConfig, analyze
    from layerlens.plans import make_plan, slm_plan
    from layerlens.surgery import apply_plan

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    report = analyze(model, tok, load_texts("default", role="calibration"),
                     CaptureConfig(samples=args.samples, seq_len=128, batch_size=8))
    plans = {"remove (bi)": make_plan("bi", report, ratio=args.ratio)}
    merge = slm_plan(report, target_ratio=args.ratio)
    if not merge.merge:
        merge = slm_plan(report, target_ratio=args.ratio, criterion="cosine")
    plans["merge (slm)"] = merge
    for name, plan in plans.items():
        print(f"{name}: {plan.describe()}")

    original = storages(model)
    model_bytes = sum(original.values())
    print(f"model: {model_bytes / 2**20:.1f} MiB in {len(original)} storages; load {machine['loadavg_start']}")
    rows, results = [], {}
    for name, plan in plans.items():
        cold, new = common.timed(lambda plan=plan: apply_plan(model, plan), device)
        extra = extra_bytes(new, original)
        n_layers = len(list(new.model.layers)) if hasattr(new, "model") else None
        del new
        times = []
        for _ in range(args.repeats):
            dt, new = common.timed(lambda plan=plan: apply_plan(model, plan), device)
            times.append(dt)
            del new
        med = common.median(times)
        mem_ratio = (model_bytes + extra) / model_bytes
        results[name] = {"plan": plan.to_dict(), "cold_s": cold, "times_s": times, "median_s": med,
                         "extra_bytes": extra, "memory_ratio": mem_ratio, "layers_after": n_layers}
        rows.append({"plan": name, "groups/removed": str(list(plan.merge) or list(plan.removed_layers)),
                     "median_ms": 1000 * med, "cold_ms": 1000 * cold, "extra_MiB": extra / 2**20,
                     "memory_ratio": mem_ratio,
                     "verdict": "met" if med <= 1.0 and mem_ratio <= 1.1 else "NOT met"})

    # The obvious alternative for a remove plan: deep copy + drop layers (fewer repeats: it is slow).
    plan = plans["remove (bi)"]
    dc_times = []
    for _ in range(max(2, min(5, args.repeats))):
        dt, new = common.timed(lambda: deepcopy_prune(model, plan), device)
        dc_times.append(dt)
        dc_extra = extra_bytes(new, original)
        del new
    dc_med = common.median(dc_times)
    results["deepcopy + drop (remove plan)"] = {"times_s": dc_times, "median_s": dc_med, "extra_bytes": dc_extra}
    rows.append({"plan": "deepcopy + drop (alternative)", "groups/removed": str(list(plan.removed_layers)),
                 "median_ms": 1000 * dc_med, "cold_ms": float("nan"), "extra_MiB": dc_extra / 2**20,
                 "memory_ratio": (model_bytes + dc_extra) / model_bytes, "verdict": ""})
    speedup = dc_med / results["remove (bi)"]["median_s"]
    results["apply_plan_speedup_vs_deepcopy"] = speedup
    common.print_table(rows, f"apply_plan on the default model (median of {args.repeats})")
    print(f"\napply_plan (remove) is {speedup:.0f}x faster than deepcopy + drop")
    common.write_result("surgery", args, machine, {"ratio": args.ratio, "repeats": args.repeats,
                                                   "model_bytes": model_bytes}, results, rows)


if __name__ == "__main__":
    main()
