"""Benchmark 5 -- dashboard interaction: moving a slider on the Prune page re-renders in <= 300 ms, and no
metric is recomputed (no analyze call, no surgery, no forward pass).

Two measurements on the default model (the first visit runs the dashboard's quick analysis; not timed):

* AppTest (in process): ``at.slider(key).set_value(v).run()`` timed for the ratio slider (``pr_ratio``,
  strategy mode), the SLM threshold slider (``pr_threshold``) and the SLM target-ratio slider
  (``pr_target``), --moves values each, after one untimed move per slider.
* Browser (--browser, default on): ``streamlit run app.py`` (through bench/dashboard_server.py, which only
  adds work counters) in Debian Chromium driven by Playwright. The slider's thumb is focused and one arrow
  key pressed per move; latency = from the keydown (in-page ``performance.now()``) to the app's script
  state returning to ``notRunning`` (``data-test-script-state`` on ``stApp``, MutationObserver), and to
  the next painted frame after that; split into keydown -> script state ``running`` and the server-side
duration of each script run (timed in the server process). The server runs with the project's
``.streamlit/config.toml`` (``runner.postScriptGC = false``); then, for comparison, the same with
``--runner.postScriptGC true`` (Streamlit's default: ``gc.collect(2)`` after every run, which
--profile-server showed to be most of a rerun with a model loaded).

In both, counters around ``layerlens.metrics.analyze``, ``layerlens.surgery.apply_plan`` and every
decoder-layer forward (a global module pre-hook) must not move during the slider moves.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common

APP = str(common.ROOT / "app.py")
CHROMIUM = os.environ.get("LAYERLENS_CHROMIUM", "/usr/bin/chromium")
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run", "--disable-dev-shm-usage"]


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "median_ms": 1000 * common.median(s), "p90_ms": 1000 * s[min(len(s) - 1, int(0.9 * len(s)))],
            "max_ms": 1000 * s[-1], "min_ms": 1000 * s[0]}


def apptest(args, counts) -> dict:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=1800)
    at.switch_page("pages/3_prune.py")
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    assert not at.exception, at.exception
    print(f"AppTest: first visit (quick analysis + page) {first:.1f} s; analyze calls {counts['analyze']}")

    def moves(key: str, values: list[float]) -> dict:
        at.slider(key=key).set_value(values[0]).run()  # untimed warm-up move
        before = dict(counts)
        times, layers = [], []
        for v in values[1:]:
            t = time.perf_counter()
            at.slider(key=key).set_value(v).run()
            times.append(time.perf_counter() - t)
            assert not at.exception, at.exception
            layers.append({m.label: m.value for m in at.metric}.get("Layers"))
        delta = {k: counts[k] - before[k] for k in counts}
        out = _stats(times) | {"work_during_moves": delta, "times_s": times, "layers_shown": layers}
        print(f"  {key}: median {out['median_ms']:.0f} ms, max {out['max_ms']:.0f} ms; work {delta}")
        return out

    n = args.moves
    res = {"first_visit_s": first}
    ratios = [0.25] + [round(0.05 + 0.6 * i / max(n - 1, 1), 2) for i in range(n)]
    res["pr_ratio"] = moves("pr_ratio", ratios)
    if args.profile:
        import cProfile
        import io
        import pstats

        import dashboard_server

        prof = cProfile.Profile()
        dashboard_server.PROFILE["profiler"] = prof  # enabled inside the script thread for this run only
        at.slider(key="pr_ratio").set_value(0.4).run()
        dashboard_server.PROFILE["profiler"] = None
        st_ = pstats.Stats(prof, stream=io.StringIO())
        items = sorted(st_.stats.items(), key=lambda kv: -kv[1][3])  # type: ignore[attr-defined]
        wanted = ("layerlens/", "pages/", "app.py", "plotly/", "streamlit/elements", "json/", "_json")
        top = [{"function": f"{'/'.join(Path(f).parts[-2:])}:{ln}({fn})", "cum_ms": 1000 * ct, "own_ms": 1000 * tt}
               for (f, ln, fn), (_cc, _nc, tt, ct, _c) in items if any(w in f for w in wanted)][:18]
        common.print_table(top, "cProfile of one pr_ratio move (AppTest), by cumulative time")
        res["pr_ratio_profile"] = top
    at.radio(key="pr_mode").set_value("slm").run()
    at.radio(key="pr_slm_by").set_value("threshold").run()
    thresholds = [0.9] + [round(0.80 + 0.195 * i / max(n - 1, 1), 3) for i in range(n)]
    res["pr_threshold"] = moves("pr_threshold", thresholds)
    at.radio(key="pr_slm_by").set_value("ratio").run()
    res["pr_target"] = moves("pr_target", ratios)
    st.cache_data.clear()
    st.cache_resource.clear()
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OBSERVER = """() => {
  if (window.__bench) return;
  window.__bench = {ev: [], t0: null};
  // on the whole document: survives a re-mounted stApp element
  new MutationObserver(recs => { for (const r of recs) if (r.target.getAttribute('data-testid') === 'stApp')
      window.__bench.ev.push([performance.now(), r.target.getAttribute('data-test-script-state')]); })
    .observe(document.documentElement, {attributes: true, subtree: true, attributeFilter: ['data-test-script-state']});
  document.addEventListener('keydown', () => { window.__bench.t0 = performance.now(); }, true);
}"""

IDLE = """() => document.querySelector('[data-testid="stApp"]')?.getAttribute('data-test-script-state')
  === 'notRunning'"""

DONE = """() => { const b = window.__bench; if (b.t0 === null) return false;
  const app = document.querySelector('[data-testid="stApp"]');
  return app.getAttribute('data-test-script-state') === 'notRunning'
    && b.ev.some(e => e[0] >= b.t0 && e[1] === 'notRunning'); }"""

RESULT = """() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => {
  const b = window.__bench; const evs = b.ev.filter(e => e[0] >= b.t0);
  const run = evs.find(e => e[1] === 'running');
  const end = evs.filter(e => e[1] === 'notRunning').pop();
  r({t0: b.t0, running: run ? run[0] - b.t0 : null, done: end[0] - b.t0,
     painted: performance.now() - b.t0}); })))"""


def browser(args, extra_flags: tuple[str, ...] = ()) -> dict:
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    counts_path = tmp / "counts.json"
    port = _free_port()
    env = dict(os.environ, LAYERLENS_RUNS=str(tmp / "runs"), LAYERLENS_DATA_ROOT=str(tmp), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LAYERLENS_DEFAULT_MODEL", None)
    (tmp / "prof").mkdir()
    env["BENCH_PROFILE_DIR"] = str(tmp / "prof")  # profiling only while tmp/prof/on exists
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, str(common.BENCH / "dashboard_server.py"), str(counts_path), "--", "--server.headless",
         "true", "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats",
         "false", *extra_flags], cwd=common.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    res: dict = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("streamlit did not start:\n" + (tmp / "server.log").read_text()[-3000:])
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            t = time.perf_counter()
            page.goto(url + "/prune")
            thumb = page.locator(".st-key-pr_ratio input[type='range']")
            thumb.wait_for(state="attached", timeout=1_800_000)
            page.wait_for_function("""() => !document.querySelector('[data-testid="stStatusWidget"]')""",
                                   timeout=600_000)
            res["first_visit_s"] = time.perf_counter() - t
            print(f"browser: first visit (quick analysis + page) {res['first_visit_s']:.1f} s")
            page.evaluate(OBSERVER)

            def layers_text() -> str:
                box = page.get_by_test_id("stMetric").filter(
                    has=page.get_by_test_id("stMetricLabel").get_by_text("Layers", exact=True))
                return box.first.get_by_test_id("stMetricValue").inner_text().strip()

            def server_runs() -> int:
                return len(json.loads(counts_path.read_text()).get("script_runs_s", []))

            def press(key: str) -> dict:
                """One arrow key; returns once the server finished a run started by it and the page is idle."""
                page.wait_for_function(IDLE, timeout=60_000)
                page.wait_for_timeout(300)  # nothing else in flight (e.g. a query-param sync rerun)
                n0 = server_runs()
                page.evaluate("() => { window.__bench.t0 = null; }")
                thumb.focus()
                thumb.press(key)
                deadline = time.time() + 60
                while server_runs() <= n0:
                    if time.time() > deadline:
                        raise RuntimeError("the slider move did not start a script run within 60 s")
                    time.sleep(0.02)
                try:
                    page.wait_for_function(DONE, timeout=15_000, polling="raf")
                except Exception:  # noqa: BLE001 - the observer missed it (page re-mounted): count, go on
                    page.evaluate(OBSERVER)
                    return {"missed": True}
                return page.evaluate(RESULT)

            press("ArrowRight")  # untimed warm-up move
            page.wait_for_timeout(300)
            before = json.loads(counts_path.read_text())
            moves = []
            missed = 0
            for i in range(args.moves):
                shown = layers_text()
                m = press("ArrowRight" if (i // 4) % 2 == 0 else "ArrowLeft")
                if m.get("missed"):
                    missed += 1
                    continue
                m["layers_before"], m["layers_after"] = shown, layers_text()
                moves.append(m)
                page.wait_for_timeout(150)
            res["missed_moves"] = missed
            page.wait_for_timeout(300)
            after = json.loads(counts_path.read_text())
            if args.profile_server:  # one more move, profiled (after the timed ones: cProfile slows it)
                (tmp / "prof" / "on").touch()
                press("ArrowRight")
                (tmp / "prof" / "on").unlink()
            b.close()
        server_runs = after.pop("script_runs_s", [])[len(before.pop("script_runs_s", [])):]
        work = {k: after[k] - before[k] for k in after}
        if args.profile_server:
            import io
            import pstats

            last = sorted((tmp / "prof").glob("run_*.prof"))[-1]
            st_ = pstats.Stats(str(last), stream=io.StringIO())
            items = sorted(st_.stats.items(), key=lambda kv: -kv[1][3])  # type: ignore[attr-defined]
            top = [{"function": f"{'/'.join(Path(f).parts[-2:])}:{ln}({fn})", "cum_ms": 1000 * ct,
                    "own_ms": 1000 * tt} for (f, ln, fn), (_cc, _nc, tt, ct, _c) in items][:40]
            common.print_table(top, f"cProfile of the server's last script run ({last.name})")
            res["server_profile"] = top
        done = [m["done"] / 1000 for m in moves]
        painted = [m["painted"] / 1000 for m in moves]
        changed = [m["painted"] / 1000 for m in moves if m["layers_before"] != m["layers_after"]]
        res.update(keydown_to_notRunning=_stats(done), keydown_to_paint=_stats(painted),
                   keydown_to_paint_plan_changed=_stats(changed) if changed else None,
                   keydown_to_running=_stats([m["running"] / 1000 for m in moves if m["running"] is not None]),
                   server_script_run=_stats(server_runs) if server_runs else None,
                   work_during_moves=work, moves=moves)
        print(f"  pr_ratio (arrow keys): keydown -> run done median {res['keydown_to_notRunning']['median_ms']:.0f} ms,"
              f" -> painted median {res['keydown_to_paint']['median_ms']:.0f} ms, max "
              f"{res['keydown_to_paint']['max_ms']:.0f} ms ({len(changed)} moves changed the plan); work {work}")
        print(f"  split: keydown -> script starts median {res['keydown_to_running']['median_ms']:.0f} ms; server "
              f"script run median {res['server_script_run']['median_ms'] if server_runs else float('nan'):.0f} ms "
              f"({len(server_runs)} runs)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    text = (tmp / "server.log").read_text()
    if "Traceback" in text:
        print("server log has a traceback:\n" + text[-3000:])
    return res


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--moves", type=int, default=12, help="timed slider moves per slider")
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--no-apptest", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile one AppTest ratio move")
    p.add_argument("--no-gc-variant", action="store_true",
                   help="skip the second browser run with --runner.postScriptGC true (Streamlit's default)")
    p.add_argument("--profile-server", action="store_true",
                   help="after the timed moves, one more move with the server's script run cProfiled")
    args = p.parse_args()
    if args.quick:
        args.moves = 3
    if args.device != "cpu":
        os.environ["LAYERLENS_DEVICE"] = args.device  # informational; the dashboard picks its own device
    machine = common.machine_info(args.device, "auto")
    import dashboard_server

    counts = dashboard_server.install_counters()
    os.environ.pop("LAYERLENS_DEFAULT_MODEL", None)
    with tempfile.TemporaryDirectory(prefix="bench-apptest-") as tmp:
        os.environ["LAYERLENS_RUNS"] = str(Path(tmp) / "runs")
        os.environ["LAYERLENS_DATA_ROOT"] = tmp
        results: dict = {}
        if not args.no_apptest:
            results["apptest"] = apptest(args, counts)
        if not args.no_browser:
            results["browser"] = browser(args)
            if not args.no_gc_variant:
                print("browser again with --runner.postScriptGC true (Streamlit's default; the config sets false):")
                results["browser_post_gc"] = browser(args, ("--runner.postScriptGC", "true"))
    rows = []
    for key in ("pr_ratio", "pr_threshold", "pr_target"):
        if "apptest" in results:
            r = results["apptest"][key]
            ok = r["median_ms"] <= 300 and not any(r["work_during_moves"].values())
            rows.append({"figure": f"AppTest {key} move (median / max ms)", "ratio": r["median_ms"],
                         "max_ms": r["max_ms"], "target": "<= 300 ms, no work",
                         "verdict": "met" if ok else "NOT met", "work": str(r["work_during_moves"])})
    for name, label in (("browser", "browser pr_ratio key -> painted (median ms), server as configured"),
                        ("browser_post_gc", "same, server with runner.postScriptGC=true (Streamlit default)")):
        if name not in results:
            continue
        r = results[name]
        ok = r["keydown_to_paint"]["median_ms"] <= 300 and not any(r["work_during_moves"].values())
        rows.append({"figure": label, "ratio": r["keydown_to_paint"]["median_ms"],
                     "max_ms": r["keydown_to_paint"]["max_ms"], "target": "<= 300 ms, no work",
                     "verdict": "met" if ok else "NOT met", "work": str(r["work_during_moves"])})
    common.print_table(rows, "Prune page slider re-render")
    common.write_result("dashboard", args, machine, {"moves": args.moves, "model": "default (dashboard quick analysis)"},
                        results, rows)


if __name__ == "__main__":
    main()
