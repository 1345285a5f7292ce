"""theory.solve_functional: the column-generation solver against the closed forms."""

from __future__ import annotations

import numpy as np
import pytest

import theory
from theory import FunctionalResult, instance_dependent_value, solve_functional
from theory.testing import isotropy_test, second_moment_test


def _rotated(sigma, seed):
    g = np.random.default_rng(seed)
    n = len(sigma)
    Q, _ = np.linalg.qr(g.standard_normal((n, n)))
    return (Q * np.asarray(sigma, float)) @ Q.T


def _spectrum(kind, n, seed):
    g = np.random.default_rng(seed)
    if kind == "uncapped":
        return g.uniform(0.5, 1.5, n)
    s = g.uniform(0.01, 1.0, n)  # capped: a few large eigenvalues saturate at π = 1
    s[: max(1, n // 4)] = g.uniform(30, 60, max(1, n // 4))
    return s


def _check(res, S, r, c):
    sigma = np.linalg.eigvalsh(S)
    closed = instance_dependent_value(np.clip(sigma, 0, None), r, c)
    assert isinstance(res, FunctionalResult)
    assert res.converged and res.pricing_exact
    assert res.value == pytest.approx(closed, rel=1e-6)
    assert res.lower_bound <= res.value * (1 + 1e-9)
    assert res.lower_bound >= closed * (1 - 1e-6)  # certified: nothing beats the closed form
    # the mixture is feasible and has the value it claims
    k, n, rr = res.atoms.shape
    assert (n, rr) == (S.shape[0], r)
    assert res.weights.shape == (k,) and np.all(res.weights > 0)
    assert res.weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(res.mean(), c * np.eye(n), atol=1e-6 * max(1.0, c))
    assert np.trace(S @ res.second_moment()) == pytest.approx(res.value, rel=1e-6)


@pytest.mark.parametrize("kind", ["uncapped", "capped"])
@pytest.mark.parametrize("n,r", [(4, 1), (5, 2), (8, 3)])
def test_matches_closed_form(n, r, kind):
    S = _rotated(_spectrum(kind, n, 10 * n + r), seed=n + r)
    c = 0.8
    _check(solve_functional(S, r, c, rng=0), S, r, c)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uncapped", "capped"])
@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8])
def test_matches_closed_form_sweep(n, kind):
    for r in range(1, n + 1):
        for seed in range(3):
            S = _rotated(_spectrum(kind, n, 100 * seed + 10 * n + r), seed=seed)
            _check(solve_functional(S, r, 1.3, rng=seed), S, r, 1.3)
            if seed == 0:
                _check(solve_functional(S, r, 1.3, rng=seed, init="standard"), S, r, 1.3)


def test_standard_basis_start():
    S = _rotated([5.0, 2.0, 1.0, 0.5, 0.1], seed=3)
    res = solve_functional(S, 2, init="standard", rng=1)
    _check(res, S, 2, 1.0)
    assert res.history[0][0] == pytest.approx(theory.haar_value(np.linalg.eigvalsh(S), 2))


@pytest.mark.parametrize("n,r", [(4, 1), (6, 2), (7, 7)])
def test_isotropic(n, r):
    S = 2.5 * np.eye(n)
    res = solve_functional(S, r, 0.6, rng=0)
    assert res.value == pytest.approx(0.36 * (n / r) * np.trace(S), rel=1e-9)
    assert res.lower_bound == pytest.approx(res.value, rel=1e-7)


def test_singular_S_uses_ridge():
    sigma = [3.0, 2.0, 1.0, 0.0, 0.0]
    S = _rotated(sigma, seed=4)
    res = solve_functional(S, 2, rng=0)
    assert res.ridge == 1e-6 and res.converged
    ridged = np.array(sigma) + 1e-6 * sum(sigma) / 5
    assert res.value == pytest.approx(instance_dependent_value(ridged, 2), rel=1e-6)
    # the infimum for S itself is approached from above as the ridge vanishes
    assert res.value >= instance_dependent_value(sigma, 2)
    assert res.value == pytest.approx(instance_dependent_value(sigma, 2), rel=1e-2)


def test_mixture_sampling(rng, alpha):
    """Draws from the mixture: E[VVᵀ] = cI and E[(VVᵀ)²] = the mixture's M; mutant: uniform weights."""
    S = _rotated([4.0, 2.0, 1.0, 0.3], seed=5)
    res = solve_functional(S, 2, 0.9, rng=0)
    V = res.sample(20000, rng=rng)
    assert V.shape == (20000, 4, 2)
    assert isotropy_test(V, 0.9, rng=rng).pvalue > alpha
    assert second_moment_test(V, res.second_moment(), rng=rng).pvalue > alpha
    # power check, mutant "uniform weights over the atoms": E[VVᵀ] ≠ cI
    bad = FunctionalResult(value=res.value, lower_bound=res.lower_bound, atoms=res.atoms,
                           weights=np.full(res.weights.size, 1.0 / res.weights.size))
    assert isotropy_test(bad.sample(20000, rng=rng), 0.9, rng=rng).pvalue < alpha


@pytest.mark.parametrize("S,r,exc,match", [
    ([[1.0, 0.5], [0.0, 1.0]], 1, ValueError, "symmetric"),
    ([[1.0, 0.0], [0.0, -1.0]], 1, ValueError, "positive semi-definite"),
    ([[1.0, np.nan], [np.nan, 1.0]], 1, ValueError, "NaN"),
    (np.ones((2, 3)), 1, ValueError, "square"),
    (np.eye(3), 4, ValueError, "r"),
    (np.eye(3), 0, ValueError, "r"),
    (np.zeros((3, 3)), 1, ValueError, "zero"),
])
def test_bad_input(S, r, exc, match):
    with pytest.raises(exc, match=match):
        solve_functional(S, r)


def test_bad_options():
    with pytest.raises(ValueError, match="init"):
        solve_functional(np.eye(3), 1, init="random")
    with pytest.raises(ValueError, match="tol"):
        solve_functional(np.eye(3), 1, tol=-1.0)
    with pytest.raises(TypeError, match="max_iter"):
        solve_functional(np.eye(3), 1, max_iter=2.5)
    with pytest.raises(ValueError, match="c"):
        solve_functional(np.eye(3), 1, c=0.0)
