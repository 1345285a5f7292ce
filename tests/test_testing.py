"""theory.testing: the hypothesis tests themselves are calibrated and have power.

Calibration checks run each test on many null data sets at a nominal level of
0.05 and bound the rejection count by a binomial quantile at 1 − 1e-4 (so each
calibration check has a false-failure rate of at most 1e-4).
"""

import numpy as np
import pytest
from scipy import stats

from theory.testing import (
    HaarTestResult,
    MeanTestResult,
    haar_test,
    inclusion_test,
    isotropy_test,
    mean_test,
    second_moment_test,
    unbiasedness_test,
)

N_NULL = 300
LEVEL = 0.05
MAX_REJECT = int(stats.binom.ppf(1 - 1e-4, N_NULL, LEVEL))


def test_mean_test_is_calibrated_and_family_wise(rng):
    # 6 entries of skewed (exponential) data: Holm keeps the family-wise rate <= LEVEL
    rejections = sum(
        mean_test(rng.exponential(size=(400, 2, 3)), np.ones((2, 3))).pvalue < LEVEL for _ in range(N_NULL)
    )
    assert rejections <= MAX_REJECT


def test_mean_test_power_and_fields(rng, alpha):
    x = rng.normal(size=(3000, 2, 3))
    shifted = x.copy()
    shifted[:, 1, 2] += 0.15  # one entry off by 0.15 sd
    res = mean_test(shifted, np.zeros((2, 3)))
    assert isinstance(res, MeanTestResult) and res.n_tests == 6 and res.n_samples == 3000
    assert res.pvalue < alpha and res.rejected(alpha)
    assert np.argmin(res.pvalues) == 5
    with pytest.raises(Exception):
        res.pvalue = 1.0  # frozen


def test_mean_test_random_functionals_for_large_arrays(rng, alpha):
    x = rng.normal(size=(2000, 20, 30))
    res = unbiasedness_test(x, np.zeros((20, 30)))
    assert res.n_tests == 33
    assert res.pvalue > alpha
    # the sum functional sees a small shift spread over all entries
    assert unbiasedness_test(x + 0.01, np.zeros((20, 30))).pvalue < alpha
    # the same draws always give the same p-value (fixed functionals)
    assert res.pvalue == unbiasedness_test(x, np.zeros((20, 30))).pvalue


def test_degenerate_functionals_are_exact():
    x = np.zeros((50, 2))
    x[:, 0] = np.random.default_rng(0).normal(size=50)
    assert mean_test(x, np.array([0.0, 0.0])).pvalue > 0.01
    assert mean_test(x, np.array([0.0, 1.0])).pvalue == 0.0


def test_isotropy_and_second_moment_calibration(rng):
    rej = 0
    for _ in range(100):
        V = rng.normal(size=(500, 5, 2)) / np.sqrt(2)
        rej += isotropy_test(V).pvalue < LEVEL
    assert rej <= int(stats.binom.ppf(1 - 1e-4, 100, LEVEL))


def test_haar_test_accepts_haar_and_rejects_wrong_laws(rng, alpha):
    from scipy.stats import ortho_group

    # reference sampler independent of this project: scipy's ortho_group
    U = np.stack([ortho_group.rvs(5, random_state=rng)[:, :2] for _ in range(3000)])
    res = haar_test(U)
    assert isinstance(res, HaarTestResult) and res.pvalue > alpha
    assert set(res.components) == {"U[0,0]", "U[n-1,r-1]", "a'Ub", "|U'e1|^2", "|U'a|^2"}
    # coordinate frames are orthonormal but not Haar
    eye = np.eye(5)
    C = np.stack([eye[:, rng.choice(5, 2, replace=False)] for _ in range(3000)])
    assert haar_test(C).pvalue < alpha


def test_inclusion_test_exact_and_power(rng, alpha):
    pi = np.array([0.9, 0.5, 0.3, 0.2, 0.1])  # sums to 2
    # Sampford-free exact design for the test: conditional Poisson by rejection
    draws = []
    while len(draws) < 4000:
        keep = np.flatnonzero(rng.random(5) < pi)
        if keep.size == 2:
            draws.append(keep)
    idx = np.array(draws)
    # conditional Poisson does NOT have marginals pi in general: the test must see it
    res = inclusion_test(idx, pi)
    assert res.pvalue < alpha
    # the uniform design checked against its own marginals passes
    uni = np.array([rng.choice(5, 2, replace=False) for _ in range(4000)])
    assert inclusion_test(uni, np.full(5, 0.4)).pvalue > alpha


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: mean_test(np.zeros((10, 2)), np.zeros(3)), ValueError, r"`samples` must have shape"),
        (lambda: mean_test(np.zeros((1, 2)), np.zeros(2)), ValueError, r"at least 2 samples"),
        (lambda: mean_test(np.full((5, 2), np.nan), np.zeros(2)), ValueError, r"`samples` contains NaN"),
        (lambda: isotropy_test(np.zeros((5, 3))), ValueError, r"`V` must have shape \(R, n, r\)"),
        (lambda: second_moment_test(np.zeros((5, 3, 1)), np.eye(2)), ValueError, r"`M` must have shape"),
        (lambda: haar_test(np.ones((5, 3, 2))), ValueError, r"orthonormal"),
        (lambda: inclusion_test(np.array([[0, 0]]), np.ones(2)), ValueError, r"repeated index"),
        (lambda: inclusion_test(np.array([[0, 5]]), np.ones(2)), ValueError, r"must lie in \[0, 2\)"),
        (lambda: mean_test(np.zeros((5, 100)), np.zeros(100), rng=3), TypeError, r"`rng` must be"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_holm_equals_statsmodels(rng):
    from statsmodels.stats.multitest import multipletests

    from theory.testing import holm

    for K in (1, 2, 7, 50):
        p = rng.random(K) ** 3
        p[rng.random(K) < 0.2] = p[0]  # ties
        np.testing.assert_allclose(holm(p), multipletests(p, method="holm")[1], rtol=0, atol=1e-15)
