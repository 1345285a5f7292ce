r"""Optimal projectors: the instance-independent bounds and the instance-dependent design.

Implements ``theory.md`` §5.

*Instance-independent.*  For any law of ``V ∈ R^{n×r}`` with ``E[VVᵀ] = cI``,
``M = E[(VVᵀ)²]`` satisfies ``tr M >= c² n²/r`` and ``λ_max(M) >= c² n/r``
(:func:`trace_lower_bound`, :func:`spectral_lower_bound`); Haar–Stiefel and
coordinate sampling without replacement attain both, the other families exceed
them by :func:`excess_factor`.

*Instance-dependent.*  For a known ``S = E[GᵀG] = Q diag(σ) Qᵀ`` the design
``V = Q_J diag(√(c/π_i))_{i∈J}`` with ``|J| = r`` and ``P(i ∈ J) = π_i`` has
``M = c² Q diag(1/π) Qᵀ`` and ``tr(SM) = c² Σ σ_i/π_i``; the water-filling
probabilities :func:`inclusion_probabilities` minimise it.  The Lagrange
multiplier :func:`instance_dependent_multiplier` certifies, through
:func:`lagrangian_lower_bound`, that no law of ``V`` whatsoever does better
(``S`` positive definite; for a singular ``S`` the value is an infimum).

References
----------
.. [1] Z. Li, T. Ren, Z. Zhang, X. Chen, Y. Peng, "Optimal low-rank stochastic
   gradient estimation for LLM training", arXiv:2603.20632, 2026.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_matrix, check_positive, check_psd, check_rank, check_spectrum
from .moments import isotropic_second_moment

__all__ = [
    "trace_lower_bound",
    "spectral_lower_bound",
    "minimax_value",
    "excess_factor",
    "haar_value",
    "inclusion_probabilities",
    "mixed_inclusion_probabilities",
    "design_value",
    "instance_dependent_value",
    "instance_dependent_gain",
    "instance_dependent_second_moment",
    "instance_dependent_multiplier",
    "lagrangian_lower_bound",
    "psd_eigh",
]


# --------------------------------------------------------------------------- instance-independent
def trace_lower_bound(n, r, c=1.0) -> float:
    r"""Lower bound ``tr M >= c² n² / r`` over all laws with ``E[VVᵀ] = cI``.

    Notes
    -----
    ``P = VVᵀ`` has at most ``r`` non-zero eigenvalues, so
    ``tr P² >= (tr P)²/r``; by Jensen ``E (tr P)² >= (E tr P)² = (cn)²``.

    Examples
    --------
    >>> trace_lower_bound(8, 2)
    32.0
    """
    n, r = check_rank(n, r)
    c = check_positive(c, "c")
    return c * c * n * n / r


def spectral_lower_bound(n, r, c=1.0) -> float:
    r"""Lower bound ``λ_max(M) >= c² n / r`` (from :func:`trace_lower_bound`).

    It is also the minimax value ``max_{S ⪰ 0, tr S = 1} tr(S M)`` of the best
    instance-independent law (:func:`minimax_value`).

    Examples
    --------
    >>> spectral_lower_bound(8, 2)
    4.0
    """
    return trace_lower_bound(n, r, c) / int(n)


def minimax_value(n, r, c=1.0) -> float:
    r"""``min_D max_{S ⪰ 0, tr S = 1} tr(S M_D) = c² n / r``, attained by Haar–Stiefel.

    Examples
    --------
    >>> minimax_value(8, 2, c=0.5)
    1.0
    """
    return spectral_lower_bound(n, r, c)


def excess_factor(family, n, r) -> float:
    r"""Factor by which a family's ``M = αI`` exceeds the optimum ``c² n / r``.

    Parameters
    ----------
    family : {"haar", "coordinate", "coordinate_replace", "gaussian", "rademacher"}
    n, r : int

    Returns
    -------
    float
        ``α / (c² n/r)``: 1 for Haar and coordinate sampling, ``(n+r−1)/n``
        with replacement and for Rademacher, ``(n+r+1)/n`` for Gaussian
        (``(n + r + κ − 2)/n`` for i.i.d. entries of kurtosis ``κ``).
        Independent of ``c``.

    Examples
    --------
    >>> excess_factor("gaussian", 8, 2)
    1.375
    """
    return isotropic_second_moment(family, n, r, 1.0) / minimax_value(n, r, 1.0)


def haar_value(sigma, r, c=1.0) -> float:
    r"""``tr(S M)`` of Haar–Stiefel (or coordinate) sampling: ``c² (n/r) Σ σ_i``.

    Examples
    --------
    >>> haar_value([4.0, 1.0], 1)
    10.0
    """
    sigma = check_spectrum(sigma)
    n, r = check_rank(sigma.size, r)
    return isotropic_second_moment("haar", n, r, c) * float(sigma.sum())


# --------------------------------------------------------------------------- water-filling
def inclusion_probabilities(sigma, r) -> np.ndarray:
    r"""Water-filling inclusion probabilities ``π*`` minimising ``Σ σ_i / π_i``.

    Parameters
    ----------
    sigma : array_like, shape (n,)
        Non-negative eigenvalues of ``S`` (any order).
    r : int
        Sample size, ``1 <= r <= n``.

    Returns
    -------
    numpy.ndarray, shape (n,)
        ``π*`` in the order of ``sigma``, with ``Σ π* = r`` and ``0 <= π* <= 1``.

    Notes
    -----
    Minimise ``Σ σ_i/π_i`` subject to ``Σ π_i = r`` and ``0 <= π_i <= 1``:

    .. math::
        \pi_i^* = \min\Bigl\{1, (r-\tau)\frac{\sqrt{\sigma_i}}
                  {\sum_{j:\pi_j^*<1}\sqrt{\sigma_j}}\Bigr\},
        \qquad \tau = \#\{i : \pi_i^* = 1\}.

    ``τ`` is the smallest ``t`` such that, with the eigenvalues sorted in
    decreasing order, ``(r − t) √σ_(t) <= Σ_{j>=t} √σ_(j)``.

    Edge cases (each one defined so that ``Σ π = r`` holds exactly):

    * **zero eigenvalues**: ``π_i = 0`` when at least ``r`` eigenvalues are
      positive (budget spent there is wasted); those directions are never
      sampled, so ``E[VVᵀ] = cI`` fails on ``null(S)``.  For an estimated ``S``
      use :func:`mixed_inclusion_probabilities`.
    * **fewer than r positive eigenvalues** (``p < r``): every positive one is
      capped at 1 and the remaining budget ``r − p`` is spread uniformly over
      the ``n − p`` null directions, ``π_i = (r−p)/(n−p)``.  This does not
      change the value and keeps ``E[VVᵀ] = cI`` on the whole space.
      ``σ = 0`` gives ``π = r/n``.
    * **ties**: equal eigenvalues get equal probabilities (the formula depends
      on ``σ_i`` only), so ``π*`` does not depend on the basis chosen inside an
      eigenspace.
    * ``r = n``: ``π = 1`` everywhere and ``VVᵀ = cI`` on every draw.

    Examples
    --------
    >>> inclusion_probabilities([4.0, 1.0, 1.0, 0.0], 2)
    array([1. , 0.5, 0.5, 0. ])
    >>> inclusion_probabilities([9.0, 1.0, 0.0], 1)
    array([0.75, 0.25, 0.  ])
    """
    sigma = check_spectrum(sigma)
    n, r = check_rank(sigma.size, r)
    order = np.argsort(-sigma, kind="stable")
    s = np.sqrt(sigma[order])
    tail = np.cumsum(s[::-1])[::-1]  # tail[t] = Σ_{j>=t} s_j
    pi_sorted = np.empty(n)
    tau = 0
    while tau < r and (r - tau) * s[tau] > tail[tau]:
        tau += 1
    pi_sorted[:tau] = 1.0
    rest = tail[tau] if tau < n else 0.0
    if tau < n:
        if rest > 0.0:
            pi_sorted[tau:] = np.minimum(1.0, (r - tau) * s[tau:] / rest)
        else:  # every positive eigenvalue is capped: spread the budget over the null space
            pi_sorted[tau:] = (r - tau) / (n - tau)
    pi = np.empty(n)
    pi[order] = pi_sorted
    return pi


def mixed_inclusion_probabilities(sigma, r, *, floor=0.1) -> np.ndarray:
    r"""Regularised probabilities ``π_ε = (1 − ε) π* + ε r/n`` with ``ε = floor``.

    Parameters
    ----------
    sigma : array_like, shape (n,)
        Eigenvalues of an *estimated* second moment.
    r : int
    floor : float in [0, 1], default 0.1
        Weight ``ε`` of the uniform design; every ``π_i >= ε r/n``.

    Returns
    -------
    numpy.ndarray, shape (n,)

    Notes
    -----
    ``Σ π_ε = r`` and ``π_ε ∈ [ε r/n, 1]``, so with ``ε > 0`` every direction is
    sampled and ``E[VVᵀ] = cI`` holds on the whole space even where the
    estimate of ``S`` is wrong.  Its cost, by convexity of ``1/π``:

    .. math::
        c²\sum_i σ_i/π_{ε,i} \le (1-ε)\,V^* + ε\,V_{\rm Haar},

    i.e. at most ``ε (V_Haar − V*)`` above the optimum ``V*`` for the ``S``
    it was built from; and for *any* true ``S'``,
    ``tr(S' M) <= c² (n/(εr)) tr S' = V_Haar(S')/ε`` (no worse than ``1/ε``
    times Haar, whatever the estimation error).  The exact value is
    :func:`design_value`.

    Examples
    --------
    >>> mixed_inclusion_probabilities([1.0, 0.0], 1, floor=0.2)
    array([0.9, 0.1])
    """
    floor = check_positive(floor, "floor", allow_zero=True)
    if floor > 1.0:
        raise ValueError(f"`floor` must lie in [0, 1], got floor={floor}")
    pi = inclusion_probabilities(sigma, r)
    return (1.0 - floor) * pi + floor * (r / pi.size)


def _check_pi(pi, n: int | None = None) -> np.ndarray:
    pi = check_spectrum(pi, "pi")
    if n is not None and pi.size != n:
        raise ValueError(f"`pi` must have length n={n}, got pi.shape={pi.shape}")
    if np.any(pi > 1.0 + 1e-12):
        raise ValueError(f"`pi` must lie in [0, 1], got max(pi)={pi.max():.6g}")
    return np.minimum(pi, 1.0)


def design_value(sigma, pi, c=1.0) -> float:
    r"""``tr(S M) = c² Σ σ_i / π_i`` of the eigenbasis design with marginals ``π``.

    ``0/0`` counts as 0; ``σ_i > 0`` with ``π_i = 0`` gives ``inf`` (that part
    of the gradient is never seen, the estimator is biased there).

    Examples
    --------
    >>> design_value([4.0, 1.0], [1.0, 0.5])
    6.0
    """
    sigma = check_spectrum(sigma)
    pi = _check_pi(pi, sigma.size)
    c = check_positive(c, "c")
    if np.any((pi == 0) & (sigma > 0)):
        return float("inf")
    pos = pi > 0
    return c * c * float(np.sum(sigma[pos] / pi[pos]))


def instance_dependent_value(sigma, r, c=1.0) -> float:
    r"""Optimal ``tr(S M) = c² Σ σ_i / π_i*`` of the instance-dependent design.

    Parameters
    ----------
    sigma : array_like, shape (n,)
        Eigenvalues of ``S``.
    r : int
    c : float, default 1.0

    Returns
    -------
    float

    Notes
    -----
    .. math::
        V^* = c^2\Bigl[\sum_{\rm capped}\sigma_i
              + \frac{(\sum_{\rm uncapped}\sqrt{\sigma_j})^2}{r-\tau}\Bigr]
        \le c^2\frac{n}{r}\operatorname{tr}S,

    with equality iff all ``σ`` are equal.  By :func:`lagrangian_lower_bound`
    it is the minimum over *all* laws of ``V`` with ``E[VVᵀ] = cI`` (an
    infimum when ``S`` is singular).

    Examples
    --------
    >>> instance_dependent_value([4.0, 1.0, 1.0, 0.0], 2)
    8.0
    """
    sigma = check_spectrum(sigma)
    return design_value(sigma, inclusion_probabilities(sigma, r), c)


def instance_dependent_gain(sigma, r) -> float:
    r"""MSE-term ratio ``V_Haar / V* >= 1`` (1 iff the spectrum is flat).

    Returns ``1.0`` for ``σ = 0``.

    Examples
    --------
    >>> instance_dependent_gain([4.0, 1.0, 1.0, 0.0], 2)
    1.5
    """
    opt = instance_dependent_value(sigma, r)
    return 1.0 if opt == 0 else haar_value(sigma, r) / opt


def instance_dependent_second_moment(Q, pi, c=1.0) -> np.ndarray:
    r"""``M = E[(VVᵀ)²] = c² Q diag(1/π) Qᵀ`` of the eigenbasis design.

    Parameters
    ----------
    Q : array_like, shape (n, n)
        Orthonormal eigenvectors (columns).
    pi : array_like, shape (n,)
        Inclusion probabilities.
    c : float, default 1.0

    Notes
    -----
    ``VVᵀ = Σ_{i∈J} (c/π_i) q_i q_iᵀ``, so ``(VVᵀ)² = Σ_{i∈J} (c/π_i)² q_i q_iᵀ``
    and ``E = c² Σ_i π_i/π_i² q_i q_iᵀ``.  Directions with ``π_i = 0`` are
    never drawn and contribute 0 (and ``E[VVᵀ] = c Σ_{π_i>0} q_i q_iᵀ``).

    Examples
    --------
    >>> import numpy as np
    >>> instance_dependent_second_moment(np.eye(2), [1.0, 0.5])
    array([[1., 0.],
           [0., 2.]])
    """
    Q = check_matrix(Q, "Q", square=True)
    pi = _check_pi(pi, Q.shape[0])
    c = check_positive(c, "c")
    inv = np.divide(1.0, pi, out=np.zeros_like(pi), where=pi > 0)
    return (c * c) * (Q * inv) @ Q.T


# --------------------------------------------------------------------------- duality
def instance_dependent_multiplier(sigma, r, c=1.0) -> np.ndarray:
    r"""Eigenvalues ``λ`` of the optimal Lagrange multiplier ``Λ* = Q diag(λ) Qᵀ``.

    Notes
    -----
    ``λ_i = 2cσ_i/π_i*`` (0 where ``σ_i = 0``).  With
    ``κ = Σ_{uncapped} √σ_j / (r − τ)`` this is ``2cκ√σ_i`` on uncapped
    directions and ``2cσ_i`` on capped ones.  Plugged into
    :func:`lagrangian_lower_bound` it gives ``V*`` exactly
    (``c Σλ_i − ¼ top_r(λ_i²/σ_i)``), which proves the water-filling design
    optimal over every law of ``V``.

    Examples
    --------
    >>> instance_dependent_multiplier([4.0, 1.0, 1.0, 0.0], 2)
    array([8., 4., 4., 0.])
    """
    sigma = check_spectrum(sigma)
    c = check_positive(c, "c")
    pi = inclusion_probabilities(sigma, r)
    lam = np.zeros_like(sigma)
    pos = (pi > 0) & (sigma > 0)
    # λ_i = 2 c σ_i / π_i for every direction with σ_i > 0 (capped: π_i = 1)
    lam[pos] = 2.0 * c * sigma[pos] / pi[pos]
    return lam


def psd_eigh(S, *, rtol=1e-10, name="S") -> tuple[np.ndarray, np.ndarray]:
    r"""Eigenvalues (decreasing, clipped at 0 below ``rtol · λ_max``) and eigenvectors.

    Parameters
    ----------
    S : array_like, shape (n, n)
        Symmetric positive semi-definite up to rounding (checked).

    Returns
    -------
    sigma : numpy.ndarray, shape (n,)
    Q : numpy.ndarray, shape (n, n)
        ``S ≈ Q diag(σ) Qᵀ``.

    Examples
    --------
    >>> sigma, Q = psd_eigh([[2.0, 0.0], [0.0, 1.0]])
    >>> sigma
    array([2., 1.])
    """
    S = check_psd(S, name)
    w, Q = np.linalg.eigh(S)
    w, Q = w[::-1].copy(), Q[:, ::-1].copy()
    top = max(float(w[0]), 0.0) if w.size else 0.0
    w[w <= rtol * top] = 0.0
    return w, Q


def lagrangian_lower_bound(S, r, Lam, c=1.0) -> float:
    r"""Certified lower bound on ``E tr(S (VVᵀ)²)`` over all laws with ``E[VVᵀ] = cI``.

    Parameters
    ----------
    S : array_like, shape (n, n)
        PSD second moment.
    r : int
    Lam : array_like, shape (n, n)
        Any symmetric multiplier of the constraint ``E[VVᵀ] = cI``.
    c : float, default 1.0

    Returns
    -------
    float
        ``c tr Λ − ¼ ‖S^{-1/2} Λ‖²_{(r)}``, where ``‖A‖²_{(r)}`` is the sum of
        the ``r`` largest squared singular values; ``-inf`` if ``Λ`` has a
        component outside ``range(S)`` (pseudo-inverse otherwise).

    Notes
    -----
    For ``P = VVᵀ`` (PSD, rank ``<= r``) put ``X = S^{1/2} P`` (rank ``<= r``):
    ``tr(S P²) = ‖X‖²_F`` and ``⟨Λ, P⟩ = ⟨S^{-1/2}Λ, X⟩ <= ‖S^{-1/2}Λ‖_{(r)} ‖X‖_F``
    (Ky Fan), so ``tr(S P²) − ⟨Λ, P⟩ >= −¼‖S^{-1/2}Λ‖²_{(r)}`` for every atom.
    Taking expectations with ``E P = cI`` gives the bound (weak Lagrangian
    duality; the pricing problem is relaxed by dropping ``P ⪰ 0``, and the
    relaxation is exact when ``Λ`` is PSD and commutes with ``S``).

    Examples
    --------
    >>> import numpy as np
    >>> sigma = np.array([4.0, 1.0, 1.0, 0.5])
    >>> lam = instance_dependent_multiplier(sigma, 2)
    >>> bool(np.isclose(lagrangian_lower_bound(np.diag(sigma), 2, np.diag(lam)),
    ...                 instance_dependent_value(sigma, 2)))
    True
    """
    S = check_psd(S, "S")
    n, r = check_rank(S.shape[0], r)
    Lam = check_matrix(Lam, "Lam", shape=(n, n))
    c = check_positive(c, "c")
    Lam = 0.5 * (Lam + Lam.T)
    sigma, Q = psd_eigh(S)
    pos = sigma > 0
    L = Q.T @ Lam @ Q
    scale = max(float(np.max(np.abs(L))), 1e-300)
    if np.any(~pos) and float(np.max(np.abs(L[~pos, :]))) > 1e-9 * scale:
        return float("-inf")
    A = L[pos, :] / np.sqrt(sigma[pos])[:, None]
    sv = np.linalg.svd(A, compute_uv=False)
    return c * float(np.trace(Lam)) - 0.25 * float(np.sum(sv[:r] ** 2))
