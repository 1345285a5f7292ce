r"""Closed-form moments of random projections and the MSE of low-rank estimators.

Implements ``theory.md`` §2–§4.  A projector ``V ∈ R^{n×r}`` is scaled so that
``E[V Vᵀ] = c I_n``; its second moment ``M = E[(V Vᵀ)²]`` decides the variance of
the low-rank estimator ``ĝ = G V Vᵀ``.

References
----------
.. [1] Z. Li, T. Ren, Z. Zhang, X. Chen, Y. Peng, "Optimal low-rank stochastic
   gradient estimation for LLM training", arXiv:2603.20632, 2026.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._checks import check_choice, check_int, check_matrix, check_positive, check_psd, check_rank

__all__ = [
    "FAMILIES",
    "KURTOSIS",
    "isotropic_second_moment",
    "iid_second_moment",
    "second_moment_matrix",
    "mse",
    "optimal_scale",
]

#: Instance-independent projector families with an isotropic second moment.
FAMILIES = ("haar", "coordinate", "coordinate_replace", "gaussian", "rademacher")

#: Kurtosis ``E[x⁴]/E[x²]²`` of the entry law of the i.i.d.-entry families.
KURTOSIS = {"gaussian": 3.0, "rademacher": 1.0}


def iid_second_moment(n, r, kurtosis, c=1.0) -> float:
    r"""Second-moment factor of a projector with i.i.d. entries.

    Parameters
    ----------
    n, r : int
        Ambient dimension and rank, ``1 <= r <= n``.
    kurtosis : float
        ``κ = E[x⁴] / E[x²]²`` of the (centred) entry law, ``κ >= 1``.
    c : float, default 1.0
        Isotropy constant: the entries have variance ``c / r``.

    Returns
    -------
    float
        ``α`` with ``E[(VVᵀ)²] = α I``.

    Notes
    -----
    .. math:: \alpha = c^2 \frac{n + r + \kappa - 2}{r}.

    Gaussian entries have ``κ = 3`` (``(n+r+1)/r``), Rademacher ``κ = 1``
    (``(n+r-1)/r``).  Since ``κ >= 1`` every i.i.d. design is worse than the
    optimum ``c² n / r`` by the factor ``(n + r + κ - 2)/n``.

    Examples
    --------
    >>> iid_second_moment(10, 2, 3.0)
    6.5
    """
    n, r = check_rank(n, r)
    c = check_positive(c, "c")
    kurtosis = check_positive(kurtosis, "kurtosis")
    if kurtosis < 1.0:
        raise ValueError(f"`kurtosis` must be >= 1 (E[x^4] >= E[x^2]^2), got kurtosis={kurtosis}")
    return c * c * (n + r + kurtosis - 2.0) / r


def isotropic_second_moment(family, n, r, c=1.0) -> float:
    r"""Factor ``α`` with ``E[(VVᵀ)²] = α I_n`` for an instance-independent family.

    Parameters
    ----------
    family : {"haar", "coordinate", "coordinate_replace", "gaussian", "rademacher"}
        ``"haar"``: ``√(cn/r)`` times a uniform (Haar) orthonormal ``n×r`` frame;
        ``"coordinate"``: ``√(cn/r)`` times ``r`` distinct standard basis vectors;
        ``"coordinate_replace"``: the same with indices drawn with replacement;
        ``"gaussian"``: i.i.d. ``N(0, c/r)``; ``"rademacher"``: i.i.d. ``±√(c/r)``.
    n, r : int
        Ambient dimension and rank, ``1 <= r <= n``.
    c : float, default 1.0
        Isotropy constant, ``E[VVᵀ] = c I``.

    Returns
    -------
    float

    Notes
    -----
    ============================  ===============================
    family                        ``α``
    ============================  ===============================
    haar, coordinate              ``c² n / r`` (the minimax optimum)
    coordinate_replace            ``c² (n + r - 1) / r``
    gaussian                      ``c² (n + r + 1) / r``
    rademacher                    ``c² (n + r - 1) / r``
    ============================  ===============================

    If ``VᵀV = c (n/r) I_r`` almost surely then ``(VVᵀ)² = c (n/r) VVᵀ`` and
    ``M = c² (n/r) I``; this covers the Haar and coordinate families.  With
    replacement, ``VVᵀ = (cn/r) Σ_k e_{j_k} e_{j_k}ᵀ`` and
    ``E[(VVᵀ)²] = (cn/r)² (r/n + r(r-1)/n²) I``.

    Examples
    --------
    >>> isotropic_second_moment("haar", 8, 2)
    4.0
    >>> isotropic_second_moment("gaussian", 8, 2)
    5.5
    """
    check_choice(family, "family", FAMILIES)
    n, r = check_rank(n, r)
    c = check_positive(c, "c")
    if family in ("haar", "coordinate"):
        return c * c * n / r
    if family == "coordinate_replace":
        return c * c * (n + r - 1.0) / r
    return iid_second_moment(n, r, KURTOSIS[family], c)


def second_moment_matrix(family, n, r, c=1.0) -> np.ndarray:
    """``E[(VVᵀ)²]`` as an ``n×n`` array for an instance-independent family.

    See :func:`isotropic_second_moment`.
    """
    return isotropic_second_moment(family, n, r, c) * np.eye(int(n))


def _as_second_moment(M, n: int) -> np.ndarray:
    if isinstance(M, numbers.Real) and not isinstance(M, bool):
        return float(M) * np.eye(n)
    return check_matrix(M, "M", shape=(n, n))


def mse(S, grad, M, *, c=1.0, n_samples=1, mode="dependent") -> float:
    r"""Exact mean squared error ``E‖ĝ_N − ∇‖²_F`` of the low-rank estimator.

    Parameters
    ----------
    S : array_like, shape (n, n)
        ``E[Gᵀ G]``, the uncentred second moment of one sample of the base
        estimator ``G ∈ R^{m×n}``.
    grad : array_like, shape (m, n)
        The true gradient ``∇ = E G``.
    M : array_like, shape (n, n), or float
        ``E[(VVᵀ)²]`` of the projector (a float ``α`` means ``α I``).  For the
        full-rank estimator pass ``M = 1.0`` with ``c = 1``.
    c : float, default 1.0
        Isotropy constant of the projector, ``E[VVᵀ] = c I``.
    n_samples : int, default 1
        Batch size ``N`` (i.i.d. samples ``G_1..G_N``).
    mode : {"dependent", "independent"}
        ``"dependent"``: one ``V`` for the batch, ``ĝ_N = Ḡ_N V Vᵀ``;
        ``"independent"``: a fresh ``V_i`` per sample, ``ĝ_N = N⁻¹ Σ G_i V_i V_iᵀ``.

    Returns
    -------
    float

    Notes
    -----
    With ``S_N = ∇ᵀ∇ + (S − ∇ᵀ∇)/N`` (theory.md §3):

    .. math::
        \text{dependent:}\quad \operatorname{tr}(S_N M) − 2c‖∇‖² + ‖∇‖²,

        \text{independent:}\quad [\operatorname{tr}(S M) − c²‖∇‖²]/N + (1−c)²‖∇‖².

    The dependent MSE levels off at ``tr(∇ᵀ∇ M) − 2c‖∇‖² + ‖∇‖²`` as ``N → ∞``;
    the independent one falls as ``1/N``.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.ones((1, 4)); S = g.T @ g          # a deterministic gradient
    >>> mse(S, g, 4 / 2.0, n_samples=10)          # Haar, n=4, r=2: (n/r − 1)‖∇‖²
    4.0
    """
    grad = check_matrix(grad, "grad")
    n = grad.shape[1]
    S = check_psd(S, "S")
    if S.shape != (n, n):
        raise ValueError(f"`S` must be n×n with n = grad.shape[1] = {n}, got S.shape={S.shape}")
    M = _as_second_moment(M, n)
    c = check_positive(c, "c")
    N = check_int(n_samples, "n_samples", minimum=1)
    check_choice(mode, "mode", ("dependent", "independent"))
    gg = grad.T @ grad
    g2 = float(np.trace(gg))
    if mode == "dependent":
        S_N = gg + (S - gg) / N
        return float(np.sum(S_N * M.T)) - 2.0 * c * g2 + g2
    return (float(np.sum(S * M.T)) - c * c * g2) / N + (1.0 - c) ** 2 * g2


def optimal_scale(S, grad, M1, *, n_samples=1) -> float:
    r"""Bias–variance optimal isotropy constant ``c*`` of the shared-V estimator.

    Parameters
    ----------
    S : array_like, shape (n, n)
        ``E[GᵀG]`` of one sample.
    grad : array_like, shape (m, n)
        True gradient.
    M1 : array_like, shape (n, n), or float
        Second moment of the projector at ``c = 1`` (so ``M = c² M1``).
    n_samples : int, default 1
        Batch size of the dependent estimator (``S`` is replaced by ``S_N``).

    Returns
    -------
    float
        ``c* = ‖∇‖² / tr(S_N M1)``, the minimiser of
        ``c² tr(S_N M1) − 2c‖∇‖² + ‖∇‖²``.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.ones((1, 4)); S = g.T @ g
    >>> optimal_scale(S, g, 2.0)       # Haar n=4, r=2: c* = r/n
    0.5
    """
    grad = check_matrix(grad, "grad")
    n = grad.shape[1]
    S = check_psd(S, "S")
    if S.shape != (n, n):
        raise ValueError(f"`S` must be n×n with n = grad.shape[1] = {n}, got S.shape={S.shape}")
    M1 = _as_second_moment(M1, n)
    N = check_int(n_samples, "n_samples", minimum=1)
    gg = grad.T @ grad
    S_N = gg + (S - gg) / N
    denom = float(np.sum(S_N * M1.T))
    if denom <= 0:
        raise ValueError(f"tr(S_N M1) must be > 0 to define c*, got {denom:.3g}")
    return float(np.trace(gg)) / denom
