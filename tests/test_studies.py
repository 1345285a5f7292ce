"""The Monte Carlo studies at small settings: schemas, agreement with theory, power.

Statistical assertions follow the suite's budget: each test fails falsely with
probability at most ``ALPHA`` (a Bonferroni split over its rows), and each has a
power check against a named wrong answer at the same sample size.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

import theory
from studies.__main__ import run_study
from studies import mse_vs_samples as mv
from studies import projector_moments as pm
from studies import unbiasedness as ub
from tests.conftest import ALPHA

DESIGN_MSE = ["method", "mode", "projector", "rank", "n_samples", "mse", "mse_se", "mse_theory", "n_reps"]
DESIGN_UNBIASED = ["method", "projector", "rank", "mode", "n_reps", "statistic", "p_value", "max_abs_z", "rejected"]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _header(path):
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def test_schemas_match_design():
    assert mv.COLUMNS == DESIGN_MSE
    assert ub.COLUMNS == DESIGN_UNBIASED


# ----------------------------------------------------------------------------- projector-moments
def test_projector_moments_study(tmp_path, stat_seed):
    path = run_study("projector-moments", quick=True, out=tmp_path, seed=stat_seed, progress=False,
                     overrides={"n": "12", "ranks": "1,3,6,12", "n_reps": "2000"})
    rows = _rows(tmp_path / pm.CSV)
    assert _header(tmp_path / pm.CSV) == pm.COLUMNS
    assert len(rows) == 5 * 4
    z_crit = stats.norm.isf(ALPHA / 2 / len(rows))
    for row in rows:
        n, r = int(row["n"]), int(row["r"])
        assert float(row["alpha_theory"]) == theory.isotropic_second_moment(row["family"], n, r)
        if row["family"] in ("haar", "coordinate"):  # exactly on the n/r line, draw by draw
            assert math.isclose(float(row["alpha_mc"]), n / r, rel_tol=1e-9)
        assert abs(float(row["z"])) < z_crit, row
    # power: the Gaussian rows at r >= 3 are far from the optimum n/r that a wrong
    # closed form (Gaussian treated as optimal) would predict
    for row in rows:
        if row["family"] == "gaussian" and int(row["r"]) >= 3:
            z_wrong = (float(row["alpha_mc"]) - float(row["alpha_optimal"])) / float(row["alpha_se"])
            assert z_wrong > z_crit, row
    info = json.loads(path.read_text())
    assert info["checks_passed"] or not all(abs(float(r["z"])) <= 3 for r in rows)
    assert (tmp_path / "projector_moments.png").exists() and (tmp_path / "projector_moments.pdf").exists()


# ----------------------------------------------------------------------------- mse-vs-samples
def test_exact_moments_match_the_population_second_moment():
    """The study's enumeration of S agrees with estimators.models.FinitePopulation."""
    model, loss_fn, pop = mv.build_problem("relu", n=6, m=3, n_data=20, seed=3)
    grad, S = mv.exact_moments(model, loss_fn, pop)
    S_pop = pop.second_moment(model, loss_fn, "fc.weight").numpy()
    g_pop = pop.exact_gradient(model, loss_fn)["fc.weight"].numpy()
    np.testing.assert_allclose(S, S_pop, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grad, g_pop, rtol=1e-10, atol=1e-14)


SMALL_MSE = {"n": "6", "m": "2", "rank": "2", "n_data": "24", "n_samples": "1,8,256", "n_reps": "600",
             "n_reps_lr": "150", "n_ref": "3000", "projectors": "full,haar,gaussian,instance"}
TINY_MSE = {**SMALL_MSE, "n_samples": "1,64", "n_reps": "40", "n_reps_lr": "10", "n_ref": "200",
            "projectors": "full,haar,instance"}


def test_mse_vs_samples_smoke(tmp_path):
    """Tiny settings: schema, every cell present, the floor formula, a figure."""
    path = run_study("mse-vs-samples", quick=True, out=tmp_path, seed=0, progress=False, overrides=TINY_MSE)
    info = json.loads(path.read_text())
    assert _header(tmp_path / mv.CSV) == DESIGN_MSE
    rows = _rows(tmp_path / mv.CSV)
    assert len(rows) == 2 * 2 * 3 * 2
    for row in rows:
        assert row["method"] in ("ipa", "lr") and row["mode"] in ("independent", "dependent")
        assert int(row["rank"]) == (6 if row["projector"] == "full" else 2)
        assert float(row["mse"]) > 0 and float(row["mse_se"]) > 0 and float(row["mse_theory"]) > 0
    # full rank: both modes are the same estimator, and theory says (tr S − ‖∇‖²)/N for both
    full = {(r["method"], r["mode"], r["n_samples"]): float(r["mse_theory"]) for r in rows if r["projector"] == "full"}
    for (meth, mode, N), th in full.items():
        assert math.isclose(th, full[(meth, "independent", N)], rel_tol=1e-9)
        assert math.isclose(th * int(N), full[(meth, mode, "1")], rel_tol=1e-9)
    # the Haar floor is (n/r − 1)‖∇‖² (theory.md §3)
    model, loss_fn, pop = mv.build_problem("relu", n=6, m=2, n_data=24, seed=info["config"]["problem_seed"])
    grad, _ = mv.exact_moments(model, loss_fn, pop)
    haar = next(c for c in info["checks"] if c["check"].startswith("mse-vs-samples ipa/dependent/haar: levels"))
    assert math.isclose(haar["floor"], (6 / 2 - 1) * float((grad ** 2).sum()), rel_tol=1e-10)
    assert (tmp_path / "mse_vs_samples.png").exists() and (tmp_path / "mse_reference.npz").exists()


def test_mse_study_resumes_to_the_same_csv(tmp_path, monkeypatch):
    """Crash after 3 units, rerun: the same CSV as an uninterrupted run (LR reference reused)."""
    small = {**TINY_MSE, "projectors": "haar,instance", "n_samples": "1", "figures": "no"}
    run_study("mse-vs-samples", quick=True, out=tmp_path / "ref", seed=1, progress=False, overrides=small)
    real, calls = mv._unit, {"n": 0}

    def crashing(u, s):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(u, s)

    monkeypatch.setattr(mv, "_unit", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_study("mse-vs-samples", quick=True, out=tmp_path / "int", seed=1, progress=False, overrides=small)
    monkeypatch.setattr(mv, "_unit", real)
    run_study("mse-vs-samples", quick=True, out=tmp_path / "int", seed=1, progress=False, overrides=small)
    assert (tmp_path / "int" / mv.CSV).read_bytes() == (tmp_path / "ref" / mv.CSV).read_bytes()


@pytest.mark.slow
def test_mse_vs_samples_agrees_with_theory(tmp_path, stat_seed):
    """Every Monte Carlo MSE within its Bonferroni bound of theory.mse; the dependent floor.

    Power: the dependent rows at the largest N against the *independent* formula
    (the wrong mode) are rejected at the same sample size.
    """
    path = run_study("mse-vs-samples", quick=True, out=tmp_path, seed=stat_seed, progress=False,
                     overrides=SMALL_MSE)
    info = json.loads(path.read_text())
    rows = _rows(tmp_path / mv.CSV)
    assert len(rows) == 2 * 2 * 4 * 3
    checks = {c["check"]: c for c in info["checks"]}
    z_crit = stats.norm.isf(ALPHA / 2 / len(rows))
    wrong = []
    for row in rows:
        label = f"mse-vs-samples {row['method']}/{row['mode']}/{row['projector']} N={row['n_samples']}"
        c = checks[f"{label}: MC within 3 SE of theory.mse"]
        assert abs(c["z"]) < z_crit, c  # z includes the SE of the estimated S (LR)
        if row["mode"] == "dependent" and row["projector"] != "full" and row["n_samples"] == "256":
            ind = next(r for r in rows if r["mode"] == "independent" and r["method"] == row["method"]
                       and r["projector"] == row["projector"] and r["n_samples"] == "256")
            tot = math.hypot(float(row["mse_se"]), c["theory_se"])
            wrong.append((float(row["mse"]) - float(ind["mse_theory"])) / tot)
    assert len(wrong) == 2 * 3 and min(wrong) > z_crit, wrong
    floors = [c for c in info["checks"] if "levels off at the floor" in c["check"]]
    assert len(floors) == 2 * 3
    for c in floors:
        assert c["theory_above_floor"] < 0.25, c


# ----------------------------------------------------------------------------- unbiasedness
SMALL_UB = {"n": "6", "m": "3", "rank": "2", "n_data": "16", "n_reps": "1500", "n_reps_loop": "250",
            "projectors": "full,haar,coordinate_replace,instance"}
TINY_UB = {**SMALL_UB, "n_reps": "300", "n_reps_loop": "30", "projectors": "haar,instance"}


def test_unbiasedness_smoke(tmp_path):
    """Tiny settings: both schema files, Holm-adjusted p-values, the controls, a figure."""
    path = run_study("unbiasedness", quick=True, out=tmp_path, seed=0, progress=False, overrides=TINY_UB)
    for fname in (ub.CSV, ub.CSV_QUADRATIC):
        assert _header(tmp_path / fname) == DESIGN_UNBIASED
        rows = _rows(tmp_path / fname)
        assert len(rows) == 3 * 2 * 2
        for row in rows:
            assert 0.0 <= float(row["p_value"]) <= 1.0 and row["rejected"] in ("True", "False")
    raw = _rows(tmp_path / ub.RAW)
    controls = [r for r in raw if r["control"] == "True"]
    assert len(controls) == 2 * 3 and all(math.isclose(float(r["c"]), 2 / 6) for r in controls)
    # the Holm adjustment never lowers a p-value
    adj = {(r["method"], r["projector"], r["mode"]): float(r["p_value"]) for r in _rows(tmp_path / ub.CSV)}
    for r in raw:
        if r["problem"] == "relu" and r["control"] == "False":
            assert adj[(r["method"], r["projector"], r["mode"])] >= float(r["p_raw"])
    info = json.loads(path.read_text())
    assert info["config"]["correction"].startswith("Holm")
    assert (tmp_path / "unbiasedness.png").exists()


@pytest.mark.slow
def test_unbiasedness_study(tmp_path, stat_seed):
    """No correct estimator is rejected (family-wise, Holm); the unscaled-Haar mutant always is."""
    run_study("unbiasedness", quick=True, out=tmp_path, seed=stat_seed, progress=False, overrides=SMALL_UB)
    for fname in (ub.CSV, ub.CSV_QUADRATIC):
        rows = _rows(tmp_path / fname)
        assert len(rows) == 3 * 4 * 2
        for row in rows:
            assert float(row["p_value"]) > ALPHA, row
    controls = [r for r in _rows(tmp_path / ub.RAW) if r["control"] == "True"]
    assert len(controls) == 2 * 3
    for r in controls:  # power: E ĝ = (r/n)∇, at the same sample size
        assert float(r["p_raw"]) < ALPHA / len(controls), r
