"""AppTest: Apply's quick before/after (issue 14 items 3, 6, 11): progress step by step, the original's
speed measured once (not at every Apply), and an unexpected error shown as one sentence naming a log."""

from __future__ import annotations

import pytest

from layerlens import compare


@pytest.fixture
def app(open_app):
    return open_app("pages/3_prune.py")


def test_apply_shows_progress_and_measures_the_original_once(app, monkeypatch):
    measured, steps = [], []
    real_measure, real_compare = compare.measure_generation, compare.quick_compare

    def measure(models, names, *args, **kwargs):
        measured.append(list(names))
        return real_measure(models, names, *args, **kwargs)

    def quick(*args, progress=None, **kwargs):
        assert progress is not None  # the page passes its progress bar

        def spy(done, total, label):
            steps.append(label)
            progress(done, total, label)

        return real_compare(*args, progress=spy, **kwargs)

    monkeypatch.setattr(compare, "measure_generation", measure)
    monkeypatch.setattr(compare, "quick_compare", quick)
    app.run()
    resources = __import__("pages._ui.resources", fromlist=["quick_store"])
    store = resources.quick_store()
    # opening the page starts measuring the original in the background (issue 14 item 6: first Apply <= 5 s)
    originals = [k for k in store._running if k[0] == "original"]
    assert len(originals) == 1
    store.wait(originals[0])
    assert measured == [["Original model"]] and store.get(originals[0]).speed.runs
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error
    assert measured == [["Original model"], ["Pruned model"]]  # first Apply: only the pruned model
    assert any("Timing generation" in s for s in steps) and steps[-1] == "Done"
    assert not app.get("progress")  # the bar is gone once the numbers are on screen
    app.slider(key="pr_ratio").set_value(0.5).run()
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error
    assert measured[1:] == [["Pruned model"], ["Pruned model"]]  # the original's figure is reused
    originals = [k for k in store._items if k[0] == "original"]
    assert len(originals) == 1


def test_apply_right_after_opening_waits_for_the_background_measurement(app, monkeypatch):
    """Apply pressed while the original is still measured in the background: it waits for that measurement
    (no second measurement, no "another session" message) and shows a comparison against it."""
    measured = []
    real_measure = compare.measure_generation

    def slow_measure(models, names, *args, **kwargs):
        measured.append(list(names))
        if names == ["Original model"]:
            __import__("time").sleep(1.0)  # still running when Apply is pressed
        return real_measure(models, names, *args, **kwargs)

    monkeypatch.setattr(compare, "measure_generation", slow_measure)
    app.run()
    app.button(key="pr_apply").click().run()
    assert not app.exception and not app.error
    assert not [i for i in app.info if "Another session" in i.value]
    assert measured == [["Original model"], ["Pruned model"]]
    assert app.session_state["ll_pruned"]["original"]["tokens_per_s"] > 0


def test_an_unexpected_error_is_one_sentence_naming_the_log(app, app_env, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("a bug deep in the library\nwith a second line")

    monkeypatch.setattr(compare, "quick_compare", boom)
    app.run()
    app.button(key="pr_apply").click().run()
    assert not app.exception  # no exception box, no traceback on screen
    (err,) = [e.value for e in app.error]
    assert err.startswith("Unexpected error while applying the plan (RuntimeError: a bug deep in the library)")
    assert "second line" not in err
    (log,) = (app_env / "runs" / "logs").glob("layerlens-*.log")
    assert f"full log is in {log}" in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "a bug deep in the library" in text


def test_waiting_for_the_model_names_this_processs_background_work():
    """A page waiting for the model's lock says which work holds it (not "another session") when it is this
    process's own background measurement or healing run."""
    import threading

    from pages._ui.resources import SharedModel, model_lock

    shared = SharedModel(loaded=None, lock=threading.RLock(), per_layer_params=())
    said, held, release = [], threading.Event(), threading.Event()

    class Note:
        def info(self, text, **kwargs):
            said.append(text)
            release.set()

    def hold():
        with shared.lock:
            shared.busy = "healing run (Heal page)"
            held.set()
            release.wait(10)
            shared.busy = ""

    worker = threading.Thread(target=hold)
    worker.start()
    held.wait(10)
    with model_lock(shared, Note()):
        pass
    worker.join()
    assert said == ["Waiting for the healing run (Heal page) to finish…"]
    with model_lock(shared, Note()):  # free: nothing said
        pass
    assert len(said) == 1
