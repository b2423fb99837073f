"""Benchmark -- sublayer pruning: generation speed and KV-cache memory of the in-memory pruned model.

Variants (one model, plans from a small analysis of it, not timed):

* ``original``;
* ``attn drop k`` -- the k attention sublayers with the lowest attention BI dropped (``--attn-ratio`` of the
  L attentions); the layers and MLPs stay, the dropped attentions keep no KV cache;
* ``mlp drop k`` -- the k lowest-MLP-BI MLP sublayers dropped (same k);
* ``layers k/2`` -- the same number of sublayers as whole layers (k/2 lowest-BI layers), for reference.

Measured: greedy ``generate`` tokens/s (batch 1, ``--prompt`` prompt tokens, ``--new`` new tokens, KV cache
on; median of ``--repeats`` interleaved runs) and the KV cache's bytes after a ``--kv-tokens`` forward
(sum of the key/value tensors the cache holds). Also checked: generate with cache == without, and the
original model's parameters untouched (``--check``; the unit tests check it on every architecture).
"""

from __future__ import annotations

import common
import torch


def kv_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--attn-ratio", type=float, default=0.5, help="fraction of the L attentions dropped")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--kv-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=8, help="analysis samples for the plans (not timed)")
    p.add_argument("--check", action="store_true", help="also check generate with cache == without (slow on CPU)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.samples, args.new, args.kv_tokens = 1, 2, 8, 64
    common.setup_torch(args)

    from layerlens.data import load_texts
    from layerlens.metrics import CaptureConfig, analyze
    from layerlens.plans import make_plan
    from layerlens.surgery import apply_plan

    loaded = common.load(args)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    machine = common.machine_info(str(device), common.model_dtype(model))
    report = analyze(model, tok, load_texts("default", role="calibration"),
                     CaptureConfig(samples=args.samples, seq_len=128, batch_size=8, bootstrap=0))
    L = report.num_layers
    k = max(2, round(args.attn_ratio * L))
    k -= k % 2
    plans = {"original": None,
             f"attn drop {k}": make_plan("attn_bi", report, n=k),
             f"mlp drop {k}": make_plan("mlp_bi", report, n=k),
             f"layers {k // 2}": make_plan("bi", report, n=k // 2)}
    models = {name: model if plan is None else apply_plan(model, plan) for name, plan in plans.items()}
    for name, plan in plans.items():
        if plan is not None:
            print(f"{name}: {plan.describe()}")
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, model.config.vocab_size - 10, (1, args.prompt), generator=gen).to(device)
    kv_ids = torch.randint(10, model.config.vocab_size - 10, (1, args.kv_tokens), generator=gen).to(device)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
              pad_token_id=tok.pad_token_id or 0)

    kv = {name: kv_bytes(m, kv_ids) for name, m in models.items()}  # deterministic: first
    print({name: f"{b / 2**20:.2f} MiB" for name, b in kv.items()})
    same = {}
    with torch.no_grad():
        for name, m in models.items():
            if not args.check:
                same[name] = None
                continue
            short = dict(max_new_tokens=4, do_sample=False, pad_token_id=kw["pad_token_id"])
            a = m.generate(prompt[:, :8], use_cache=True, **short)
            b = m.generate(prompt[:, :8], use_cache=False, **short)
            same[name] = bool(torch.equal(a, b))

    def runner(m):
        def go():
            with torch.no_grad():
                return m.generate(prompt, use_cache=True, **kw)
        return go

    times = common.interleaved({n: runner(m) for n, m in models.items()}, args.repeats, device)
    rows, results = [], {}
    base_tps = args.new / common.median(times["original"])
    base_kv = kv["original"]
    for name in models:
        tps = args.new / common.median(times[name])
        results[name] = {"plan": None if plans[name] is None else plans[name].to_dict(), "times_s": times[name],
                         "tokens_per_s": tps, "kv_bytes": kv[name], "generate_cache_equals_no_cache": same[name]}
        rows.append({"model": name, "tok/s": tps, "speed vs original": tps / base_tps,
                     f"KV MiB @{args.kv_tokens}": kv[name] / 2**20, "KV vs original": kv[name] / base_kv,
                     "cache==no cache": same[name]})
    untouched = all(p.data_ptr() == before[n] for n, p in model.named_parameters())
    results["original_untouched"] = untouched
    common.print_table(rows, f"generate {args.new} tokens (batch 1, median of {args.repeats}); KV after "
                             f"{args.kv_tokens} tokens")
    common.write_result("sublayers", args, machine, {"attn_ratio": args.attn_ratio, "k": k, "prompt": args.prompt,
                                                     "new": args.new, "kv_tokens": args.kv_tokens,
                                                     "repeats": args.repeats}, results, rows)


if __name__ == "__main__":
    main()
