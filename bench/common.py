"""Shared helpers for the benchmarks: flags, machine info, timing, tables, results JSON.

Every benchmark reports RATIOS measured in the same process and run (interleaved where it matters), so
the figures travel between machines better than absolute seconds; the absolute numbers and the machine
(CPU model, cores, load average, versions, device, dtype, git commit, date) are recorded next to them in
``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="default", help="model spec for layerlens.loading.load_model")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps (default cpu)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<name>.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, numbers not meaningful")
    return p


def setup_torch(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def load(args: argparse.Namespace):
    from layerlens.loading import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Any = "cpu") -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, device: Any = "cpu",
                log: Callable[[str], None] | None = print) -> dict[str, list[float]]:
    """Run every variant ``repeats`` times, rotating the order each round (drift hits all alike)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            dt, _ = timed(variants[n], device)
            times[n].append(dt)
            if log:
                log(f"  round {r + 1}/{repeats} {n}: {dt:.3f} s")
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios (num[i] / den[i]) of interleaved runs: robust to slow drift in machine load."""
    return [a / b for a, b in zip(num, den, strict=True)]


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: str = "cpu", dtype: str | None = None) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": loadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "dtype": dtype,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_library": bool(_git("status", "--porcelain", "--", "layerlens", "pages", "app.py")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        from importlib.metadata import version

        import lm_eval  # noqa: F401

        info["lm_eval"] = version("lm_eval")
    except Exception:  # noqa: BLE001 - optional
        pass
    return info


def model_dtype(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def write_result(name: str, args: argparse.Namespace, machine: dict[str, Any], config: dict[str, Any],
                 results: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    machine = dict(machine, loadavg_end=loadavg())
    path = Path(args.out) if args.out else RESULTS / f"{name}{'.quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"benchmark": name, "machine": machine, "config": config, "results": results, "table": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def print_table(rows: list[dict[str, Any]], title: str = "") -> None:
    """Rows of {column: value}; floats shown with 4 significant digits."""
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "NOT met"
