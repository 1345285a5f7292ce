r"""Closed-form second moments of the base and low-rank gradient estimators (theory.md §7).

The zeroth-order (ZO) estimators of a *linear* objective ``f(Θ) = f₀ + ⟨∇, Θ⟩``
have exact second moments; they show that in the isotropic case a low-rank ZO
estimator buys memory, not variance (theory.md §7).  The likelihood-ratio (LR)
estimator of a linear layer with a linear loss is handled the same way.

References
----------
.. [1] Z. Li et al., "Optimal low-rank stochastic gradient estimation for LLM
   training", arXiv:2603.20632, 2026.
.. [2] S. Malladi et al., "Fine-tuning language models with just forward
   passes" (MeZO), NeurIPS 2023.
"""

from __future__ import annotations

from .moments import FAMILIES, KURTOSIS, isotropic_second_moment
from ._checks import check_choice, check_int, check_positive, check_rank

__all__ = ["trace_weighted_moment", "zo_second_moment"]


def trace_weighted_moment(family, n, r, c=1.0) -> float:
    r"""Factor ``β`` with ``E[tr(VVᵀ) · VVᵀ] = β I_n`` for an instance-independent family.

    Parameters
    ----------
    family : {"haar", "coordinate", "coordinate_replace", "gaussian", "rademacher"}
    n, r : int
        ``1 <= r <= n``.
    c : float, default 1.0
        Isotropy constant, ``E[VVᵀ] = cI``.

    Returns
    -------
    float

    Notes
    -----
    If ``tr(VVᵀ) = tr(VᵀV)`` is almost surely constant (``= cn``; Haar,
    coordinate with or without replacement, Rademacher) then ``β = c² n``.
    For i.i.d. entries of variance ``c/r`` and kurtosis ``κ``,
    ``E[tr(P) P_kk] = Σ_s Σ_{ij} E[v_{ij}² v_{ks}²] = c² (nr − 1 + κ)/r``, so
    Gaussian entries (``κ = 3``) give ``β = c² (nr + 2)/r``.

    Examples
    --------
    >>> trace_weighted_moment("haar", 8, 2)
    8.0
    >>> trace_weighted_moment("gaussian", 8, 2)
    9.0
    """
    check_choice(family, "family", FAMILIES)
    n, r = check_rank(n, r)
    c = check_positive(c, "c")
    if family == "gaussian":
        kappa = KURTOSIS["gaussian"]
        return c * c * (n * r - 1.0 + kappa) / r
    return c * c * n


def zo_second_moment(grad_sq_norm, m, n, r=None, *, family="haar", c=1.0, two_point=True,
                     value=0.0, mu=None) -> float:
    r"""``E‖ĝ‖²_F`` of a ZO estimator of a linear objective, full-rank or low-rank.

    Parameters
    ----------
    grad_sq_norm : float
        ``‖∇‖²_F`` of the linear objective ``f(Θ) = f₀ + ⟨∇, Θ⟩``, ``Θ ∈ R^{m×n}``.
    m, n : int
        Shape of ``Θ``.
    r : int, optional
        Rank of the projection; ``None`` for the full-rank estimator.
    family : str, default "haar"
        Projector family (ignored when ``r is None``).
    c : float, default 1.0
        Isotropy constant of the projector.
    two_point : bool, default True
        ``True``: ``[f(Θ+μD) − f(Θ−μD)]/(2μ) · D`` (SPSA); ``False``: the
        one-point ``f(Θ+μD) D / μ``.
    value, mu : float
        One-point only: ``f₀ = f(Θ)`` and the scale ``μ`` (the one-point
        estimator of a linear ``f`` carries the term ``(f₀/μ)² E‖D‖²``).

    Returns
    -------
    float

    Notes
    -----
    The direction is ``D = Z`` (full rank, ``Z`` an ``m×n`` standard Gaussian)
    or ``D = Z_B Vᵀ`` (``Z_B`` an ``m×r`` standard Gaussian, ``V`` the
    projection).  For linear ``f`` the two-point difference is exactly
    ``⟨∇, D⟩`` and, by Isserlis' theorem for ``z = vec Z_B``,
    ``E[(aᵀz)² zᵀKz] = ‖a‖² tr K + 2 aᵀKa``:

    .. math::
        E‖ĝ‖² = m\,E[\operatorname{tr}(P)\,\operatorname{tr}(∇P∇ᵀ)]
                + 2 \operatorname{tr}(∇ E[P²] ∇ᵀ)
              = (m β + 2 α) ‖∇‖²,

    with ``P = VVᵀ``, ``α`` from :func:`theory.isotropic_second_moment` and
    ``β`` from :func:`trace_weighted_moment`.  Haar–Stiefel (``α = c²n/r``,
    ``β = c²n``): ``c² (n/r)(mr + 2)‖∇‖²``; full rank: ``(mn + 2)‖∇‖²``.
    The one-point estimator adds ``(f₀/μ)² m · E tr(VᵀV) = (f₀/μ)² m c n``
    (``(f₀/μ)² mn`` full rank); the cross term vanishes by symmetry.

    Examples
    --------
    >>> zo_second_moment(1.0, 4, 16)            # full rank: mn + 2
    66.0
    >>> zo_second_moment(1.0, 4, 16, 2)         # Haar: (n/r)(mr + 2)
    80.0
    """
    g2 = check_positive(grad_sq_norm, "grad_sq_norm", allow_zero=True)
    m = check_int(m, "m", minimum=1)
    n = check_int(n, "n", minimum=1)
    if not isinstance(two_point, bool):
        raise TypeError(f"`two_point` must be a bool, got two_point={two_point!r}")
    if r is None:
        core = (m * n + 2.0) * g2
        direction_sq = float(m * n)
    else:
        n, r = check_rank(n, r)
        alpha = isotropic_second_moment(family, n, r, c)
        beta = trace_weighted_moment(family, n, r, c)
        core = (m * beta + 2.0 * alpha) * g2
        direction_sq = m * check_positive(c, "c") * n
    if two_point:
        return core
    if mu is None:
        raise ValueError("`mu` is required for the one-point estimator (two_point=False)")
    mu = check_positive(mu, "mu")
    try:
        f0 = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`value` must be a real number, got value={value!r}") from exc
    return core + (f0 / mu) ** 2 * direction_sq
