r"""Column-generation solver of the functional optimisation (theory.md §6).

.. math::
    \min_D\; \Phi(D) = E_D \operatorname{tr}(S (VV^\top)^2)
    \quad\text{s.t.}\quad E_D[VV^\top] = cI,

over laws ``D`` of ``V ∈ R^{n×r}``.  The problem is linear in ``D``; restricted
to finitely many atoms ``P_k = V_k V_kᵀ`` with weights ``w_k`` it is the
*restricted master* linear programme

.. math::
    \min_{w \ge 0} \sum_k w_k \operatorname{tr}(S P_k^2)
    \quad\text{s.t.}\quad \sum_k w_k P_k = cI,\; \sum_k w_k = 1,

solved with HiGHS (:func:`scipy.optimize.linprog`).  Its duals ``(Λ, μ)`` price a
new atom by its reduced cost ``tr(S P²) − ⟨Λ, P⟩ − μ``; atoms with negative
reduced cost enter the master and the loop repeats.  Every ``Λ`` also gives
the certified Lagrangian lower bound of :func:`theory.lagrangian_lower_bound`,
``c tr Λ − ¼‖S^{-1/2}Λ‖²_{(r)}``, whose inner minimisation is a relaxation of
the pricing problem; it is exact (equal to the pricing minimum) when ``Λ`` is PSD
and commutes with ``S``.  The solver stops when value and bound meet.

References
----------
.. [1] Z. Li et al., "Optimal low-rank stochastic gradient estimation for LLM
   training", arXiv:2603.20632, 2026.
.. [2] G. Desaulniers, J. Desrosiers, M. M. Solomon (eds.), *Column
   Generation*, Springer, 2005.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linprog, minimize

from ._checks import check_choice, check_int, check_positive, check_psd, check_rank, check_rng
from .optimal import instance_dependent_value, lagrangian_lower_bound, psd_eigh

__all__ = ["FunctionalResult", "solve_functional"]


@dataclass(frozen=True)
class FunctionalResult:
    """Result of :func:`solve_functional`: a finite mixture of projections.

    Attributes
    ----------
    value : float
        ``Φ`` of the mixture found (the restricted master's optimum).
    lower_bound : float
        Best certified Lagrangian lower bound on the minimum over all laws.
    atoms : numpy.ndarray, shape (k, n, r)
        The atoms ``V_k`` with positive weight.
    weights : numpy.ndarray, shape (k,)
        Their probabilities (sum 1).
    closed_form : float
        The water-filling value :func:`theory.instance_dependent_value` of the
        ``S`` solved (after the ridge, if any).
    multiplier : numpy.ndarray, shape (n, n)
        The last master's dual ``Λ`` of ``E[VVᵀ] = cI``.
    mu : float
        Its dual of ``Σ w = 1``.
    n_iter : int
        Column-generation iterations.
    converged : bool
        ``value − lower_bound <= tol · value``.
    pricing_exact : bool
        Whether, at the last pricing, the best atom found attained the relaxed
        bound (then the pricing was solved to global optimality).
    c : float
    ridge : float
        Multiple of ``(tr S/n) I`` added to a singular ``S``.
    history : tuple of (float, float)
        ``(value, lower_bound)`` per iteration.
    n_local_searches : int
        Iterations in which the cheap candidates had no negative reduced cost
        and the L-BFGS search ran.
    """

    value: float
    lower_bound: float
    atoms: np.ndarray = field(repr=False)
    weights: np.ndarray = field(repr=False)
    closed_form: float = float("nan")
    multiplier: np.ndarray = field(default=None, repr=False)
    mu: float = float("nan")
    n_iter: int = 0
    converged: bool = False
    pricing_exact: bool = False
    c: float = 1.0
    ridge: float = 0.0
    history: tuple = field(default=(), repr=False)
    n_local_searches: int = 0

    @property
    def gap(self) -> float:
        """Relative gap ``(value − lower_bound) / value``."""
        return (self.value - self.lower_bound) / max(abs(self.value), 1e-300)

    def mean(self) -> np.ndarray:
        """``E[VVᵀ] = Σ w_k V_k V_kᵀ`` of the mixture (``≈ cI``)."""
        P = self.atoms @ np.swapaxes(self.atoms, -1, -2)
        return np.einsum("k,kij->ij", self.weights, P)

    def second_moment(self) -> np.ndarray:
        """``E[(VVᵀ)²] = Σ w_k (V_k V_kᵀ)²`` of the mixture."""
        P = self.atoms @ np.swapaxes(self.atoms, -1, -2)
        return np.einsum("k,kij->ij", self.weights, P @ P)

    def sample(self, size=None, *, rng=None) -> np.ndarray:
        """Draw ``V`` from the mixture.

        Parameters
        ----------
        size : int or tuple of int, optional
            Leading shape; ``None`` gives one ``n×r`` draw.
        rng : numpy.random.Generator or int, optional

        Returns
        -------
        numpy.ndarray, shape (*size, n, r)
        """
        rng = check_rng(rng)
        w = self.weights / self.weights.sum()
        k = rng.choice(w.size, size=size, p=w)
        return self.atoms[k]


# --------------------------------------------------------------------------- helpers
def _sym_rows(n: int):
    iu = np.triu_indices(n)
    weight = np.where(iu[0] == iu[1], 1.0, math.sqrt(2.0))
    return iu, weight


def _cost(S, V):
    P = V @ V.T
    return float(np.sum((S @ P) * P))


def _pricing_objective(x, S, Lam, n, r):
    V = x.reshape(n, r)
    P = V @ V.T
    SP = S @ P
    f = float(np.sum(SP * P) - np.sum(Lam * P))
    grad = 2.0 * (SP + SP.T - Lam) @ V
    return f, grad.ravel()


def _factor(P, r):
    """Rank-r PSD factor V (n×r) of the PSD part of symmetric P."""
    w, U = np.linalg.eigh(0.5 * (P + P.T))
    w, U = w[::-1][:r], U[:, ::-1][:, :r]
    return U * np.sqrt(np.clip(w, 0.0, None))


def _coordinate_atoms(B, r, c):
    """Coordinate design in the orthonormal basis ``B`` (columns), uniform scale √(cn/r)."""
    n = B.shape[0]
    scale = math.sqrt(c * n / r)
    if math.comb(n, r) <= 256:
        subsets = itertools.combinations(range(n), r)
    else:  # cyclic windows: each index in exactly r of the n windows
        subsets = ([(i + k) % n for k in range(r)] for i in range(n))
    return [B[:, list(J)] * scale for J in subsets]


def _polish_diagonal_dual(lam0, sigma, r, c):
    """Ascend the concave dual ``c Σλ − ¼ top_r(λ²/σ)`` over multipliers commuting with S.

    Any ``Λ`` gives a valid bound, so this only tightens the certificate.
    """

    def neg(lam):
        q = lam**2 / sigma
        top = np.argsort(-q)[:r]
        g = np.full(lam.size, -c)
        g[top] += 0.5 * lam[top] / sigma[top]
        return -(c * lam.sum() - 0.25 * q[top].sum()), g

    opt = minimize(neg, lam0, jac=True, method="L-BFGS-B", options={"maxiter": 30})
    return opt.x if opt.fun <= neg(lam0)[0] else lam0


# --------------------------------------------------------------------------- solver
def solve_functional(S, r, c=1.0, *, max_iter=300, tol=1e-8, init="eigen", n_starts=4,
                     max_new=64, ridge=None, rng=None) -> FunctionalResult:
    r"""Minimise ``E tr(S (VVᵀ)²)`` over laws of ``V`` with ``E[VVᵀ] = cI`` by column generation.

    Parameters
    ----------
    S : array_like, shape (n, n)
        Symmetric PSD second moment (checked up to rounding).  Meant for small
        ``n`` (the master has ``n(n+1)/2 + 1`` rows; ``n <= 10`` is quick).
    r : int
        Rank, ``1 <= r <= n``.
    c : float, default 1.0
    max_iter : int, default 300
        Column-generation iterations.
    tol : float, default 1e-8
        Stop when ``value − lower_bound <= tol · value``.
    init : {"eigen", "standard"}, default "eigen"
        Initial atoms: the uniform coordinate design ``√(cn/r) [q_j]_{j∈J}``
        (every ``r``-subset, or ``n`` cyclic windows when there are more than
        256) in the eigenbasis of ``S`` or in the standard basis.  Both start
        at the Haar value ``c² (n/r) tr S``; the optimal scales are left to the
        pricing.
    n_starts : int, default 4
        Random starts of the local pricing search per iteration (besides the
        deterministic ones).
    ridge : float, optional
        For a singular ``S`` the minimum is an infimum (null directions are
        covered by atoms of vanishing weight and unbounded scale); ``S`` is then
        replaced by ``S + ridge · (tr S / n) I``.  Default ``1e-6`` when ``S`` is
        singular, else 0.
    rng : numpy.random.Generator or int, optional
        For the random pricing starts.

    Returns
    -------
    FunctionalResult
        ``value``, ``lower_bound``, ``atoms`` (``k×n×r``), ``weights``, and
        ``sample(size, rng=...)`` to draw from the mixture.

    Notes
    -----
    Pricing, each iteration, for the master duals ``(Λ, μ)``:

    1. the maximiser of the relaxed bound, ``P = S^{-1/2} X`` with ``X`` half
       the best rank-``r`` approximation of ``S^{-1/2}Λ``, projected onto the
       PSD rank-``r`` matrices;
    2. the best atom diagonal in the eigenbasis of ``S``: the ``r`` largest
       ``(λ̃_i)_+²/σ_i`` with scales ``λ̃_i/(2σ_i)``, ``λ̃ = diag(QᵀΛQ)``;
    3. L-BFGS on ``f(V) = tr(S(VVᵀ)²) − ⟨Λ, VVᵀ⟩`` (gradient
       ``2(SP + PS − Λ)V``) from 1, 2, the top eigenvectors of ``Λ`` and
       ``n_starts`` random ``V``.

    Every candidate with reduced cost ``f(V) − μ < 0`` enters the master.
    The lower bound is certified for every ``Λ`` (weak duality with a
    relaxed pricing), so ``value − lower_bound`` bounds the suboptimality of
    the mixture whatever the pricing search missed.

    Examples
    --------
    >>> import numpy as np
    >>> res = solve_functional(np.diag([4.0, 1.0, 1.0, 0.5]), 2, rng=0)
    >>> bool(abs(res.value - res.closed_form) < 1e-6 * res.value), res.converged
    (True, True)
    >>> res.sample(3, rng=1).shape
    (3, 4, 2)
    """
    S = check_psd(S, "S")
    n, r = check_rank(S.shape[0], r)
    c = check_positive(c, "c")
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    tol = check_positive(tol, "tol")
    check_choice(init, "init", ("eigen", "standard"))
    n_starts = check_int(n_starts, "n_starts", minimum=0)
    max_new = check_int(max_new, "max_new", minimum=1)
    rng = check_rng(rng)

    sigma, Q = psd_eigh(S)
    if ridge is None:
        ridge = 1e-6 if (sigma[-1] <= 0 and sigma[0] > 0) else 0.0
    ridge = check_positive(ridge, "ridge", allow_zero=True)
    if sigma[0] <= 0:
        raise ValueError("`S` must not be zero: every law with E[VVᵀ] = cI has value 0")
    if ridge > 0:
        S = S + ridge * float(np.trace(S)) / n * np.eye(n)
        sigma, Q = psd_eigh(S)
    if sigma[-1] <= 0:
        raise ValueError(f"`S` is singular (smallest eigenvalue {sigma[-1]:.3g}); pass ridge > 0")
    closed = instance_dependent_value(sigma, r, c)
    S_mhalf = (Q / np.sqrt(sigma)) @ Q.T

    iu, rw = _sym_rows(n)
    b_eq = np.append(c * np.eye(n)[iu] * rw, 1.0)
    scale_tol = 1e-12 * closed

    atoms = _coordinate_atoms(Q if init == "eigen" else np.eye(n), r, c)
    costs = [_cost(S, V) for V in atoms]
    cols = [np.append((V @ V.T)[iu] * rw, 1.0) for V in atoms]

    subsets = [list(J) for J in itertools.combinations(range(n), r)] if math.comb(n, r) <= 256 else \
        [list(np.argsort(-sigma)[:r])]
    n_local = 3
    n_local_searches = 0
    best_lb, Lam_center, lam_p = -np.inf, np.zeros((n, n)), None
    history = []
    converged = pricing_exact = False
    it = 0
    for it in range(1, max_iter + 1):
        res = linprog(np.array(costs), A_eq=np.array(cols).T, b_eq=b_eq, bounds=(0, None), method="highs")
        if res.status != 0:  # pragma: no cover - the initial design is feasible
            raise RuntimeError(f"restricted master LP failed: {res.message}")
        value = float(res.fun)
        n_cols = len(atoms)
        y = res.eqlin.marginals
        Lam = np.zeros((n, n))
        Lam[iu] = y[:-1] * rw / np.where(rw > 1, 2.0, 1.0)
        Lam = Lam + np.triu(Lam, 1).T
        mu = float(y[-1])
        # certified bound at Λ, at its projection onto the matrices commuting with S,
        # and after a dual ascent from that projection
        lt = np.diag(Q.T @ Lam @ Q)
        Lam_d = (Q * lt) @ Q.T
        lam_p = _polish_diagonal_dual(lt if lam_p is None else 0.5 * (lt + lam_p), sigma, r, c)
        Lam_p = (Q * lam_p) @ Q.T
        for L in (Lam, Lam_d, Lam_p):
            lb = lagrangian_lower_bound(S, r, L, c)
            if lb > best_lb:
                best_lb, Lam_center = lb, L
        history.append((value, best_lb))
        if value - best_lb <= tol * abs(value):
            converged = pricing_exact = True
            break

        # ---- pricing, at the current duals and at the best-bound (stability) centre
        cands = []
        for L in (Lam, 0.5 * (Lam + Lam_center)):
            U, sv, Wt = np.linalg.svd(S_mhalf @ L)
            X = 0.5 * (U[:, :r] * sv[:r]) @ Wt[:r]
            cands.append(_factor(S_mhalf @ X, r))
            wl, Ul = np.linalg.eigh(L)
            cands.append(Ul[:, ::-1][:, :r] * np.sqrt(np.clip(wl[::-1][:r], 0, None) / (2.0 * sigma[0])))
            ld = np.clip(np.diag(Q.T @ L @ Q), 0.0, None)
            t = np.sqrt(ld / (2.0 * sigma))
            for J in subsets:
                cands.append(Q[:, J] * t[J])
        randoms = [rng.standard_normal((n, r)) * math.sqrt(c / r) for _ in range(n_starts)]
        U, sv, Wt = np.linalg.svd(S_mhalf @ Lam)
        relaxed = -0.25 * float(np.sum(sv[:r] ** 2))
        found = [(_pricing_objective(V.ravel(), S, Lam, n, r)[0], V) for V in cands]
        found.sort(key=lambda fv: fv[0])
        if found[0][0] - mu >= -scale_tol:  # nothing cheap: local search (L-BFGS)
            for V0 in [V for _, V in found[:n_local]] + randoms:
                opt = minimize(_pricing_objective, V0.ravel(), args=(S, Lam, n, r), jac=True,
                               method="L-BFGS-B", options={"maxiter": 300, "gtol": 1e-11, "ftol": 1e-15})
                V = opt.x.reshape(n, r)
                found.append((_pricing_objective(V.ravel(), S, Lam, n, r)[0], V))
            n_local_searches += 1
        fbest = min(f for f, _ in found)
        pricing_exact = fbest <= relaxed + 1e-9 * max(1.0, abs(relaxed))
        found.sort(key=lambda fv: fv[0])
        new = [V for f, V in found if f - mu < -scale_tol][:max_new]
        if not new:
            break
        for V in new:
            atoms.append(V)
            costs.append(_cost(S, V))
            cols.append(np.append((V @ V.T)[iu] * rw, 1.0))

    w = np.asarray(res.x)
    atoms = atoms[:n_cols]
    keep = w > 1e-13
    W = w[keep]
    return FunctionalResult(
        value=value, lower_bound=float(best_lb), atoms=np.array(atoms)[keep], weights=W / W.sum(),
        closed_form=closed, multiplier=Lam, mu=mu, n_iter=it, converged=converged,
        pricing_exact=bool(pricing_exact), c=c, ridge=ridge, history=tuple(history),
        n_local_searches=n_local_searches,
    )
