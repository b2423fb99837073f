"""Benchmark -- layer-by-layer analysis of a model larger than the memory budget vs accelerate's offload.

Builds a random-weight Llama-shaped model in a scratch folder (written tensor by tensor, sharded
safetensors, never whole in memory), then runs the SAME ``analyze`` work (``--samples`` calibration texts,
every metric) in three separate processes, each under ``/usr/bin/time -v`` for its peak RSS:

* ``layerwise``  -- :class:`layerlens.layerwise.LayerwiseModel` (one decoder layer's weights at a time);
* ``accelerate`` -- ``from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``
                    then the ordinary in-memory ``layerlens.metrics.analyze`` (accelerate streams every
                    offloaded layer's weights again for every batch);
* ``memory``     -- the plain in-memory load and analysis (the reference numbers; skip with --modes).

``--ram-limit SIZE`` runs the layer-wise and accelerate processes in a memory cgroup of that size, page cache
included: the box then has less RAM than the model, so pages read once cannot stay cached and every re-read
goes to the disk (without it the OS caches a model that fits in RAM and accelerate re-reads at memory speed).
``--cold`` evicts the scratch model from the page cache before each mode. The cgroup needs root (v1 or v2).

Reported: wall seconds, peak RSS, RSS after start-up (Python + torch + transformers + the empty model),
bytes of weights read (layer-wise: counted; accelerate: offloaded bytes x batches, as its hooks load every
offloaded weight once per forward), the ratio accelerate / layerwise, and the largest difference of the
report numbers between modes. Scratch files live under ``--work`` (default /tmp) and are deleted at the end
unless --keep. Timings on a shared, loaded box: read them as ratios.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common

MODES = ("layerwise", "accelerate", "memory")


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _io() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                k, v = line.split(":")
                out[k] = int(v)
    except OSError:
        pass
    return out


def build_model(folder: Path, args) -> int:
    """A random Llama-shaped model (and the tests' tiny tokenizer) in ``folder``; returns its weight bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(common.ROOT / "tests"))
    from tiny_models import train_tokenizer

    dtype = getattr(torch, args.model_dtype)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 512),
                         vocab_size=args.vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=1)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    names: list[str] = []
    total = size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            names.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, p in model.named_parameters():
        if p.dim() == 1:
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            t = torch.randn(p.shape, generator=gen) * (0.02 if "embed" in name else p.shape[-1] ** -0.5)
        t = t.to(dtype)
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= 512 << 20:
            flush()
    flush()
    final = {}
    for i, name in enumerate(names):  # the usual model-0000i-of-0000n names
        new = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (folder / name).rename(folder / new)
        final[name] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    config.save_pretrained(folder)
    train_tokenizer(folder)
    return total


def child(args) -> None:
    """One mode in this process; prints one JSON line."""
    import torch

    from layerlens.data import load_texts
    from layerlens.metrics import CaptureConfig, analyze

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = load_texts("default")
    cfg = CaptureConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, bootstrap=0)
    folder = Path(args.work) / "model"
    import accelerate.hooks  # noqa: F401 -- the code every mode runs, read from disk before the I/O counter
    import transformers.models.llama.modeling_llama  # noqa: F401 starts, so disk_read counts the model's files

    import layerlens.layerwise  # noqa: F401

    t0 = time.perf_counter()
    io0 = _io()
    extra: dict = {}
    if args.child == "layerwise":
        from layerlens.layerwise import LayerwiseModel

        lw = LayerwiseModel(str(folder), dtype=args.dtype, device=args.device, work_dir=args.work)
        start_rss = _rss_mb()
        report = lw.analyze(texts, cfg)
        extra = report.meta["layerwise"]
        weights_read = extra["bytes_read"]
    elif args.child == "accelerate":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        offload = Path(args.work) / "offload"
        from layerlens.layerwise import parse_size

        budget = parse_size(args.budget)  # bytes: the same budget as --max-memory
        max_memory = {"cpu": budget} if args.device == "cpu" else {0: budget, "cpu": budget}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype), device_map="auto",
                                                     max_memory=max_memory, offload_folder=str(offload)).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        start_rss = _rss_mb()
        dmap = model.hf_device_map
        on_disk = [k for k, v in dmap.items() if v == "disk"]
        offloaded = sum(p.numel() * p.element_size() for n, p in model.state_dict().items()
                        if any(n == k or n.startswith(k + ".") for k in on_disk))
        report = analyze(model, tok, texts, cfg)
        n_batches = -(-report.meta["samples"] // args.batch_size)
        extra = {"modules_on_disk": len(on_disk), "offloaded_bytes": offloaded,
                 "offloaded_bytes_x_batches": offloaded * n_batches}
        weights_read = offloaded * n_batches
    else:
        from layerlens.loading import load_model

        lm = load_model(str(folder), dtype=args.dtype, device=args.device, check_memory=False)
        start_rss = _rss_mb()
        report = analyze(lm.model, lm.tokenizer, texts, cfg)
        weights_read = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    seconds = time.perf_counter() - t0
    io1 = _io()
    print("RESULT " + json.dumps({
        "mode": args.child, "seconds": seconds, "analyze_seconds": report.meta["seconds"],
        "start_rss_mb": start_rss, "weights_read": weights_read,
        "disk_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "rchar": io1.get("rchar", 0) - io0.get("rchar", 0), "extra": extra,
        "bi": list(report.bi), "cosine": [list(r) for r in report.cosine], "cka": [list(r) for r in report.cka],
        "magnitude": list(report.magnitude)}), flush=True)


def _memory_cgroup(limit: int) -> Path:
    """A fresh memory cgroup capped at ``limit`` bytes (page cache included); v2 if mounted so, else v1."""
    root = Path("/sys/fs/cgroup")
    name = f"layerlens-bench-{os.getpid()}"
    if (root / "cgroup.controllers").exists():  # cgroup v2
        cg = root / name
        cg.mkdir(exist_ok=True)
        (cg / "memory.max").write_text(str(limit))
        if (cg / "memory.swap.max").exists():
            (cg / "memory.swap.max").write_text("0")
    else:
        cg = root / "memory" / name
        cg.mkdir(exist_ok=True)
        (cg / "memory.limit_in_bytes").write_text(str(limit))
    return cg


def _evict_from_page_cache(folder: Path) -> None:
    """Start a mode with the model's files out of the page cache (code stays cached): every weight's first
    read comes from the disk, and ``disk_read`` counts weights, not Python modules."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _cgroup_peak(cg: Path) -> int:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        if (cg / name).exists():
            return int((cg / name).read_text().split()[0])
    return 0


def run_mode(mode: str, args) -> dict:
    cg = None
    if args.ram_limit and mode != "memory":  # the reference in-memory run needs the whole model in RAM
        from layerlens.layerwise import parse_size

        cg = _memory_cgroup(parse_size(args.ram_limit))
    if args.cold:
        _evict_from_page_cache(Path(args.work))
    try:
        out = _run_child(mode, args, cg)
    finally:
        if cg is not None:
            out_peak = _cgroup_peak(cg)
            with contextlib.suppress(OSError):
                cg.rmdir()
    if cg is not None:
        out["cgroup_peak_bytes"] = out_peak  # RSS + page cache of the mode, the figure the RAM limit caps
    return out


def _run_child(mode: str, args, cg: Path | None) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", mode]
    for k in ("work", "dtype", "device", "budget", "samples", "seq_len", "batch_size", "threads"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    def enter_cgroup() -> None:
        (cg / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
                          preexec_fn=enter_cgroup if cg is not None else None)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(line[len("RESULT "):])
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    out["peak_rss_mb"] = int(m.group(1)) / 1024 if m else float("nan")
    return out


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--work", default="/tmp/layerlens-bench-layerwise", help="scratch folder (model, offload)")
    p.add_argument("--keep", action="store_true", help="keep the scratch model for another run")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--budget", default="512MB", help="weight memory budget (--max-memory)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--model-dtype", default="float32", help="dtype the random checkpoint is stored in")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ram-limit", default=None,
                   help="run layerwise/accelerate in a memory cgroup of this size (page cache included; root)")
    p.add_argument("--cold", action="store_true", help="evict the model files from the page cache before each mode")
    args = p.parse_args()
    if args.dtype == "auto":
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.child:
        child(args)
        return
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.vocab, args.samples, args.budget = 4, 256, 512, 4000, 8, "12MB"
    machine = common.machine_info(args.device, args.dtype)
    work = Path(args.work)
    folder = work / "model"
    t0 = time.perf_counter()
    if not (folder / "model.safetensors.index.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        build_model(folder, args)
    build_s = time.perf_counter() - t0
    from layerlens.layerwise import human_bytes, parse_size, weights_bytes

    weights = weights_bytes(folder)
    try:
        results = {m: run_mode(m, args) for m in args.modes.split(",")}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ref = results.get("memory") or results["layerwise"]
    rows = []
    for r in results.values():  # per metric, the largest difference to the reference mode
        r["max_diff"] = {k: max(abs(a - b) for a, b in zip(_flat(r[k]), _flat(ref[k]), strict=True))
                         for k in ("bi", "magnitude", "cosine", "cka")}
    for mode, r in results.items():
        diff = max(r["max_diff"][k] for k in ("bi", "magnitude", "cosine"))
        mat = r["max_diff"]["cka"]
        rows.append({"mode": mode, "wall_s": round(r["seconds"], 1), "analyze_s": r["analyze_seconds"],
                     "peak_rss": f"{r['peak_rss_mb']:.0f} MB", "start_rss": f"{r['start_rss_mb']:.0f} MB",
                     "weights_read": human_bytes(r["weights_read"] or 0),
                     "disk_read": human_bytes(r["disk_read_bytes"] or 0),
                     "max_diff_bi_cos_mag": f"{diff:.1e}", "max_diff_cka": f"{mat:.1e}"})
    if "accelerate" in results and "layerwise" in results:
        a, lw = results["accelerate"], results["layerwise"]
        ratios = {"wall": a["seconds"] / lw["seconds"], "analyze": a["analyze_seconds"] / lw["analyze_seconds"]}
        for r in results.values():
            r["ratio_vs_layerwise"] = {"wall": r["seconds"] / lw["seconds"],
                                       "analyze": r["analyze_seconds"] / lw["analyze_seconds"]}
        print(f"accelerate offload / layerwise: {ratios['wall']:.2f}x wall, {ratios['analyze']:.2f}x analysis alone")
    common.print_table(rows, f"layer-wise vs accelerate offload: {human_bytes(weights)} of weights, budget "
                             f"{args.budget} ({weights / parse_size(args.budget):.1f}x)")
    config = {k: getattr(args, k) for k in ("budget", "layers", "hidden", "intermediate", "vocab", "model_dtype",
                                            "dtype", "samples", "seq_len", "batch_size", "modes", "ram_limit", "cold")}
    config.update(weights_bytes=weights, build_seconds=round(build_s, 1))
    for r in results.values():
        for k in ("bi", "cosine", "cka", "magnitude"):
            r.pop(k)
    common.write_result("layerwise", args, machine, config, results, rows)


def _flat(x) -> list[float]:
    return [v for row in x for v in (row if isinstance(row, list) else [row])]


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
