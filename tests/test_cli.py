"""The studies' command line and the resumable-CSV machinery of ``studies._core``.

The central property: a study killed midway and rerun resumes, and its final
CSV equals, byte for byte, that of an uninterrupted run with the same seed —
whether it was stopped by an exception, by SIGKILL, or left a half-written unit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from studies import STUDIES
from studies import projector_moments as pm
from studies.__main__ import main, run_study
from studies._core import StudyContext, quick_from_env, unit_seed

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["group", "k", "rep", "value"]
KEYS = ["group", "k"]
UNITS = [{"group": g, "k": k} for g in ("a", "b") for k in range(6)]
# small settings of the real study, for the command-line tests
SMALL = {"n": "8", "ranks": "1,2,8", "n_reps": "300", "families": "haar,gaussian,rademacher"}


def toy_unit(unit, seed):
    """Three rows per unit from a numpy generator seeded by the unit seed."""
    rng = np.random.default_rng(seed)
    return [{**unit, "rep": i, "value": rng.standard_normal()} for i in range(3)]


class Boom(RuntimeError):
    pass


def _failing_after(n_ok, fn=toy_unit):
    calls = {"n": 0}

    def unit(u, s):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise Boom("simulated crash")
        return fn(u, s)

    return unit


def _run(out, fn=toy_unit, **kw):
    ctx = StudyContext("toy", out, progress=False, **kw)
    rows = ctx.run_units("toy.csv", COLUMNS, KEYS, UNITS, fn)
    return ctx, rows


def test_unit_seed_depends_only_on_seed_and_key():
    assert unit_seed(0, ("a", 1)) == unit_seed(0, ("a", 1))
    assert len({unit_seed(0, ("a", k)) for k in range(50)}) == 50
    assert unit_seed(0, ("a", 1)) != unit_seed(1, ("a", 1))


def test_resume_after_exception_equals_uninterrupted(tmp_path):
    _run(tmp_path / "ref")
    with pytest.raises(Boom):
        _run(tmp_path / "int", fn=_failing_after(4))
    partial = (tmp_path / "int" / "toy.csv").read_text().splitlines()
    assert len(partial) == 1 + 4 * 3  # header + the 4 finished units, nothing lost
    calls = []

    def counting(u, s):
        calls.append((u["group"], u["k"]))
        return toy_unit(u, s)

    ctx, _ = _run(tmp_path / "int", fn=counting)
    assert len(calls) == len(UNITS) - 4  # finished units are not redone
    assert ctx._units["toy.csv"] == {"computed": len(UNITS) - 4, "resumed": 4}
    assert (tmp_path / "int" / "toy.csv").read_bytes() == (tmp_path / "ref" / "toy.csv").read_bytes()


def test_half_written_unit_and_truncated_line_are_recomputed(tmp_path):
    _run(tmp_path / "ref")
    out = tmp_path / "int"
    with pytest.raises(Boom):
        _run(out, fn=_failing_after(5))
    # simulate a kill while the 6th unit was being written: one full row and a cut one
    rows = toy_unit(UNITS[5], 0)
    with (out / "toy.csv").open("a") as fh:
        fh.write(f"{rows[0]['group']},{rows[0]['k']},0,0.5\n{rows[1]['group']},{rows[1]['k']},1,0.2")
    # and a journal line cut in the middle
    with (out / ".toy.units.jsonl").open("a") as fh:
        fh.write('{"key": ["b", "0"], "ro')
    _run(out)
    assert (out / "toy.csv").read_bytes() == (tmp_path / "ref" / "toy.csv").read_bytes()


def test_results_written_before_journal_are_resumed(tmp_path):
    """A CSV without a journal (older runs): complete rows count as done."""
    _run(tmp_path / "ref")
    out = tmp_path / "legacy"
    with pytest.raises(Boom):
        _run(out, fn=_failing_after(3))
    (out / ".toy.units.jsonl").unlink()
    calls = []
    _run(out, fn=lambda u, s: calls.append(1) or toy_unit(u, s))
    assert len(calls) == len(UNITS) - 3
    assert (out / "toy.csv").read_bytes() == (tmp_path / "ref" / "toy.csv").read_bytes()


def test_resume_into_other_configuration_is_refused(tmp_path):
    _run(tmp_path, seed=0)
    with pytest.raises(ValueError, match="seed"):
        _run(tmp_path, seed=1)
    with pytest.raises(ValueError, match="quick"):
        _run(tmp_path, quick=False)
    _, rows = _run(tmp_path, seed=1, fresh=True)
    _run(tmp_path / "other", seed=1)
    assert (tmp_path / "toy.csv").read_bytes() == (tmp_path / "other" / "toy.csv").read_bytes()


def test_bad_units_are_rejected(tmp_path):
    ctx = StudyContext("toy", tmp_path, progress=False)
    with pytest.raises(ValueError, match="key_columns"):
        ctx.run_units("x.csv", COLUMNS, ["nope"], UNITS, toy_unit)
    with pytest.raises(ValueError, match="duplicate"):
        ctx.run_units("x.csv", COLUMNS, ["group"], UNITS, toy_unit)
    with pytest.raises(ValueError, match="lacks columns"):
        ctx.run_units("y.csv", COLUMNS, KEYS, UNITS, lambda u, s: [{**u, "rep": 0}])


def test_threading_backend_context_gives_the_same_csv(tmp_path):
    """Units fan out through joblib and honour an enclosing parallel_config."""
    import joblib

    _run(tmp_path / "seq", n_jobs=1)
    with joblib.parallel_config(backend="threading", n_jobs=2):
        _run(tmp_path / "par")  # n_jobs=None: taken from the context
    assert (tmp_path / "par" / "toy.csv").read_bytes() == (tmp_path / "seq" / "toy.csv").read_bytes()


def test_param_overrides_and_checks(tmp_path):
    ctx = StudyContext("toy", tmp_path, quick=False, extra={"n_reps": "7", "ranks": "1,4", "flag": "no"})
    assert ctx.param("n_reps", 10, 1000) == 7
    assert ctx.param("ranks", [1], [1, 2]) == [1, 4]
    assert ctx.param("flag", True) is False
    assert ctx.param("other", 1, 2) == 2
    ctx.add_check("demo", False, why="because")
    info = json.loads(ctx.finish().read_text())
    assert info["config"] == {"n_reps": 7, "ranks": [1, 4], "flag": False, "other": 2}
    assert info["checks"] == [{"check": "demo", "passed": False, "why": "because"}]
    assert info["checks_passed"] is False
    for key in ("versions", "git_commit", "wall_s", "seed", "quick", "units", "timings_s"):
        assert key in info
    with pytest.raises(ValueError, match="n_reps"):
        StudyContext("toy", tmp_path / "b", extra={"n_reps": "many"}).param("n_reps", 1)


def test_quick_from_env(monkeypatch):
    monkeypatch.delenv("LRSGE_QUICK", raising=False)
    assert quick_from_env() is True and quick_from_env(False) is False
    monkeypatch.setenv("LRSGE_QUICK", "0")
    assert quick_from_env() is False
    monkeypatch.setenv("LRSGE_QUICK", "1")
    assert quick_from_env(False) is True


def test_list_and_unknown(capsys):
    assert main([]) == 0
    listed = capsys.readouterr().out
    for name in STUDIES:
        assert name in listed
    assert main(["no-such-study"]) == 2
    with pytest.raises(ValueError, match="unknown study"):
        run_study("no-such-study", quick=True, out=None)
    with pytest.raises(SystemExit):
        main(["projector-moments", "--set", "novalue"])


def _argv(out, *extra):
    argv = ["projector-moments", "--quick", "--out", str(out), "--no-progress", "--seed", "5"]
    for k, v in SMALL.items():
        argv += ["--set", f"{k}={v}"]
    return argv + list(extra)


def test_cli_study_killed_midway_resumes_to_the_same_csv(tmp_path, monkeypatch, capsys):
    """A real study through the command line: crash after 4 units, rerun, compare."""
    assert main(_argv(tmp_path / "ref")) == 0
    real = pm._unit
    monkeypatch.setattr(pm, "_unit", _failing_after(4, real))
    with pytest.raises(Boom):
        main(_argv(tmp_path / "int"))
    monkeypatch.setattr(pm, "_unit", real)
    assert main(_argv(tmp_path / "int")) == 0
    ref, got = tmp_path / "ref" / pm.CSV, tmp_path / "int" / pm.CSV
    assert got.read_bytes() == ref.read_bytes()
    info = json.loads((tmp_path / "int" / "run.json").read_text())
    assert info["units"][pm.CSV] == {"computed": 9 - 4, "resumed": 4}
    assert info["checks_passed"], [c for c in info["checks"] if not c["passed"]]
    assert (tmp_path / "int" / "projector_moments.png").stat().st_size > 0
    assert "checks against theory passed" in capsys.readouterr().out


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from studies._core import StudyContext

    def unit(u, seed):
        time.sleep(float(sys.argv[2]))
        rng = np.random.default_rng(seed)
        return [{**u, "rep": i, "value": rng.standard_normal()} for i in range(3)]

    units = [{"group": g, "k": k} for g in ("a", "b") for k in range(10)]
    ctx = StudyContext("toy", sys.argv[1], progress=False, seed=3)
    ctx.run_units("toy.csv", ["group", "k", "rep", "value"], ["group", "k"], units, unit)
""")


def test_sigkill_midway_then_resume(tmp_path):
    """SIGKILL a running study (no chance to clean up), rerun: same CSV as uninterrupted."""
    script = tmp_path / "toy_study.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), "0"], check=True, env=env, cwd=ROOT)
    out = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.15"], env=env, cwd=ROOT)
    journal = out / ".toy.units.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= 1 + 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(journal.read_text().splitlines()) - 1
    assert 4 <= n_done < 20, "the run was not killed midway"
    subprocess.run([sys.executable, str(script), str(out), "0"], check=True, env=env, cwd=ROOT)
    assert (out / "toy.csv").read_bytes() == (tmp_path / "ref" / "toy.csv").read_bytes()


@pytest.mark.slow
def test_process_workers_give_the_same_csv(tmp_path):
    """``--n-jobs 2`` (loky worker processes) writes the same CSV as a sequential run."""
    assert main(_argv(tmp_path / "seq", "--n-jobs", "1")) == 0
    assert main(_argv(tmp_path / "par", "--n-jobs", "2")) == 0
    assert (tmp_path / "par" / pm.CSV).read_bytes() == (tmp_path / "seq" / pm.CSV).read_bytes()


def test_export_figures_downscales(tmp_path):
    from PIL import Image

    from studies.__main__ import export_figures

    Image.new("RGB", (2400, 1200), "white").save(tmp_path / "big.png")
    Image.new("RGB", (300, 200), "white").save(tmp_path / "small.png")
    out = export_figures(tmp_path, tmp_path / "docs", max_width=1000)
    assert all(p.stat().st_size < 20_000 for p in out)
    assert [p.name for p in out] == ["big.png", "small.png"]
    with Image.open(out[0]) as im:
        assert im.size == (1000, 500)
    with Image.open(out[1]) as im:
        assert im.size == (300, 200)
