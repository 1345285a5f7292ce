"""theory.optimal: instance-independent bounds, water-filling, duality certificate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

import theory
from theory import (
    design_value,
    excess_factor,
    haar_value,
    inclusion_probabilities,
    instance_dependent_gain,
    instance_dependent_multiplier,
    instance_dependent_second_moment,
    instance_dependent_value,
    lagrangian_lower_bound,
    minimax_value,
    mixed_inclusion_probabilities,
    spectral_lower_bound,
    trace_lower_bound,
)


def _random_spectrum(rng, n, kind):
    if kind == "uncapped":
        return rng.uniform(0.5, 1.5, n)
    if kind == "capped":
        s = rng.uniform(0.0, 1.0, n) ** 4
        s[: max(1, n // 4)] = 50.0 + rng.uniform(0, 50, max(1, n // 4))
        return s
    return rng.exponential(size=n) ** 2


# ----------------------------------------------------------------------- bounds and factors
def test_instance_independent_bounds_values():
    assert trace_lower_bound(8, 2, c=0.5) == pytest.approx(0.25 * 64 / 2)
    assert spectral_lower_bound(8, 2, c=0.5) == pytest.approx(0.25 * 8 / 2)
    assert minimax_value(8, 2) == spectral_lower_bound(8, 2)


@pytest.mark.parametrize("n,r", [(8, 2), (16, 5), (3, 3)])
def test_excess_factors(n, r):
    # tr M / (c² n²/r) from theory.moments equals the excess factor; Haar and coordinate attain the bound
    for fam in theory.FAMILIES:
        alpha = theory.isotropic_second_moment(fam, n, r, c=0.3)
        assert alpha * n / trace_lower_bound(n, r, c=0.3) == pytest.approx(excess_factor(fam, n, r))
        assert excess_factor(fam, n, r) >= 1.0
    assert excess_factor("haar", n, r) == 1.0 == excess_factor("coordinate", n, r)
    assert excess_factor("gaussian", n, r) == pytest.approx((n + r + 1) / n)
    assert excess_factor("rademacher", n, r) == pytest.approx((n + r - 1) / n)
    assert excess_factor("coordinate_replace", n, r) == pytest.approx((n + r - 1) / n)


# ----------------------------------------------------------------------- water-filling
@pytest.mark.parametrize("kind", ["uncapped", "capped", "wide"])
@pytest.mark.parametrize("n,r", [(5, 1), (8, 3), (12, 6), (20, 4)])
def test_inclusion_probabilities_invariants(n, r, kind):
    rng = np.random.default_rng(n * 100 + r)
    for _ in range(5):
        sigma = _random_spectrum(rng, n, kind)
        pi = inclusion_probabilities(sigma, r)
        assert pi.sum() == pytest.approx(r, abs=1e-12)
        assert np.all(pi >= 0) and np.all(pi <= 1)
        order = np.argsort(sigma)
        assert np.all(np.diff(pi[order]) >= -1e-15)  # monotone in sigma


@pytest.mark.parametrize("kind", ["uncapped", "capped", "wide"])
@pytest.mark.parametrize("n,r", [(4, 1), (6, 2), (8, 3), (10, 7)])
def test_inclusion_probabilities_match_numerical_minimisation(n, r, kind):
    """Water-filling equals a direct SLSQP minimisation of Σσ/π on Σπ = r, π ∈ (0, 1] to 1e-8."""
    rng = np.random.default_rng(7 * n + r)
    sigma = _random_spectrum(rng, n, kind)
    pi = inclusion_probabilities(sigma, r)
    # minimise over x = log-free parametrisation with bounds; start from uniform
    fun = lambda p: float(np.sum(sigma / p))  # noqa: E731
    jac = lambda p: -sigma / p**2  # noqa: E731
    res = minimize(fun, np.full(n, r / n), jac=jac, method="SLSQP",
                   bounds=[(1e-9, 1.0)] * n,
                   constraints=[{"type": "eq", "fun": lambda p: p.sum() - r, "jac": lambda p: np.ones(n)}],
                   options={"ftol": 1e-16, "maxiter": 1000})
    # status 8 ("positive directional derivative") is SLSQP stopping at machine precision
    assert res.status in (0, 8), res.message
    v_num, v_wf = res.fun, design_value(sigma, pi)
    assert v_wf <= v_num * (1 + 1e-12)
    assert v_wf == pytest.approx(v_num, rel=1e-8)
    np.testing.assert_allclose(res.x, pi, atol=1e-6)  # minimiser is unique (strictly convex)


def test_edge_cases():
    # zero eigenvalues with >= r positive: π = 0 there
    np.testing.assert_allclose(inclusion_probabilities([4.0, 1.0, 1.0, 0.0], 2), [1, 0.5, 0.5, 0])
    # fewer than r positive: positives capped, the rest spread uniformly over the null space
    np.testing.assert_allclose(inclusion_probabilities([3.0, 0.0, 0.0, 0.0, 0.0], 3), [1, 0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(inclusion_probabilities(np.zeros(4), 1), np.full(4, 0.25))
    # ties: equal σ get equal π, and the capped count is consistent across the tie
    pi = inclusion_probabilities([5.0, 5.0, 5.0, 0.01, 0.01], 2)
    assert pi[0] == pi[1] == pi[2] and pi.sum() == pytest.approx(2)
    pi = inclusion_probabilities([100.0, 100.0, 1.0, 1.0, 1.0], 3)
    np.testing.assert_allclose(pi, [1, 1, 1 / 3, 1 / 3, 1 / 3])
    # r = n
    np.testing.assert_array_equal(inclusion_probabilities([3.0, 1.0, 0.0], 3), np.ones(3))
    # flat spectrum: uniform r/n and the Haar value
    np.testing.assert_allclose(inclusion_probabilities(np.ones(6), 2), np.full(6, 1 / 3))
    assert instance_dependent_value(np.ones(6), 2, c=0.5) == pytest.approx(haar_value(np.ones(6), 2, c=0.5))


def test_value_formula_and_gain():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(2, 12))
        r = int(rng.integers(1, n + 1))
        sigma = _random_spectrum(rng, n, "wide")
        c = float(rng.uniform(0.2, 2))
        pi = inclusion_probabilities(sigma, r)
        capped = pi >= 1 - 1e-12
        tau = int(capped.sum())
        closed = sigma[capped].sum() + (np.sqrt(sigma[~capped]).sum() ** 2 / (r - tau) if tau < r else 0.0)
        assert instance_dependent_value(sigma, r, c) == pytest.approx(c * c * closed, rel=1e-12)
        assert instance_dependent_value(sigma, r, c) <= haar_value(sigma, r, c) * (1 + 1e-12)
        assert instance_dependent_gain(sigma, r) >= 1 - 1e-12
    assert instance_dependent_gain([1.0, 1.0, 1.0], 2) == pytest.approx(1.0)
    assert instance_dependent_gain(np.zeros(3), 2) == 1.0


def test_second_moment_matrix():
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    sigma = np.array([5.0, 2.0, 1.0, 0.5, 0.1])
    pi = inclusion_probabilities(sigma, 2)
    M = instance_dependent_second_moment(Q, pi, c=0.7)
    np.testing.assert_allclose(M, 0.49 * (Q / pi) @ Q.T)
    S = (Q * sigma) @ Q.T
    assert np.trace(S @ M) == pytest.approx(instance_dependent_value(sigma, 2, c=0.7))
    # π = 0 directions contribute nothing
    M0 = instance_dependent_second_moment(np.eye(3), [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(M0, np.diag([1.0, 1.0, 0.0]))


def test_mixed_probabilities_cost_bound():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(3, 15))
        r = int(rng.integers(1, n))
        sigma = _random_spectrum(rng, n, "wide")
        eps = float(rng.uniform(0.01, 1))
        pe = mixed_inclusion_probabilities(sigma, r, floor=eps)
        assert pe.sum() == pytest.approx(r) and pe.min() >= eps * r / n - 1e-15 and pe.max() <= 1
        v_opt, v_haar = instance_dependent_value(sigma, r), haar_value(sigma, r)
        assert v_opt <= design_value(sigma, pe) <= (1 - eps) * v_opt + eps * v_haar + 1e-9 * v_haar
        other = _random_spectrum(rng, n, "wide")  # any true spectrum in the same basis: at most Haar/ε
        assert design_value(other, pe) <= haar_value(other, r) / eps * (1 + 1e-12)
    np.testing.assert_allclose(mixed_inclusion_probabilities([1.0, 2.0], 1, floor=0.0),
                               inclusion_probabilities([1.0, 2.0], 1))


# ----------------------------------------------------------------------- duality
@pytest.mark.parametrize("kind", ["uncapped", "capped", "wide"])
def test_lagrangian_certificate_equals_closed_form(kind):
    """The multiplier Λ* certifies water-filling as the minimum over ALL laws of V (S ≻ 0)."""
    rng = np.random.default_rng(4)
    for n, r in [(4, 1), (6, 2), (8, 3), (9, 9)]:
        sigma = _random_spectrum(rng, n, kind) + 1e-3
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        S = (Q * sigma) @ Q.T
        lam = instance_dependent_multiplier(sigma, r, c=0.8)
        lb = lagrangian_lower_bound(S, r, (Q * lam) @ Q.T, c=0.8)
        assert lb == pytest.approx(instance_dependent_value(sigma, r, c=0.8), rel=1e-10)


def test_lagrangian_bound_is_valid_for_any_multiplier():
    """Weak duality: for random Λ the bound is below the value of random feasible laws."""
    rng = np.random.default_rng(5)
    n, r = 5, 2
    sigma = rng.uniform(0.1, 2, n)
    S = np.diag(sigma)
    opt = instance_dependent_value(sigma, r)
    for _ in range(50):
        A = rng.standard_normal((n, n))
        assert lagrangian_lower_bound(S, r, A + A.T, c=1.0) <= opt + 1e-12
    # singular S and a multiplier outside range(S): no finite bound
    assert lagrangian_lower_bound(np.diag([1.0, 0.0]), 1, np.eye(2)) == -np.inf


# ----------------------------------------------------------------------- errors
@pytest.mark.parametrize("sigma,r,exc", [
    ([1.0, np.nan], 1, ValueError),
    ([1.0, -0.5], 1, ValueError),
    ([1.0, 2.0], 3, ValueError),
    ([1.0, 2.0], 0, ValueError),
    ([1.0, 2.0], 1.5, TypeError),
    ([], 1, ValueError),
    ([[1.0, 2.0]], 1, ValueError),
])
def test_bad_spectrum(sigma, r, exc):
    with pytest.raises(exc):
        inclusion_probabilities(sigma, r)


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="floor"):
        mixed_inclusion_probabilities([1.0, 2.0], 1, floor=1.5)
    with pytest.raises(ValueError, match="pi"):
        design_value([1.0, 2.0], [0.5, 1.5])
    with pytest.raises(ValueError, match="symmetric"):
        lagrangian_lower_bound([[1.0, 0.5], [0.0, 1.0]], 1, np.eye(2))
    with pytest.raises(ValueError, match="positive semi-definite"):
        lagrangian_lower_bound([[1.0, 0.0], [0.0, -1.0]], 1, np.eye(2))
    with pytest.raises(ValueError, match="Lam"):
        lagrangian_lower_bound(np.eye(2), 1, np.eye(3))
    with pytest.raises(ValueError, match="r"):
        excess_factor("haar", 3, 4)
    with pytest.raises(ValueError, match="family"):
        excess_factor("haar_typo", 3, 2)
