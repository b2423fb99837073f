"""Run every benchmark (``make bench``) and print one summary table (bench/results/summary.json).

    .venv/bin/python bench/run_all.py [--device cuda] [--quick] [--only capture,sweep] [--skip dashboard]

Before the first run it installs bench/requirements-bench.txt (lm-eval) into the current environment
WITHOUT moving any installed package: ``pip install --dry-run --report`` resolves the requirements; every
package pinned in requirements.txt / requirements-dev.txt / requirements-defaults.txt, and every package
already installed (at whatever version), is dropped from the resolved set; only the missing ones are
installed, with --no-deps. (A plain install would, e.g., downgrade python-dateutil for typepy.)
Each benchmark runs in its own process; one failing does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

# name -> (script, extra flags for a full run); order: cheap first.
BENCHMARKS = {
    "surgery": ("bench_surgery.py", []),
    "capture": ("bench_capture.py", []),
    "memory": ("bench_memory.py", ["--diagnose"]),
    "mmlu_harness": ("bench_mmlu_harness.py", ["--profile"]),
    "sweep": ("bench_sweep.py", []),
    "sweep_estimate": ("bench_sweep_estimate.py", []),
    "ray": ("bench_ray.py", []),
    "quick": ("bench_quick.py", []),
    "merge_defaults": ("bench_merge_defaults.py", []),
    "heal": ("bench_heal.py", []),
    "dashboard": ("bench_dashboard.py", ["--profile", "--profile-server"]),
    "layerwise": ("bench_layerwise.py", ["--layers", "6"]),  # writes a 1.5 GB model under /tmp (deleted after)
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_names() -> set[str]:
    names = set()
    for f in ("requirements.txt", "requirements-dev.txt", "requirements-defaults.txt", "requirements-ray.txt"):
        path = ROOT / f
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
            if m:
                names.add(_norm(m.group(1)))
    return names


def requirements_met(req_file: Path) -> bool:
    for line in req_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, ver = line.partition("==")
        try:
            if ver and metadata.version(name.strip()) != ver.strip():
                return False
        except metadata.PackageNotFoundError:
            return False
    return True


def ensure_bench_requirements(req_file: Path = BENCH / "requirements-bench.txt") -> None:
    if requirements_met(req_file):
        return
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        subprocess.run([*pip, "install", "-q", "--dry-run", "--report", str(report_path), "-r", str(req_file)],
                       check=True)
        report = json.loads(report_path.read_text())
    pinned = pinned_names()
    installed = {_norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    resolved = [(item["metadata"]["name"], item["metadata"]["version"]) for item in report.get("install", [])]
    kept = [f"{n}=={v}" for n, v in resolved if _norm(n) not in pinned and _norm(n) not in installed]
    skipped = [f"{n}=={v}" for n, v in resolved if _norm(n) in pinned or _norm(n) in installed]
    if skipped:
        print(f"bench requirements: NOT changing installed/pinned packages the resolver wanted: {skipped}")
    if kept:
        print(f"bench requirements: installing {len(kept)} packages (--no-deps): {' '.join(kept)}")
        subprocess.run([*pip, "install", "-q", "--no-deps", *kept], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny smoke sizes (numbers not meaningful)")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--skip", default="", help="comma-separated benchmarks to skip")
    p.add_argument("--no-install", action="store_true", help="do not install bench/requirements-bench.txt")
    args = p.parse_args()
    only = [x for x in args.only.split(",") if x]
    skip = {x for x in args.skip.split(",") if x}
    unknown = (set(only) | skip) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if not args.no_install:
        ensure_bench_requirements()
    names = [n for n in (only or BENCHMARKS) if n not in skip]
    summary = {}
    for name in names:
        script, extra = BENCHMARKS[name]
        cmd = [sys.executable, str(BENCH / script), "--device", args.device, *extra]
        if args.quick:
            cmd.append("--quick")
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        res_path = RESULTS / f"{name}{'.quick' if args.quick else ''}.json"
        table = json.loads(res_path.read_text())["table"] if rc == 0 and res_path.exists() else []
        summary[name] = {"returncode": rc, "seconds": round(time.perf_counter() - t, 1), "table": table}
    print("\n=== summary")
    for name, s in summary.items():
        status = "ok" if s["returncode"] == 0 else f"FAILED (exit {s['returncode']})"
        print(f"{name:14s} {status} in {s['seconds']} s")
        for row in s["table"]:
            print("    " + "; ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in row.items() if k != "work" and v != ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"summary{'.quick' if args.quick else ''}.json"
    merged = json.loads(path.read_text()) if path.exists() else {}  # a partial run keeps the others' entries
    merged.update(summary)
    path.write_text(json.dumps({k: merged[k] for k in BENCHMARKS if k in merged}, indent=2) + "\n")
    sys.exit(0 if all(s["returncode"] == 0 for s in summary.values()) else 1)


if __name__ == "__main__":
    main()
