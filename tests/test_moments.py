"""theory.moments: closed forms against exact enumeration (no Monte Carlo).

Reference values: every closed form is checked against a brute-force
expectation over a finite, enumerable law (all sign patterns, all index
tuples, a finite population of gradients); nothing independent of this
project exists to compare against, so the enumeration is the reference.
"""

import itertools
import math

import numpy as np
import pytest

import theory
from theory import isotropic_second_moment, mse, optimal_scale


def _enumerate_M(Vs, weights=None):
    Vs = np.asarray(Vs, dtype=float)
    w = np.full(len(Vs), 1.0 / len(Vs)) if weights is None else np.asarray(weights)
    P = Vs @ Vs.transpose(0, 2, 1)
    return np.einsum("k,kij->ij", w, P), np.einsum("k,kij->ij", w, P @ P)


def _coordinate_draws(n, r, c, replace):
    s = math.sqrt(c * n / r)
    combos = itertools.product(range(n), repeat=r) if replace else itertools.permutations(range(n), r)
    out = []
    for j in combos:
        V = np.zeros((n, r))
        V[list(j), range(r)] = s
        out.append(V)
    return out


@pytest.mark.parametrize("n,r", [(3, 1), (4, 2), (5, 3), (4, 4)])
@pytest.mark.parametrize("c", [1.0, 0.5])
def test_coordinate_closed_forms_match_enumeration(n, r, c):
    for replace, fam in [(False, "coordinate"), (True, "coordinate_replace")]:
        EP, M = _enumerate_M(_coordinate_draws(n, r, c, replace))
        np.testing.assert_allclose(EP, c * np.eye(n), atol=1e-12)
        np.testing.assert_allclose(M, isotropic_second_moment(fam, n, r, c) * np.eye(n), atol=1e-12)


@pytest.mark.parametrize("n,r", [(2, 1), (3, 2), (4, 2)])
def test_rademacher_closed_form_matches_enumeration(n, r):
    s = math.sqrt(1.0 / r)
    Vs = [np.array(bits, float).reshape(n, r) * s for bits in itertools.product([-1, 1], repeat=n * r)]
    EP, M = _enumerate_M(Vs)
    np.testing.assert_allclose(EP, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(M, isotropic_second_moment("rademacher", n, r) * np.eye(n), atol=1e-12)


@pytest.mark.parametrize("n,r", [(3, 1), (5, 2)])
def test_gaussian_closed_form_matches_gauss_hermite(n, r):
    # E over i.i.d. N(0, 1/r) entries by a product Gauss–Hermite rule, exact for polynomials of degree <= 4
    x, w = np.polynomial.hermite_e.hermegauss(3)
    w = w / w.sum()
    s = math.sqrt(1.0 / r)
    # by symmetry E[(VVᵀ)²]_{00} and _{01} determine M; enumerate over the n*r entries with 3 nodes each
    if n * r > 10:
        pytest.skip("too many nodes")
    Vs, ws = [], []
    for idx in itertools.product(range(3), repeat=n * r):
        Vs.append(x[list(idx)].reshape(n, r) * s)
        ws.append(np.prod(w[list(idx)]))
    EP, M = _enumerate_M(Vs, ws)
    np.testing.assert_allclose(EP, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(M, isotropic_second_moment("gaussian", n, r) * np.eye(n), atol=1e-10)


def test_iid_formula_covers_gaussian_and_rademacher():
    for n, r in [(10, 3), (64, 8)]:
        assert theory.iid_second_moment(n, r, 3.0) == isotropic_second_moment("gaussian", n, r)
        assert theory.iid_second_moment(n, r, 1.0) == isotropic_second_moment("rademacher", n, r)
    assert isotropic_second_moment("haar", 8, 2, c=2.0) == 4 * 4.0


def _population(rng, K=3, m=2, n=3):
    Gs = rng.normal(size=(K, m, n))
    return Gs, Gs.mean(0), np.einsum("kmi,kmj->ij", Gs, Gs) / K


def _brute_mse(Gs, Vs, N, mode):
    """Exact E‖ĝ_N − ∇‖² by enumerating all N-tuples of samples (and of projections)."""
    grad = Gs.mean(0)
    K, total, count = len(Gs), 0.0, 0
    for gi in itertools.product(range(K), repeat=N):
        Gbar = Gs[list(gi)].mean(0)
        if mode == "dependent":
            for V in Vs:
                total += np.sum((Gbar @ V @ V.T - grad) ** 2)
                count += 1
        else:
            for vi in itertools.product(range(len(Vs)), repeat=N):
                est = sum(Gs[g] @ Vs[v] @ Vs[v].T for g, v in zip(gi, vi)) / N
                total += np.sum((est - grad) ** 2)
                count += 1
    return total / count


@pytest.mark.parametrize("mode", ["dependent", "independent"])
@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("c", [1.0, 0.6])
def test_mse_matches_enumeration(mode, N, c):
    rng = np.random.default_rng(3)
    Gs, grad, S = _population(rng)
    n, r = 3, 2
    for fam, replace in [("coordinate", False), ("coordinate_replace", True)]:
        Vs = _coordinate_draws(n, r, c, replace)
        expect = _brute_mse(Gs, Vs, N, mode)
        got = mse(S, grad, isotropic_second_moment(fam, n, r, c), c=c, n_samples=N, mode=mode)
        assert got == pytest.approx(expect, rel=1e-10)


def test_mse_full_rank_and_limits():
    rng = np.random.default_rng(0)
    Gs, grad, S = _population(rng, K=5, m=3, n=4)
    g2 = np.sum(grad**2)
    # full rank: M = I, c = 1 → tr S − ‖∇‖²
    assert mse(S, grad, 1.0) == pytest.approx(np.trace(S) - g2)
    # dependent floor: (n/r − 1)‖∇‖² for the optimal family, c = 1
    big = mse(S, grad, 4 / 2, n_samples=10**9)
    assert big == pytest.approx((4 / 2 - 1) * g2, rel=1e-6)
    # independent falls as 1/N
    assert mse(S, grad, 2.0, n_samples=10, mode="independent") == pytest.approx(
        mse(S, grad, 2.0, n_samples=1, mode="independent") / 10)


def test_optimal_scale_minimises_mse():
    rng = np.random.default_rng(1)
    Gs, grad, S = _population(rng, K=4, m=2, n=5)
    M1 = isotropic_second_moment("haar", 5, 2)
    for N in (1, 7):
        cs = optimal_scale(S, grad, M1, n_samples=N)
        f = lambda c: mse(S, grad, c * c * M1, c=c, n_samples=N)  # noqa: E731
        assert f(cs) < f(cs * 1.01) and f(cs) < f(cs * 0.99)
        assert 0 < cs < 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: isotropic_second_moment("haar", 4, 5), r"`r` must satisfy 1 <= r <= n, got r=5, n=4"),
        (lambda: isotropic_second_moment("haar", 4, 0), r"r=0"),
        (lambda: isotropic_second_moment("haar", 4, 2, c=0.0), r"`c` must be finite and > 0, got c=0.0"),
        (lambda: isotropic_second_moment("haar", 4, 2, c=float("nan")), r"`c`"),
        (lambda: isotropic_second_moment("orthogonal", 4, 2), r"`family` must be one of"),
        (lambda: theory.iid_second_moment(4, 2, 0.5), r"`kurtosis` must be >= 1"),
        (lambda: mse(np.eye(3), np.ones((2, 4)), 1.0), r"`S` must be n×n"),
        (lambda: mse(np.eye(3), np.ones((2, 3)), 1.0, mode="shared"), r"`mode` must be one of"),
        (lambda: mse(np.eye(3), np.ones((2, 3)), 1.0, n_samples=0), r"`n_samples` must be >= 1"),
        (lambda: mse(-np.eye(3), np.ones((2, 3)), 1.0), r"positive semi-definite"),
        (lambda: mse(np.eye(3), np.full((2, 3), np.nan), 1.0), r"`grad` contains NaN"),
    ],
)
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: isotropic_second_moment("haar", 4.0, 2), r"`n` must be an integer, got n=4.0"),
        (lambda: isotropic_second_moment("haar", 4, True), r"`r` must be an integer"),
        (lambda: mse(np.eye(3), np.ones((2, 3)), 1.0, n_samples=2.5), r"`n_samples` must be an integer"),
    ],
)
def test_type_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()
