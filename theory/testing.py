r"""Reusable hypothesis tests for random projections and gradient estimators.

Each test returns a frozen dataclass with the statistic, the p-value and what
was tested, in the manner of :mod:`scipy.stats`.  They are what this project's
own suite uses, and are meant for users' CI as well:

* :func:`mean_test` / :func:`unbiasedness_test` — ``E[X] = μ`` for a random
  array from i.i.d. draws, by Student-t tests of several linear functionals with
  a Holm correction (checked against statsmodels).
* :func:`isotropy_test` — ``E[VVᵀ] = cI`` from draws of ``V``.
* :func:`second_moment_test` — ``E[(VVᵀ)²] = M``.
* :func:`haar_test` — an orthonormal frame is Haar-distributed on the Stiefel
  manifold (Kolmogorov–Smirnov tests of exact marginal laws).
* :func:`inclusion_test` — the inclusion frequencies of a fixed-size sampling
  design equal given marginals ``π`` (exact binomial tests).

Calibration: under the null each p-value is (asymptotically, for the t- and
KS-based tests; exactly, for :func:`inclusion_test`) uniform or conservative, so
rejecting at ``p < α`` has a false-rejection rate of at most about ``α``.

Notes
-----
The linear functionals are part of the *definition* of a test, not of the
randomness under test: with ``rng=None`` they come from a fixed seed, so the
same draws always give the same p-value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ._checks import check_int, check_positive

__all__ = [
    "MeanTestResult",
    "HaarTestResult",
    "InclusionTestResult",
    "mean_test",
    "unbiasedness_test",
    "isotropy_test",
    "second_moment_test",
    "haar_test",
    "inclusion_test",
    "holm",
]

_FUNCTIONAL_SEED = 0x5EED


@dataclass(frozen=True)
class MeanTestResult:
    """Result of a test of ``E[X] = μ`` through linear functionals.

    Attributes
    ----------
    statistic : float
        ``max_k |t_k|`` over the tested functionals.
    pvalue : float
        Family-wise p-value: the smallest Holm-adjusted p-value.
    n_tests : int
        Number of functionals tested.
    n_samples : int
        Number of i.i.d. draws ``R``.
    max_abs_z : float
        Largest standardised deviation ``|mean − μ| / SE`` over the functionals
        (equal to ``statistic``; kept as its own field for tidy output).
    pvalues : tuple of float
        Holm-adjusted p-value of each functional.
    description : str
        What was tested.
    """

    statistic: float
    pvalue: float
    n_tests: int
    n_samples: int
    max_abs_z: float
    pvalues: tuple = field(repr=False)
    description: str = ""

    def rejected(self, alpha: float) -> bool:
        """Whether H0 is rejected at family-wise level ``alpha``."""
        return self.pvalue < alpha


@dataclass(frozen=True)
class HaarTestResult:
    """Result of :func:`haar_test`.

    Attributes
    ----------
    statistic : float
        Largest Kolmogorov–Smirnov distance among the component tests.
    pvalue : float
        Smallest Holm-adjusted p-value of the component tests.
    n_samples : int
    components : dict
        ``{name: (D, adjusted p)}`` for each component test.
    description : str
    """

    statistic: float
    pvalue: float
    n_samples: int
    components: dict = field(repr=False)
    description: str = ""

    def rejected(self, alpha: float) -> bool:
        return self.pvalue < alpha


@dataclass(frozen=True)
class InclusionTestResult:
    """Result of :func:`inclusion_test`.

    Attributes
    ----------
    statistic : float
        Largest ``|count_i − Rπ_i| / sqrt(Rπ_i(1−π_i))``.
    pvalue : float
        Smallest Holm-adjusted exact binomial p-value.
    n_samples : int
    counts : numpy.ndarray
        Inclusion count of each index.
    expected : numpy.ndarray
        ``R π``.
    description : str
    """

    statistic: float
    pvalue: float
    n_samples: int
    counts: np.ndarray = field(repr=False)
    expected: np.ndarray = field(repr=False)
    description: str = ""

    def rejected(self, alpha: float) -> bool:
        return self.pvalue < alpha


# ----------------------------------------------------------------------------- helpers
def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` must be a real array or tensor, got {type(x).__name__}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains NaN or Inf")
    return arr


def holm(p) -> np.ndarray:
    """Holm step-down adjusted p-values (valid under any dependence).

    Equal to ``statsmodels.stats.multitest.multipletests(p, method="holm")[1]``
    (the test suite checks it); computed here because that function calls
    ``gc.collect()`` on every call, which costs about 0.3 s in a process that has
    imported torch and dominates a Monte Carlo loop of tests.
    """
    p = np.asarray(p, dtype=float)
    K = p.size
    order = np.argsort(p, kind="stable")
    adj_sorted = np.minimum(np.maximum.accumulate(p[order] * np.arange(K, 0, -1)), 1.0)
    adj = np.empty(K)
    adj[order] = adj_sorted
    return adj


_holm = holm


def _functional_ttest(values: np.ndarray, expected: np.ndarray, description: str) -> MeanTestResult:
    """Student-t tests of ``E[values[:, k]] = expected[k]`` for each k, Holm-corrected."""
    R = values.shape[0]
    if R < 2:
        raise ValueError(f"need at least 2 samples, got {R}")
    mean = values.mean(axis=0)
    sd = values.std(axis=0, ddof=1)
    dev = mean - expected
    scale = np.maximum(np.abs(expected), np.abs(mean)) + 1.0
    degenerate = sd <= 1e-12 * scale
    se = np.where(degenerate, 1.0, sd / np.sqrt(R))
    t = np.where(degenerate, 0.0, dev / se)
    p = 2.0 * stats.t.sf(np.abs(t), df=R - 1)
    # a functional with no spread is exact: equal → p = 1, different → p = 0
    exact_mismatch = degenerate & (np.abs(dev) > 1e-9 * scale)
    p = np.where(degenerate, np.where(exact_mismatch, 0.0, 1.0), p)
    t = np.where(exact_mismatch, np.inf, t)
    adj = _holm(p)
    stat = float(np.max(np.abs(t)))
    return MeanTestResult(
        statistic=stat,
        pvalue=float(np.min(adj)),
        n_tests=int(values.shape[1]),
        n_samples=int(R),
        max_abs_z=stat,
        pvalues=tuple(float(x) for x in adj),
        description=description,
    )


def _rng(rng) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng(_FUNCTIONAL_SEED)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"`rng` must be a numpy.random.Generator or None, got {type(rng).__name__}")


# ----------------------------------------------------------------------------- tests
def mean_test(samples, expected, *, n_functionals=None, max_entries=64, rng=None,
              description="E[X] = expected") -> MeanTestResult:
    r"""Test ``H0: E[X] = μ`` for a random array ``X`` from i.i.d. draws.

    Parameters
    ----------
    samples : array_like or torch.Tensor, shape (R, *shape)
        ``R`` i.i.d. draws of ``X``.
    expected : array_like, shape ``shape``
        The hypothesised mean ``μ``.
    n_functionals : int, optional
        Number of random Gaussian functionals when ``X`` has more than
        ``max_entries`` entries (default 32).  The sum of all entries is always
        added.
    max_entries : int, default 64
        Up to this many entries, every entry is tested on its own.
    rng : numpy.random.Generator, optional
        Draws the random functionals (default: a fixed seed; see the module notes).
    description : str

    Returns
    -------
    MeanTestResult

    Notes
    -----
    For each functional ``f_k(X) = ⟨W_k, X⟩`` a one-sample Student-t test of
    ``E f_k(X) = ⟨W_k, μ⟩`` is run; the p-values are Holm-corrected
    (:func:`holm`, equal to ``statsmodels.stats.multitest.multipletests``) and the smallest adjusted
    p-value is the family-wise p-value.  A functional with zero spread is
    compared exactly.  The test is asymptotic in ``R`` (central limit theorem);
    heavy-tailed ``X`` needs larger ``R``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(1).normal(size=(4000, 2, 3))
    >>> mean_test(x, np.zeros((2, 3))).pvalue > 1e-3
    True
    >>> mean_test(x + 0.2, np.zeros((2, 3))).pvalue < 1e-3
    True
    """
    X = _to_numpy(samples, "samples")
    mu = _to_numpy(expected, "expected")
    if X.ndim < 1 or X.shape[1:] != mu.shape:
        raise ValueError(
            f"`samples` must have shape (R, *expected.shape) = (R, {', '.join(map(str, mu.shape))}), "
            f"got samples.shape={X.shape}"
        )
    R = X.shape[0]
    flat = X.reshape(R, -1)
    mu_flat = mu.reshape(-1)
    d = mu_flat.size
    max_entries = check_int(max_entries, "max_entries", minimum=1)
    if d <= max_entries:
        return _functional_ttest(flat, mu_flat, description)
    K = 32 if n_functionals is None else check_int(n_functionals, "n_functionals", minimum=1)
    W = _rng(rng).standard_normal((d, K)) / np.sqrt(d)
    W = np.concatenate([W, np.ones((d, 1)) / np.sqrt(d)], axis=1)
    return _functional_ttest(flat @ W, mu_flat @ W, description)


def unbiasedness_test(estimates, truth, **kwargs) -> MeanTestResult:
    """Test that a (matrix-valued) estimator is unbiased: ``E[ĝ] = ∇``.

    Parameters
    ----------
    estimates : array_like or torch.Tensor, shape (R, *shape)
        ``R`` independent replications of the estimator.
    truth : array_like, shape ``shape``
        The exact expected value (the true gradient).
    **kwargs
        Passed to :func:`mean_test`.

    Returns
    -------
    MeanTestResult

    Examples
    --------
    >>> import numpy as np
    >>> g = np.arange(6.0).reshape(2, 3)
    >>> est = g + np.random.default_rng(0).normal(size=(3000, 2, 3))
    >>> unbiasedness_test(est, g).pvalue > 1e-3
    True
    """
    kwargs.setdefault("description", "E[estimate] = truth")
    return mean_test(estimates, truth, **kwargs)


def _bilinear_pairs(n: int, n_functionals, rng):
    """Index pairs of the upper triangle for small n, else random vector pairs."""
    if n * (n + 1) // 2 <= 78 and n_functionals is None:
        iu, ju = np.triu_indices(n)
        A = np.zeros((n, iu.size))
        B = np.zeros((n, iu.size))
        A[iu, np.arange(iu.size)] = 1.0
        B[ju, np.arange(iu.size)] = 1.0
        return A, B
    K = 32 if n_functionals is None else check_int(n_functionals, "n_functionals", minimum=2)
    g = _rng(rng)
    A = g.standard_normal((n, K)) / np.sqrt(n)
    B = A.copy()
    half = K // 2  # half quadratic forms uᵀXu (scale), half bilinear uᵀXv (off-diagonal)
    B[:, half:] = g.standard_normal((n, K - half)) / np.sqrt(n)
    return A, B


def isotropy_test(V, c=1.0, *, n_functionals=None, rng=None) -> MeanTestResult:
    r"""Test ``H0: E[V Vᵀ] = c I`` from i.i.d. draws of ``V``.

    Parameters
    ----------
    V : array_like or torch.Tensor, shape (R, n, r)
    c : float, default 1.0
    n_functionals : int, optional
        For ``n > 12`` (or when given): the number of random bilinear forms
        ``uᵀ (VVᵀ) v`` tested (default 32; half with ``u = v``).  For small
        ``n`` every upper-triangle entry is tested.
    rng : numpy.random.Generator, optional

    Returns
    -------
    MeanTestResult

    Notes
    -----
    ``uᵀ VVᵀ v = (Vᵀu)·(Vᵀv)`` is computed without forming ``VVᵀ``; its
    expectation under H0 is ``c uᵀv``.

    Examples
    --------
    >>> import numpy as np
    >>> V = np.random.default_rng(0).normal(size=(5000, 6, 2)) / np.sqrt(2)
    >>> isotropy_test(V).pvalue > 1e-3
    True
    >>> isotropy_test(V * 1.1).pvalue < 1e-3
    True
    """
    V = _to_numpy(V, "V")
    if V.ndim != 3:
        raise ValueError(f"`V` must have shape (R, n, r), got V.shape={V.shape}")
    c = check_positive(c, "c")
    n = V.shape[1]
    A, B = _bilinear_pairs(n, n_functionals, rng)
    VA = np.einsum("bnr,nk->brk", V, A)
    VB = np.einsum("bnr,nk->brk", V, B)
    vals = np.einsum("brk,brk->bk", VA, VB)
    expected = c * np.einsum("nk,nk->k", A, B)
    return _functional_ttest(vals, expected, f"E[VVᵀ] = {c:g}·I (n={n})")


def second_moment_test(V, M, *, n_functionals=None, rng=None) -> MeanTestResult:
    r"""Test ``H0: E[(V Vᵀ)²] = M`` from i.i.d. draws of ``V``.

    Parameters
    ----------
    V : array_like or torch.Tensor, shape (R, n, r)
    M : array_like, shape (n, n), or float
        Hypothesised second moment (a float ``α`` means ``α I``).
    n_functionals, rng
        As in :func:`isotropy_test`.

    Returns
    -------
    MeanTestResult

    Notes
    -----
    ``uᵀ (VVᵀ)² v = (Vᵀu)ᵀ (VᵀV) (Vᵀv)``, computed in ``O(n r²)`` per draw.
    ``(VVᵀ)²`` can be heavy-tailed (i.i.d. designs): use a few thousand draws.

    Examples
    --------
    >>> import numpy as np
    >>> V = np.random.default_rng(0).normal(size=(20000, 4, 2)) / np.sqrt(2)
    >>> second_moment_test(V, (4 + 2 + 1) / 2).pvalue > 1e-3      # Gaussian: (n+r+1)/r
    True
    >>> second_moment_test(V, 4 / 2).pvalue < 1e-3                  # the Haar value is wrong here
    True
    """
    V = _to_numpy(V, "V")
    if V.ndim != 3:
        raise ValueError(f"`V` must have shape (R, n, r), got V.shape={V.shape}")
    n = V.shape[1]
    if np.isscalar(M) or np.ndim(M) == 0:
        M = float(M) * np.eye(n)
    M = _to_numpy(M, "M")
    if M.shape != (n, n):
        raise ValueError(f"`M` must have shape ({n}, {n}), got M.shape={M.shape}")
    A, B = _bilinear_pairs(n, n_functionals, rng)
    VA = np.einsum("bnr,nk->brk", V, A)
    VB = np.einsum("bnr,nk->brk", V, B)
    G = np.einsum("bnr,bns->brs", V, V)
    vals = np.einsum("brk,brs,bsk->bk", VA, G, VB)
    expected = np.einsum("nk,nm,mk->k", A, M, B)
    return _functional_ttest(vals, expected, f"E[(VVᵀ)²] = M (n={n})")


def _signed_entry_cdf(n: int):
    """CDF of one entry of a Haar unit vector in R^n: sign symmetric, square ~ Beta(1/2, (n−1)/2)."""
    beta = stats.beta(0.5, (n - 1) / 2.0)

    def cdf(x):
        x = np.asarray(x, dtype=float)
        return 0.5 + 0.5 * np.sign(x) * beta.cdf(np.minimum(x * x, 1.0))

    return cdf


def haar_test(U, *, c=None, rng=None) -> HaarTestResult:
    r"""Test that orthonormal ``n×r`` frames are Haar-distributed on the Stiefel manifold.

    Parameters
    ----------
    U : array_like or torch.Tensor, shape (R, n, r)
        i.i.d. frames.  If they are scaled projectors ``V = √(cn/r) U``, pass ``c``.
    c : float, optional
        Isotropy constant of scaled frames; they are divided by ``√(cn/r)``.
    rng : numpy.random.Generator, optional
        Draws the random directions ``a, b`` (default: a fixed seed).

    Returns
    -------
    HaarTestResult

    Notes
    -----
    Under Haar measure, for fixed unit vectors ``a ∈ R^n``, ``b ∈ R^r``:

    * ``‖Uᵀa‖² ~ Beta(r/2, (n−r)/2)`` (``r < n``);
    * ``aᵀ U b`` has the law of one coordinate of a uniform unit vector of
      ``R^n``: symmetric, with square ``~ Beta(1/2, (n−1)/2)``.

    Kolmogorov–Smirnov tests (``scipy.stats.kstest``) are run for ``‖Uᵀa‖²``
    with ``a = e_1`` and a random ``a``, and for ``U_{11}``, ``U_{n r}`` and
    ``aᵀUb`` with random ``a, b``; Holm-corrected.  The entry tests catch a QR
    factorisation without Mezzadri's sign correction (whose ``U_{11}`` has a
    fixed sign); the random directions catch a law that is not rotation
    invariant.

    References
    ----------
    .. [1] F. Mezzadri, "How to generate random matrices from the classical
       compact groups", Notices of the AMS 54(5), 2007.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.random.default_rng(0)
    >>> Q = np.linalg.qr(g.normal(size=(2000, 5, 2)))[0]     # no sign fix
    >>> haar_test(Q).pvalue < 1e-4
    True
    """
    U = _to_numpy(U, "U")
    if U.ndim != 3:
        raise ValueError(f"`U` must have shape (R, n, r), got U.shape={U.shape}")
    R, n, r = U.shape
    if c is not None:
        U = U / np.sqrt(check_positive(c, "c") * n / r)
    gram_err = float(np.max(np.abs(np.einsum("bnr,bns->brs", U, U) - np.eye(r))))
    if gram_err > 1e-4:
        raise ValueError(f"`U` must hold orthonormal frames (UᵀU = I); max deviation {gram_err:.3g}"
                         " (pass `c` for scaled projectors)")
    g = _rng(rng)
    a = g.standard_normal(n)
    a /= np.linalg.norm(a)
    b = g.standard_normal(r)
    b /= np.linalg.norm(b)
    entry = _signed_entry_cdf(n)
    comps = {
        "U[0,0]": (U[:, 0, 0], entry),
        "U[n-1,r-1]": (U[:, n - 1, r - 1], entry),
        "a'Ub": (np.einsum("n,bnr,r->b", a, U, b), entry),
    }
    if r < n:
        rownorm = stats.beta(r / 2.0, (n - r) / 2.0).cdf
        comps["|U'e1|^2"] = (np.sum(U[:, 0, :] ** 2, axis=1), rownorm)
        comps["|U'a|^2"] = (np.sum(np.einsum("n,bnr->br", a, U) ** 2, axis=1), rownorm)
    names = list(comps)
    res = [stats.kstest(x, cdf) for x, cdf in comps.values()]
    adj = _holm(np.array([t.pvalue for t in res]))
    components = {k: (float(t.statistic), float(p)) for k, t, p in zip(names, res, adj)}
    return HaarTestResult(
        statistic=float(max(t.statistic for t in res)),
        pvalue=float(np.min(adj)),
        n_samples=int(R),
        components=components,
        description=f"Haar on the Stiefel manifold V_{r}(R^{n})",
    )


def inclusion_test(indices, pi) -> InclusionTestResult:
    r"""Test that a fixed-size sampling design has inclusion probabilities ``π``.

    Parameters
    ----------
    indices : array_like or torch.Tensor of int, shape (R, r)
        ``R`` independent draws of ``r`` distinct indices in ``range(n)``.
    pi : array_like, shape (n,)
        Hypothesised inclusion probabilities (``Σ π = r``).

    Returns
    -------
    InclusionTestResult

    Notes
    -----
    Draws are independent, so the count of index ``i`` is exactly
    ``Binomial(R, π_i)`` under H0 whatever the dependence inside a draw; each
    count gets an exact two-sided binomial test (``scipy.stats.binomtest``) and
    the p-values are Holm-corrected.  Indices with ``π_i ∈ {0, 1}`` are
    compared exactly.  Draws with repeated indices are an error.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.random.default_rng(0)
    >>> idx = np.array([g.choice(5, 2, replace=False) for _ in range(3000)])
    >>> inclusion_test(idx, np.full(5, 0.4)).pvalue > 1e-3
    True
    """
    if hasattr(indices, "detach"):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"`indices` must be an integer array of shape (R, r), got shape {idx.shape}, dtype {idx.dtype}")
    pi = _to_numpy(pi, "pi")
    n = pi.size
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"`indices` must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    srt = np.sort(idx, axis=1)
    if np.any(srt[:, 1:] == srt[:, :-1]):
        raise ValueError("`indices` has a draw with a repeated index; a fixed-size design draws distinct indices")
    R = idx.shape[0]
    counts = np.bincount(idx.ravel(), minlength=n)
    p = np.empty(n)
    z = np.zeros(n)
    for i in range(n):
        if pi[i] <= 0.0 or pi[i] >= 1.0:
            p[i] = 1.0 if counts[i] == (0 if pi[i] <= 0 else R) else 0.0
            z[i] = 0.0 if p[i] == 1.0 else np.inf
        else:
            p[i] = stats.binomtest(int(counts[i]), R, float(pi[i])).pvalue
            z[i] = (counts[i] - R * pi[i]) / np.sqrt(R * pi[i] * (1 - pi[i]))
    adj = _holm(p)
    return InclusionTestResult(
        statistic=float(np.max(np.abs(z))),
        pvalue=float(np.min(adj)),
        n_samples=int(R),
        counts=counts,
        expected=R * pi,
        description=f"inclusion frequencies = R·π (n={n}, r={idx.shape[1]})",
    )
