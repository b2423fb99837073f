"""End-to-end: `streamlit run app.py` on a free port, driven by Playwright in Debian Chromium.

Walks the whole flow on the real bundled default model (SmolLM2-135M, 30 layers) and saves full-page
screenshots to tests/artifacts/. Never runs `playwright install`: Chromium comes from Debian
(/usr/bin/chromium, or $LAYERLENS_CHROMIUM). Run with ``pytest -m browser tests/test_browser.py -s``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.defaults_model]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = os.environ.get("LAYERLENS_CHROMIUM", "/usr/bin/chromium")
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run", "--disable-dev-shm-usage"]
PLOTS = ".js-plotly-plot"

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
_pw = pytest.importorskip("playwright.sync_api")
sync_playwright, expect = _pw.sync_playwright, _pw.expect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp: Path, *, stats_flag: bool = True):
    """`streamlit run app.py` on a free port with a fresh runs folder; yields its URL, stops it after.
    ``stats_flag=False`` leaves usage statistics to .streamlit/config.toml (the offline test checks it)."""
    port = _free_port()
    env = dict(os.environ, LAYERLENS_RUNS=str(tmp / "runs"), LAYERLENS_DATA_ROOT=str(tmp), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LAYERLENS_DEFAULT_MODEL", None)
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"]
        + (["--browser.gatherUsageStats", "false"] if stats_flag else []),
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("streamlit did not become healthy:\n" + (tmp / "server.log").read_text()[-3000:])
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    text = (tmp / "server.log").read_text()
    shutil.copy(tmp / "server.log", ARTIFACTS / f"server-{tmp.name}.log") if ARTIFACTS.exists() else None
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real dashboard server with a fresh runs folder (so the first analysis really runs)."""
    with running_server(tmp_path_factory.mktemp("browser")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        yield b
        b.close()


def shoot(page, name: str) -> Path:
    """Full-page screenshot: Streamlit scrolls inside its main element, so grow the viewport to fit it."""
    page.wait_for_timeout(800)
    height = page.evaluate("""() => { const el = document.querySelector('[data-testid="stMain"]')
        || document.scrollingElement; return el.scrollHeight; }""")
    vp = page.viewport_size
    page.set_viewport_size({"width": vp["width"], "height": max(vp["height"], int(height) + 40)})
    page.wait_for_timeout(700)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(vp)
    return path


def idle(page, timeout: float = 600_000) -> None:
    """Wait until the script run finished (Streamlit shows a 'running' status widget meanwhile)."""
    page.wait_for_timeout(300)
    page.wait_for_function("""() => !document.querySelector('[data-testid="stStatusWidget"]')""",
                           timeout=timeout)


def choose(page, key: str, option: str, tries: int = 4) -> None:
    """Pick ``option`` in the selectbox ``key``. A rerun that lands just after the click can close the
    dropdown before it shows (the CI flake at the upload step), so the click is repeated until it does."""
    for attempt in range(tries):
        idle(page)
        page.locator(f".st-key-{key}").click()
        item = page.get_by_role("option", name=option)
        try:
            item.wait_for(timeout=10_000)
        except Exception:  # noqa: BLE001 - the dropdown closed again: retry, the last try raises
            if attempt == tries - 1:
                raise
            page.keyboard.press("Escape")
            continue
        item.click()
        return


def plots(page, n: int, timeout: float = 180_000) -> None:
    page.wait_for_function(f"document.querySelectorAll('{PLOTS}').length >= {n}", timeout=timeout)


def nav(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
    idle(page)


def metric(page, label: str) -> str:
    box = page.get_by_test_id("stMetric").filter(has=page.get_by_test_id("stMetricLabel").get_by_text(label,
                                                                                                      exact=True))
    return box.first.get_by_test_id("stMetricValue").inner_text().strip()


def slider_keys(page, key: str, keys: str, times: int) -> None:
    thumb = page.locator(f".st-key-{key} input[type='range']")
    thumb.focus()
    for _ in range(times):
        thumb.press(keys)


@pytest.fixture
def pages(browser, request):
    """New browser contexts for a test; on failure every open page is saved as failure-<test>-<i>.png."""
    contexts = []
    failed_before = request.session.testsfailed

    def new(**kw):
        ctx = browser.new_context(viewport={"width": 1500, "height": 1000}, accept_downloads=True, **kw)
        contexts.append(ctx)
        return ctx.new_page()

    yield new
    failed = request.session.testsfailed > failed_before
    for i, ctx in enumerate(contexts):
        for page in ctx.pages:
            if failed:
                with contextlib.suppress(Exception):
                    shoot(page, f"failure-{request.node.name}-{i}")
        ctx.close()


def test_full_flow_on_the_default_model(server, pages):
    page = pages()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # 1. opens on the bundled default, no typing: a quick analysis runs and real heatmaps appear
    t0 = time.perf_counter()
    page.goto(server)
    page.get_by_text("Model card").wait_for(timeout=240_000)
    plots(page, 2)
    first = time.perf_counter() - t0
    print(f"\nfirst heatmaps after {first:.1f} s")
    assert metric(page, "Decoder layers") == "30"
    expect(page.get_by_text("Cosine similarity between residual states").first).to_be_visible()
    shoot(page, "01_model_data")

    # 2. redundancy: bars + two heatmaps; the threshold slider redraws outlines
    nav(page, "Redundancy")
    plots(page, 3)
    expect(page.get_by_text("Linear CKA between residual states").first).to_be_visible()
    slider_keys(page, "rd_threshold", "ArrowLeft", 10)  # 0.90 -> 0.80
    page.get_by_text("Cosine runs ≥ 0.80").wait_for(timeout=60_000)
    shoot(page, "02_redundancy")

    # 3. prune: strategy + ratio, live plan; sliding merge; apply with before/after
    nav(page, "Prune")
    plots(page, 2)
    assert metric(page, "Layers") == "22 / 30"  # bi, ratio 0.25 -> 8 layers
    slider_keys(page, "pr_ratio", "ArrowRight", 3)  # 0.28 -> round(8.4) = 8 layers: same plan
    idle(page)
    latencies = []
    for key, want in (("ArrowRight", "21 / 30"), ("ArrowLeft", "22 / 30"), ("ArrowRight", "21 / 30")):
        t = time.perf_counter()
        slider_keys(page, "pr_ratio", key, 1)  # 0.28 <-> 0.29: one step flips 8 <-> 9 layers
        page.get_by_test_id("stMetricValue").get_by_text(want).wait_for(timeout=30_000)
        latencies.append(time.perf_counter() - t)
        idle(page)
    print(f"ratio slider, one step to updated plan in the browser: {[f'{x * 1000:.0f} ms' for x in latencies]}")
    slider_keys(page, "pr_ratio", "ArrowLeft", 2)  # 0.27 -> 8 layers
    page.get_by_test_id("stMetricValue").get_by_text("22 / 30").wait_for(timeout=30_000)
    idle(page)
    page.get_by_text("Sliding merge (SLM)").click()
    idle(page)
    expect(page.get_by_text("Target ratio (largest merge plan").first).to_be_visible()  # the default drive
    shoot(page, "03a_prune_slm")
    page.get_by_text("Strategy + ratio").click()
    idle(page)
    page.get_by_role("button", name="Apply plan").click()
    page.get_by_test_id("stMetricLabel").get_by_text("Generation speed").wait_for(timeout=600_000)
    idle(page)
    expect(page.get_by_text("Original (30 layers)").first).to_be_visible()
    expect(page.get_by_text("Pruned (22 layers)").first).to_be_visible()
    shoot(page, "03b_prune_applied")

    # 4. evaluate: a small sweep (2 strategies x 3 ratios + the current plan; 3 MMLU subjects)
    nav(page, "Evaluate")
    page.locator(".st-key-ev_windows input").fill("2")
    page.locator(".st-key-ev_windows input").press("Enter")
    idle(page)
    page.locator(".st-key-ev_seq_len input").fill("128")
    page.locator(".st-key-ev_seq_len input").press("Enter")
    idle(page)
    for chip in ("10%", "30%"):
        page.locator(".st-key-ev_ratios").get_by_role("button", name=f"Remove {chip}").click()
        idle(page)
    subj = page.locator(".st-key-ev_subjects input")
    for s in ("astronomy", "marketing", "virology"):
        subj.click()
        subj.fill(s)
        subj.press("Enter")
        idle(page)
    page.keyboard.press("Escape")
    t = time.perf_counter()
    page.get_by_role("button", name="Run sweep").click()
    page.get_by_text("Perplexity vs. pruning ratio").first.wait_for(timeout=900_000)
    idle(page)
    print(f"sweep took {time.perf_counter() - t:.0f} s")
    expect(page.get_by_text("MMLU accuracy vs. pruning ratio", exact=True).first).to_be_visible()
    expect(page.get_by_text("Sweep done").first).to_be_visible()
    shoot(page, "04_evaluate")

    # 5. export: downloads of the HTML report and a PNG figure
    nav(page, "Export")
    for label in ("Report (JSON)", "Per-layer metrics (CSV)", "Sweep (CSV)", "Plan JSON"):
        expect(page.get_by_role("button", name=label).first).to_be_visible(timeout=60_000)
    with page.expect_download(timeout=120_000) as dl:
        page.get_by_role("button", name="Download the HTML report").click()
    html = Path(dl.value.path()).read_text(encoding="utf-8")
    assert "Provenance" in html and "Plotly.newPlot" in html and "git commit" in html
    (ARTIFACTS / "layerlens_report.html").write_text(html, encoding="utf-8")
    with page.expect_download(timeout=120_000) as dl:
        page.locator(".st-key-ex_fig_png_cosine button").click()
    png = Path(dl.value.path()).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "PNG export (kaleido + chromium) failed"
    (ARTIFACTS / "export_cosine.png").write_bytes(png)
    shoot(page, "05_export")

    # 6. summary: one screen, shareable by URL (a new session opens the same plan)
    nav(page, "Summary")
    page.get_by_text("Share this summary").wait_for(timeout=300_000)
    idle(page)
    expect(page.get_by_text("22 of 30 layers kept").first).to_be_visible()
    share = page.locator("[data-testid='stCode'] code").first.inner_text().strip()
    assert "strategy=bi" in share and "ratio=0.27" in share
    shoot(page, "06_summary")

    viewer = pages()
    viewer.goto(share)
    viewer.get_by_text("22 of 30 layers kept").first.wait_for(timeout=300_000)
    idle(viewer)
    shoot(viewer, "06b_summary_shared_link")
    assert not errors, errors


def test_two_sessions_share_the_model_but_not_plans(pages, tmp_path):
    """Two people on a fresh server: one quick analysis and one model for both, separate plans and pruned
    models. (On a fresh server the sessions also import the heavy modules at the same time: plotly once
    failed there on a half-imported pandas.)"""
    with running_server(tmp_path) as server:
        a, b = pages(), pages()
        for page in (a, b):  # both at once: the second waits for the first's analysis
            page.goto(server + "/prune")
        for page in (a, b):
            page.get_by_text("Apply and compare").wait_for(timeout=300_000)
            idle(page)
            assert metric(page, "Layers") == "22 / 30"
        slider_keys(a, "pr_ratio", "ArrowRight", 25)  # 0.50 -> 15 layers removed
        slider_keys(b, "pr_ratio", "ArrowLeft", 5)  # 0.20 -> 6 removed
        a.get_by_test_id("stMetricValue").get_by_text("15 / 30").wait_for(timeout=60_000)
        b.get_by_test_id("stMetricValue").get_by_text("24 / 30").wait_for(timeout=60_000)
        idle(a)
        a.get_by_role("button", name="Apply plan").click()
        a.get_by_text("Pruned (15 layers)").wait_for(timeout=600_000)
        nav(b, "Summary")
        b.get_by_text("24 of 30 layers kept").first.wait_for(timeout=300_000)
        nav(b, "Export")
        expect(b.get_by_text("No pruned model in this session yet")).to_be_visible(timeout=60_000)
        nav(a, "Summary")
        a.get_by_text("15 of 30 layers kept").first.wait_for(timeout=300_000)
        shoot(a, "07_session_a")
        shoot(b, "07_session_b")


def test_cancel_keeps_earlier_results(server, pages):
    page = pages()
    page.goto(server)
    page.get_by_text("Model card").wait_for(timeout=300_000)
    idle(page)
    page.locator(".st-key-md_samples input").fill("512")
    page.locator(".st-key-md_samples input").press("Enter")
    idle(page)
    page.get_by_role("button", name="Analyze").click()
    cancel = page.get_by_role("button", name="Cancel")
    cancel.wait_for(timeout=120_000)
    page.wait_for_timeout(1500)
    cancel.click()
    page.get_by_text("Analysis cancelled").wait_for(timeout=300_000)
    idle(page)
    expect(page.get_by_text("Model card")).to_be_visible()  # the earlier report stays on screen
    assert metric(page, "Decoder layers") == "30"
    shoot(page, "08_cancelled")


def test_sweep_stop_shows_the_finished_points(server, pages):
    page = pages()
    page.goto(server)
    page.get_by_text("Model card").wait_for(timeout=300_000)
    idle(page)
    nav(page, "Evaluate")
    page.locator(".st-key-ev_seq_len input").fill("192")  # settings no other test sweeps: nothing saved yet
    page.locator(".st-key-ev_seq_len input").press("Enter")
    idle(page)
    run = page.get_by_role("button", name="Run sweep")
    expect(run).to_have_count(1, timeout=60_000)  # not the stale copy of a rerun in flight
    run.click()
    page.get_by_text(re.compile(r"\b[3-9]/\d+ evaluations")).first.wait_for(timeout=600_000)
    page.get_by_role("button", name="Stop").click()
    page.get_by_text("Sweep stopped").wait_for(timeout=120_000)
    idle(page)
    expect(page.get_by_text("shown below").first).to_be_visible()
    expect(page.get_by_text("Perplexity vs. pruning ratio").first).to_be_visible()
    expect(page.get_by_text("a stopped sweep").first).to_be_visible()
    expect(page.get_by_text("MMLU was not part of this sweep")).to_have_count(0)  # it was; none finished
    shoot(page, "10_sweep_stopped")


def test_uploads_are_checked_and_private(server, pages, tmp_path):
    good = tmp_path / "my_notes.txt"
    good.write_text("\n\n".join(f"Note {i}: the committee met again to discuss the budget for the new library "
                                f"building and agreed to meet next week." for i in range(12)), encoding="utf-8")
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02" * 2000)
    a, b = pages(), pages()
    for page in (a, b):
        page.goto(server)
        page.get_by_text("Model card").wait_for(timeout=300_000)
        idle(page)
    choose(a, "md_data_source", "Upload a file")
    idle(a)
    a.locator(".st-key-md_upload input[type='file']").set_input_files(str(binary))
    idle(a)
    a.get_by_role("button", name="Analyze").click()
    idle(a)
    expect(a.get_by_text("looks like a binary file").first).to_be_visible(timeout=120_000)
    expect(a.get_by_text("'weights.txt' looks like a binary file").first).to_be_visible()  # not the temp copy
    assert metric(a, "Decoder layers") == "30"  # the earlier analysis stays
    a.locator(".st-key-md_upload input[type='file']").set_input_files(str(good))
    idle(a)
    a.locator(".st-key-md_samples input").fill("4")
    a.locator(".st-key-md_samples input").press("Enter")
    idle(a)
    a.get_by_role("button", name="Analyze").click()
    a.get_by_text("upload:my_notes.txt").first.wait_for(timeout=300_000)
    idle(a)
    shoot(a, "09_upload")
    # the other session still analyses the bundled corpus and cannot see the upload
    b.reload()
    b.get_by_text("Model card").wait_for(timeout=300_000)
    idle(b)
    expect(b.get_by_text("of default:calibration").first).to_be_visible()
    assert b.get_by_text("my_notes.txt").count() == 0


def test_share_link_opened_first_on_a_fresh_server_goes_through_the_router(browser, tmp_path):
    """On a fresh server Streamlit runs a deep link's page file without app.py (its pages-folder mode:
    automatic page list with a 'ui' entry, no share-link settings); the page must hand the run to the
    router, which opens the linked page with the link's settings."""
    with running_server(tmp_path) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{url}/summary?strategy=bi&ratio=0.2")
        idle(page)
        nav = page.get_by_test_id("stSidebarNav")
        expect(nav.get_by_role("link", name="Model & data")).to_be_visible(timeout=60_000)
        expect(nav.get_by_role("link", name="ui")).to_have_count(0)
        expect(page.locator("h1").first).to_contain_text("24 of 30 layers kept", timeout=300_000)  # ratio 0.2
        assert "/summary" in page.url and "ratio=0.2" in page.url and "page=" not in page.url
        shoot(page, "deep-link-summary")
        page.close()


def test_five_sessions_opening_a_fresh_server_at_once(pages, tmp_path):
    """A demo link opened by five people together: every session gets the real heatmaps, no page or server
    error, and the server runs the quick analysis once (the other sessions read the saved report)."""
    with running_server(tmp_path) as url:
        sessions = [pages() for _ in range(5)]
        errors: list[str] = []
        for page in sessions:
            page.on("pageerror", lambda e: errors.append(str(e)))
        t0 = time.perf_counter()
        for page in sessions:
            page.goto(url)
        for page in sessions:
            page.get_by_text("Model card").wait_for(timeout=600_000)
            plots(page, 2)
            idle(page)
        elapsed = time.perf_counter() - t0
        labels = [page.get_by_test_id("stExpander").first.inner_text() for page in sessions]
        print(f"\nfive sessions: all heatmaps after {elapsed:.1f} s; status labels: {labels}")
        assert all(metric(page, "Decoder layers") == "30" for page in sessions)
        assert sum("Analyzed 30 layers" in label for label in labels) == 1, labels
        assert not errors, errors
        assert len(list((tmp_path / "runs" / "dashboard" / "analyze").glob("*.json"))) == 1
        shoot(sessions[-1], "09_fifth_session")


def test_first_open_analysis_survives_a_click_on_another_page(pages, tmp_path):
    """A click during the first-open analysis used to lose it (the click's rerun stopped the run doing
    it; 4 of 10 tries ended at "No analysis yet"). Now the analysis runs in its own thread and the page
    the user went to shows its progress and then the charts, every time. Each try opens a new session with
    a new sample count (so its analysis really runs, not read back) and clicks at another moment: while
    the model loads (first try), while it analyses."""
    with running_server(tmp_path) as url:
        for i, (delay, target) in enumerate([(5, "Model & data"), (2, "Redundancy"), (4, "Model & data"),
                                             (6, "Redundancy"), (3, "Model & data")]):
            page = pages()
            page.goto(f"{url}/?samples={9 + i}")
            page.get_by_text("Quick first analysis").first.wait_for(timeout=120_000)
            page.wait_for_timeout(delay * 1000)
            page.get_by_test_id("stSidebarNav").get_by_role("link", name=target).click()
            if target == "Model & data":
                page.get_by_text("Model card").wait_for(timeout=240_000)
                plots(page, 2)
            else:
                plots(page, 3, timeout=240_000)
            idle(page)
            assert page.get_by_text("No analysis yet").count() == 0, (i, delay, target)
            expect(page.get_by_text(f"{9 + i} samples").first).to_be_visible()  # this try's own analysis
            page.context.close()


def test_an_offline_tour_of_the_seven_pages_requests_nothing_from_other_hosts(pages, tmp_path):
    """An offline demo must not reach out: every request of a tour of the seven pages goes to the app's own
    server (the tab icon was a Material Symbols SVG from a font CDN; usage statistics are off in
    .streamlit/config.toml, which this server reads: no --browser.gatherUsageStats flag here). On the way,
    a link copied on Evaluate before any sweep carries the session's state and the sidebar stays."""
    with running_server(tmp_path, stats_flag=False) as url:
        page = pages()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url)
        page.get_by_text("Model card").wait_for(timeout=300_000)
        plots(page, 2)
        idle(page)
        for title in ("Redundancy", "Prune", "Heal", "Evaluate", "Export", "Summary", "Model & data"):
            nav(page, title)
            page.wait_for_timeout(1500)
            if title == "Evaluate":
                # the page may first wait for the Prune page's background measurement of the original (it holds
                # the model ~5 s after Prune opens) before it times a window for its estimate
                expect(page.get_by_text("No sweep for these settings yet").first).to_be_visible(timeout=60_000)
                expect(page.get_by_test_id("stSidebar").get_by_text("This session")).to_be_visible()
                assert "model=" in page.url and "samples=" in page.url, page.url
                page.locator(".st-key-ev_windows input").fill("3")
                page.locator(".st-key-ev_windows input").press("Enter")
                idle(page)
                page.wait_for_function("() => location.search.includes('ev_windows=3')", timeout=30_000)
        own = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/")
        outside = sorted({u for u in requests if not own.match(u) and not u.startswith(("data:", "blob:"))})
        print(f"\n{len(requests)} requests, {len(outside)} to other hosts")
        assert requests and not outside, outside
