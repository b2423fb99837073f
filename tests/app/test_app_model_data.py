"""AppTest: Model & data page (first-open quick analysis, model card, bad input kept as st.error)."""

from __future__ import annotations

import pytest


@pytest.fixture
def app(open_app, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERLENS_DATA_ROOT", str(tmp_path / "root"))
    (tmp_path / "root").mkdir(exist_ok=True)
    return open_app()


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_first_open_runs_quick_analysis_and_shows_heatmaps(app):
    app.run()
    assert not app.exception
    assert not app.error
    assert _metrics(app)["Decoder layers"] == "6"
    charts = app.get("plotly_chart")
    assert len(charts) == 2  # first look: heatmap + BI bars
    # widgets exist with working defaults
    assert app.radio(key="md_model_source").value == "default"
    assert app.selectbox(key="md_dtype").value == "auto"
    assert app.selectbox(key="md_data_source").value == "default"
    assert app.number_input(key="md_samples").value == 8
    assert app.checkbox(key="md_trust").value is False
    assert app.button(key="md_analyze")
    # the report is persisted; pressing Analyze again reloads it from disk
    app.button(key="md_analyze").click().run()
    assert not app.exception and not app.error
    assert any("Loaded the saved analysis" in s.label for s in app.status)


def test_bad_inputs_show_one_sentence_and_keep_results(app):
    app.run()
    assert _metrics(app)["Decoder layers"] == "6"
    # hub id while offline
    app.radio(key="md_model_source").set_value("hub").run()
    app.text_input(key="md_hub_id").set_value("nobody/does-not-exist").run()
    app.button(key="md_analyze").click().run()
    assert not app.exception
    assert len(app.error) == 1 and "nobody/does-not-exist" in app.error[0].value
    assert _metrics(app)["Decoder layers"] == "6"  # earlier results stay on screen
    # local folder outside LAYERLENS_DATA_ROOT
    app.radio(key="md_model_source").set_value("local").run()
    app.text_input(key="md_local_path").set_value("/etc").run()
    app.button(key="md_analyze").click().run()
    assert not app.exception
    assert "outside the allowed data folder" in app.error[0].value
    # sequence length above the model's limit (tiny model: 256 positions)
    app.radio(key="md_model_source").set_value("default").run()
    app.number_input(key="md_seq_len").set_value(1024).run()
    app.button(key="md_analyze").click().run()
    assert not app.exception
    assert "256" in app.error[0].value and "seq-len" in app.error[0].value.lower()
    assert _metrics(app)["Decoder layers"] == "6"
    # data file path outside the root / missing
    app.number_input(key="md_seq_len").set_value(64).run()
    app.selectbox(key="md_data_source").set_value("path").run()
    app.text_input(key="md_data_path").set_value("../../etc/passwd").run()
    app.button(key="md_analyze").click().run()
    assert "outside the allowed data folder" in app.error[0].value
    assert not app.exception


def test_trust_remote_code_warns(app):
    app.run()
    assert not any("Remote code" in w.value for w in app.warning)
    app.checkbox(key="md_trust").check().run()
    assert any("Remote code runs" in w.value for w in app.warning)


def test_local_data_file_under_root_is_analyzed(app, tmp_path):
    (tmp_path / "root" / "cal.txt").write_text(
        "\n\n".join(
            f"Paragraph {i}: the quick brown fox jumps over the lazy dog again and again." for i in range(12)
        )
    )
    app.run()
    app.selectbox(key="md_data_source").set_value("path").run()
    app.text_input(key="md_data_path").set_value("cal.txt").run()
    app.number_input(key="md_samples").set_value(4).run()
    app.button(key="md_analyze").click().run()
    assert not app.exception and not app.error
    assert any("cal.txt" in c.value for c in app.caption)


def test_skip_first_tokens_reaches_the_analysis(app):
    app.run()
    before = app.session_state["ll_report"].meta["tokens"]
    app.number_input(key="md_skip_first").set_value(1).run()
    app.button(key="md_analyze").click().run()
    assert not app.exception and not app.error
    report = app.session_state["ll_report"]
    assert report.meta["skip_first"] == 1 and report.meta["tokens"] == before - report.meta["samples"]
    assert any("first 1 token(s) of each sample skipped" in c.value for c in app.caption)


def test_sessions_opening_at_once_share_one_analysis(open_app, monkeypatch):
    """Several people opening the demo together: the first session analyses, the others wait for the
    model and then read the report it saved instead of running the same analysis again."""
    import threading
    import time

    import layerlens.metrics as metrics

    calls = []
    real = metrics.analyze

    def slow_counted(*args, **kwargs):
        calls.append(1)
        time.sleep(1.0)  # long enough that the other sessions are already waiting for the model
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "analyze", slow_counted)
    sessions = [open_app() for _ in range(3)]
    threads = [threading.Thread(target=s.run) for s in sessions]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert len(calls) == 1
    reports = [s.session_state["ll_report"] for s in sessions]
    assert all(not s.exception and not s.error for s in sessions)
    assert all(r.cosine == reports[0].cosine for r in reports)
    labels = [st.label for s in sessions for st in s.status]
    assert sum("another session just saved" in label for label in labels) == 2


def test_a_missing_local_folder_is_said_to_be_missing_once_however_often_clicked(app):
    """"Local folder: models/does-not-exist" was reported as "Hugging Face Hub cannot be reached
    (offline?)": a folder the user typed as a folder is a folder. Each click replaces the last message."""
    app.run()
    app.radio(key="md_model_source").set_value("local").run()
    app.text_input(key="md_local_path").set_value("models/does-not-exist").run()
    for _ in range(3):
        app.button(key="md_analyze").click().run()
        assert not app.exception
        assert len(app.error) == 1, [e.value for e in app.error]
        assert app.error[0].value.startswith("The folder 'models/does-not-exist' does not exist")
        assert "Hub" not in app.error[0].value
    assert _metrics(app)["Decoder layers"] == "6"  # earlier results stay on screen


def test_a_bad_upload_is_named_by_the_users_file_name(app):
    """The message named the temp copy (/tmp/layerlens-upload-…/upload.txt), not the user's file."""
    app.run()
    app.selectbox(key="md_data_source").set_value("upload").run()
    app.file_uploader(key="md_upload").set_value(("weights.txt", b"\x00\x01\x02" * 2000, "text/plain")).run()
    app.button(key="md_analyze").click().run()
    assert not app.exception
    assert len(app.error) == 1 and "binary" in app.error[0].value
    assert "'weights.txt'" in app.error[0].value and "layerlens-upload" not in app.error[0].value
    assert _metrics(app)["Decoder layers"] == "6"
