"""``streamlit run app.py`` with work counters, for bench_dashboard.py's browser measurement.

    python bench/dashboard_server.py COUNTS_JSON -- <streamlit run arguments>

Installs, in the server process only: a wrapper counting ``layerlens.metrics.analyze`` calls, one counting
``layerlens.surgery.apply_plan`` calls, and a global module forward pre-hook counting decoder-layer
forwards (any forward pass through any model), and times every script run on the server
(``ScriptRunner._run_script``); a thread writes them to COUNTS_JSON every 50 ms. With BENCH_PROFILE_DIR
set and a file BENCH_PROFILE_DIR/on present, each script run is cProfiled into BENCH_PROFILE_DIR/run_NNN.prof.
The app itself is unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COUNTS = {"analyze": 0, "apply_plan": 0, "layer_forwards": 0}
RUNS: list[float] = []  # server-side seconds of every script run (ScriptRunner._run_script), in order
PROFILE: dict = {"profiler": None}  # a cProfile.Profile to enable inside the script thread (AppTest --profile)


def install_counters() -> dict[str, int]:
    """Patch the library entry points (module attributes the pages import at call time) to count calls."""
    import torch

    import layerlens.metrics as metrics
    import layerlens.surgery as surgery

    real_analyze, real_apply = metrics.analyze, surgery.apply_plan

    def analyze(*a, **kw):
        COUNTS["analyze"] += 1
        return real_analyze(*a, **kw)

    def apply_plan(*a, **kw):
        COUNTS["apply_plan"] += 1
        return real_apply(*a, **kw)

    metrics.analyze, surgery.apply_plan = analyze, apply_plan

    def pre_hook(module, _args):
        if type(module).__name__.endswith("DecoderLayer"):
            COUNTS["layer_forwards"] += 1

    torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:  # private API: only for timing; the benchmark works without it
        from streamlit.runtime.scriptrunner.script_runner import ScriptRunner

        real_run = ScriptRunner._run_script

        def _run_script(self, rerun_data):
            t = time.perf_counter()
            prof = PROFILE["profiler"]
            dump = os.environ.get("BENCH_PROFILE_DIR")
            dump = dump if dump and (Path(dump) / "on").exists() else None
            if dump and prof is None:
                import cProfile

                prof = cProfile.Profile()
            if prof is not None:
                prof.enable()
            try:
                return real_run(self, rerun_data)
            finally:
                if prof is not None:
                    prof.disable()
                RUNS.append(time.perf_counter() - t)
                if dump and prof is not PROFILE["profiler"]:
                    prof.dump_stats(str(Path(dump) / f"run_{len(RUNS):03d}.prof"))

        ScriptRunner._run_script = _run_script
    except (ImportError, AttributeError):
        pass
    return COUNTS


def _writer(path: Path) -> None:
    while True:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(COUNTS | {"script_runs_s": RUNS}))
        os.replace(tmp, path)
        time.sleep(0.05)


def main() -> None:
    counts_path = Path(sys.argv[1])
    rest = sys.argv[sys.argv.index("--") + 1:]
    install_counters()
    threading.Thread(target=_writer, args=(counts_path,), daemon=True).start()
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(ROOT / "app.py"), *rest]
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
