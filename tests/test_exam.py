"""The memory exam: a cell resumes from its cache without retraining, the exam's seeds make
two runs of one cell identical, a directory of other settings is refused naming the keys,
horizons a task cannot take are reported as such, unknown kinds and tasks get a
did-you-mean."""

import pytest

from memvla import exam
from memvla.exam import ExamSettings, horizon_value, run_cell, run_exam


def _settings(**changes):
    return ExamSettings.quick(**{"tasks": ["remember-color"], "kinds": ["plain"],
                                 "episodes": 6, "steps": 2, "eval_episodes": 2,
                                 "multiples": [1, 3], **changes})


def test_a_cell_resumes_from_its_cache_without_retraining(tmp_path, monkeypatch):
    s = _settings()
    first = run_exam(tmp_path, s, workers=1, progress=False)
    kinds = [c["kind"] for c in first["cells"]]
    assert kinds == ["plain", "plain-twin"] and (tmp_path / "report.md").is_file()
    assert (tmp_path / "heatmap.png").is_file()
    cell = first["cells"][0]
    assert cell["horizons"]["1"]["value"] == 8 and cell["horizons"]["3"]["value"] == 24
    assert 0 <= cell["horizons"]["3"]["success"] <= 1 and cell["chance"] == pytest.approx(1 / 3)
    outcomes = cell["horizons"]["3"]["outcomes"]  # every evaluated episode ended one way
    assert sum(outcomes.values()) == 2 and outcomes["success"] == 2 * cell["horizons"]["3"][
        "success"]
    report = (tmp_path / "report.md").read_text()
    assert "ran out of steps" in report and "s of one core each in all" in report
    assert cell["cell_seconds"] >= cell["train_seconds"] > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr(exam, "run_cell", no_training)
    again = run_exam(tmp_path, s, workers=1, progress=False)
    assert all(c["cached"] for c in again["cells"])
    assert [c["horizons"] for c in again["cells"]] == [c["horizons"] for c in first["cells"]]
    report = run_exam(tmp_path, _settings(kinds=["plain", "bank"], tasks=["remember-color",
                                                                        "shell-game"]),
                      workers=1, progress=False, train=False)  # the cached cells only
    assert [c["kind"] for c in report["cells"]] == ["plain", "plain-twin"]
    assert report["not_run"] == ["remember-color/bank", "shell-game/plain", "shell-game/bank",
                                 "shell-game/plain-twin"]
    text = (tmp_path / "report.md").read_text()
    assert "## shell-game\n\nNot run." in text
    assert "Not run (no cached cell): remember-color/bank" in text
    assert not (tmp_path / "data" / "shell-game").exists()  # nothing recorded either


def test_the_seeds_make_two_runs_of_a_cell_identical(tmp_path):
    s = _settings(kinds=["memory-bptt"], multiples=[1])
    from dataclasses import asdict

    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        exam.check_directory(out, s)
        data = exam.record_task_data(out, s, "remember-color", progress=False)
        results.append(run_cell(str(out), asdict(s), "remember-color", "memory-bptt",
                                str(data[False])))
    a, b = results
    assert a["final_loss"] == b["final_loss"] and a["horizons"] == b["horizons"]
    assert a["state_bytes"] > 0  # memory tokens carry a state


def test_a_directory_of_other_settings_is_refused_by_key(tmp_path):
    exam.check_directory(tmp_path, _settings())
    exam.check_directory(tmp_path, _settings(kinds=["plain", "bank"]))  # more cells: fine
    with pytest.raises(ValueError, match=r"an exam of other settings \(steps is 2 there, 3 "
                       r"here\); its cells would be mixed"):
        exam.check_directory(tmp_path, _settings(steps=3))


def test_horizons_beyond_a_task_and_bad_names():
    s = ExamSettings()
    assert horizon_value(s, "remember-color", 10) == 300
    assert horizon_value(s, "seq-of-colors", 3) == 9
    assert horizon_value(s, "seq-of-colors", 10) is None  # 30 colours: the task has 9
    assert s.task_steps("remember-color") == 3000 and s.task_steps("take-it-back") == 9000
    assert ExamSettings.quick().task_steps("take-it-back") == 150  # a check, not a result
    with pytest.raises(ValueError, match=r"unknown exam kind 'memory-bpt'.*memory-bptt"):
        ExamSettings(kinds=["memory-bpt"])
    with pytest.raises(ValueError, match=r"unknown exam task 'shell-gam'.*shell-game"):
        ExamSettings(tasks=["shell-gam"])
    with pytest.raises(ValueError, match=r"exam multiples must be integers >= 1"):
        ExamSettings(multiples=[0])


def test_a_failing_cell_stops_the_exam_and_names_itself(tmp_path, monkeypatch):
    """A cell that fails in a worker stops the exam at once (the pending cells are not
    run), naming the cell; nothing is cached for it."""
    monkeypatch.setattr(exam, "record_task_data",
                        lambda out, s, task, progress: {False: tmp_path / "missing",
                                                        True: tmp_path / "missing"})
    with pytest.raises(RuntimeError, match=r"exam cell remember-color/(plain|plain-twin) "
                                           r"failed .*rerun to resume"):
        run_exam(tmp_path, _settings(), workers=2, progress=False)
    assert not (tmp_path / "cells").exists()


def test_a_cached_cell_of_another_definition_is_refused(tmp_path):
    """A cell records the overrides it trained with; when its kind's definition changes
    the cache is refused with the differing overrides named, never reused."""
    import json

    s = _settings()
    run_exam(tmp_path, s, workers=1, progress=False)
    path = tmp_path / "cells" / "remember-color" / "plain.json"
    cell = json.loads(path.read_text())
    assert cell["preset"] == "tiny" and isinstance(cell["overrides"], list)
    cell["overrides"] = [*cell["overrides"], "policy.context.num_turns=4"]
    path.write_text(json.dumps(cell))
    with pytest.raises(ValueError, match=r"another definition of 'plain' .*num_turns=4"):
        run_exam(tmp_path, s, workers=1, progress=False)
    twin = tmp_path / "cells" / "remember-color" / "plain-twin.json"
    cell = json.loads(twin.read_text())
    assert cell["steps"] == s.steps
    twin.write_text(json.dumps({**cell, "steps": 3 * s.steps}))  # trained for other steps
    path.unlink()
    with pytest.raises(ValueError, match=r"plain-twin\.json: this cell was trained for 6 "
                       r"steps, 'remember-color' cells now train for 2"):
        run_exam(tmp_path, s, workers=1, progress=False)


def test_a_cache_from_another_version_of_its_task_is_refused(tmp_path, monkeypatch):
    """Cells and data record their task's version; after the task's episodes change (its
    version bumped) both are refused, naming the versions, never mixed."""
    import json

    from memvla.envs.remember_color import RememberColorEnv

    s = _settings()
    run_exam(tmp_path, s, workers=1, progress=False)
    path = tmp_path / "cells" / "remember-color" / "plain.json"
    assert json.loads(path.read_text())["task_version"] == RememberColorEnv.version
    info = json.loads((tmp_path / "data" / "remember-color" / "meta" / "info.json").read_text())
    assert info["memvla"]["task_version"] == RememberColorEnv.version
    monkeypatch.setattr(RememberColorEnv, "version", RememberColorEnv.version + 1)
    with pytest.raises(ValueError, match=r"data/remember-color: recorded with version 1 of "
                       r"'remember-color', this memvla has version 2"):
        run_exam(tmp_path, s, workers=1, progress=False)
    for d in ("remember-color", "remember-color-twin"):  # new data: the cells still refused
        info = tmp_path / "data" / d / "meta" / "info.json"
        meta = json.loads(info.read_text())
        meta["memvla"]["task_version"] = 2
        info.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"plain\.json: recorded with version 1"):
        run_exam(tmp_path, s, workers=1, progress=False)
