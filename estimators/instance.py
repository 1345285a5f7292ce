r"""The instance-dependent optimal projector (theory.md §5).

For a known (or estimated) second moment ``S = E[GᵀG] = Q diag(σ) Qᵀ``,

.. math:: V = Q_J \operatorname{diag}(\sqrt{c/\pi_i})_{i \in J},
          \qquad |J| = r,\quad P(i \in J) = \pi_i,

with the water-filling probabilities ``π*`` of :func:`theory.inclusion_probabilities`.
``E[VVᵀ] = c Σ_{π_i>0} q_i q_iᵀ`` (``= cI`` when every ``π_i > 0``) and
``E[(VVᵀ)²] = c² Q diag(1/π) Qᵀ``, which minimises ``tr(S M)`` over every law of
``V`` with ``E[VVᵀ] = cI`` (:func:`theory.lagrangian_lower_bound`).

References
----------
.. [1] Z. Li et al., "Optimal low-rank stochastic gradient estimation for LLM
   training", arXiv:2603.20632, 2026.
.. [2] W. G. Madow, "On the theory of systematic sampling, II", Ann. Math.
   Statist. 20(3), 1949.
.. [3] Y. Tillé, *Sampling Algorithms*, Springer, 2006 (systematic sampling
   with unequal probabilities, conditional Poisson, pivotal method).
"""

from __future__ import annotations

import math

import numpy as np
import torch

import theory
from theory._checks import check_positive

from ._checks import check_batch_shape, resolve_device, resolve_dtype
from .projectors import Projector, _fresh_generator

__all__ = ["InstanceDependent"]

#: probabilities within this distance of 1 are treated as certain inclusions
_CAP_TOL = 1e-12


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` must be a real array or tensor, got {type(x).__name__}") from exc


class InstanceDependent(Projector):
    r"""Optimal instance-dependent projector for a PSD second moment ``S``.

    Parameters
    ----------
    S : array_like or torch.Tensor, shape (n, n)
        Symmetric positive semi-definite second moment ``E[GᵀG]`` (checked up to
        rounding; eigenvalues below ``1e-10 · λ_max`` count as zero).
    r : int
        Rank, ``1 <= r <= n``.
    c : float, default 1.0
        Isotropy constant.
    floor : float in [0, 1], default 0.0
        Weight ``ε`` of the uniform design mixed into the probabilities,
        ``π = (1 − ε) π* + ε r/n`` (:func:`theory.mixed_inclusion_probabilities`).
        ``0`` is the exact optimum for ``S``; use ``ε > 0`` when ``S`` is an
        estimate: then ``E[VVᵀ] = cI`` on the whole space, at a variance cost of
        at most ``ε (V_Haar − V*)`` for the ``S`` given, and never more than
        ``V_Haar(S')/ε`` for any true ``S'``.

    Attributes
    ----------
    sigma : numpy.ndarray, shape (n,)
        Eigenvalues of ``S``, decreasing.
    Q : torch.Tensor, shape (n, n), float64
        Eigenvectors (columns).
    pi : torch.Tensor, shape (n,), float64
        Inclusion probabilities, ``Σ π = r``.

    Notes
    -----
    **Design: systematic sampling on a random order** (Madow [2]_).  Indices
    with ``π_i = 1`` are always taken; the others are put in a uniformly random
    order, their probabilities laid end to end on ``[0, r − τ)``, and the
    points ``u, u+1, …, u+r−τ−1`` with ``u ~ U[0, 1)`` pick the intervals they
    fall in.  Each interval is shorter than 1, so it holds at most one point:
    exactly ``r`` distinct indices on every draw, and ``P(i ∈ J) = π_i``
    exactly.  Chosen over conditional Poisson (its working probabilities need
    an iterative solve, and drawing is rejective) and the pivotal method
    (sequential over ``n``, a Python loop per draw) because a whole batch is
    one ``argsort``, one ``cumsum`` and one ``searchsorted``: no loop over the
    batch.  Its joint inclusion probabilities differ from those designs', but
    only the marginals enter ``M`` (the directions are orthogonal).

    Directions with ``π_i = 0`` (zero eigenvalues when at least ``r`` are
    positive and ``floor = 0``) are never drawn, so ``E[VVᵀ] = cI`` fails on
    them: harmless only if ``S`` is exact.

    Examples
    --------
    >>> import torch
    >>> P = InstanceDependent(torch.diag(torch.tensor([4.0, 1.0, 1.0, 0.25])), 2)
    >>> P.pi
    tensor([0.8889, 0.4444, 0.4444, 0.2222], dtype=torch.float64)
    >>> V = P.sample(batch_shape=(3,), generator=torch.Generator().manual_seed(0))
    >>> V.shape
    torch.Size([3, 4, 2])
    """

    def __init__(self, S, r, *, c=1.0, floor=0.0):
        S = _to_numpy(S, "S")
        if S.ndim != 2 or S.shape[0] != S.shape[1]:
            raise ValueError(f"`S` must be a square 2-D matrix, got S.shape={S.shape}")
        sigma, Q = theory.psd_eigh(S)
        self._setup(sigma, Q, r, c, floor)

    # ------------------------------------------------------------------ constructors
    def _setup(self, sigma, Q, r, c, floor):
        super().__init__(sigma.size, r, c=c)
        self.floor = check_positive(floor, "floor", allow_zero=True)
        self.sigma = sigma
        pi = theory.mixed_inclusion_probabilities(sigma, self.r, floor=self.floor)
        pi[pi >= 1.0 - _CAP_TOL] = 1.0
        self._pi = torch.as_tensor(pi, dtype=torch.float64)
        self._Q = torch.as_tensor(np.ascontiguousarray(Q), dtype=torch.float64)
        self._cache: dict = {}

    @classmethod
    def from_gradients(cls, G, r, *, c=1.0, floor=0.1):
        r"""Build the design from a sample of gradients, through an SVD (``S`` is never formed).

        Parameters
        ----------
        G : torch.Tensor or array_like, shape (N, m, n) or (m, n)
            ``N`` gradient samples ``G_k`` (a single matrix counts as ``N = 1``).
        r : int
        c : float, default 1.0
        floor : float in [0, 1], default 0.1
            Uniform mixing weight (see the class docstring): ``S`` is estimated,
            so by default every direction keeps ``π_i >= 0.1 r/n``.

        Returns
        -------
        InstanceDependent
            For ``Ŝ = N⁻¹ Σ_k G_kᵀ G_k``.

        Notes
        -----
        The stacked ``A = [G_1; …; G_N]/√N`` (``Nm × n``) has ``AᵀA = Ŝ``; its
        thin SVD ``A = U diag(s) Wᵀ`` gives the eigenpairs ``(s², W)`` with
        better accuracy than ``eigh(Ŝ)`` (no squaring of the condition number)
        and at cost ``O(Nm · n · min(Nm, n))`` instead of ``O(Nm n² + n³)``.
        When ``k = min(Nm, n) < n`` the basis is completed to ``n×n`` by the
        Householder reflections of ``W`` (``O(n² k)``, no random numbers); the
        ``n − k`` complementary eigenvalues are 0, so with ``floor = 0`` those
        directions would never be drawn.  The ``n×n`` basis is stored.

        Examples
        --------
        >>> import torch
        >>> G = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(0))
        >>> P = InstanceDependent.from_gradients(G, 2)
        >>> P.n, P.r, round(float(P.pi.sum()), 12)
        (8, 2, 2.0)
        """
        if not isinstance(G, torch.Tensor):
            G = torch.as_tensor(_to_numpy(G, "G"))
        if G.ndim == 2:
            G = G.unsqueeze(0)
        if G.ndim != 3 or G.numel() == 0:
            raise ValueError(f"`G` must have shape (N, m, n) or (m, n), got G.shape={tuple(G.shape)}")
        if not torch.is_floating_point(G):
            raise TypeError(f"`G` must be a floating-point tensor, got dtype={G.dtype}")
        if not bool(torch.isfinite(G).all()):
            raise ValueError("`G` contains NaN or Inf")
        N, m, n = G.shape
        A = G.detach().to("cpu", torch.float64).reshape(N * m, n) / math.sqrt(N)
        _, s, Wh = torch.linalg.svd(A, full_matrices=False)
        W = Wh.mT  # n × k
        k = W.shape[1]
        sigma = np.zeros(n)
        sigma[:k] = (s**2).numpy()
        if k < n:
            refl, tau = torch.geqrf(W)
            H = torch.linalg.householder_product(
                torch.cat([refl, torch.zeros(n, n - k, dtype=refl.dtype)], dim=1), tau
            )
            H[:, :k] = W
            Q = H.numpy()
        else:
            Q = W.numpy()
        top = sigma.max() if sigma.size else 0.0
        sigma[sigma <= 1e-10 * top] = 0.0
        obj = cls.__new__(cls)
        obj._setup(sigma, Q, r, c, floor)
        return obj

    # ------------------------------------------------------------------ attributes
    @property
    def pi(self) -> torch.Tensor:
        return self._pi

    @property
    def Q(self) -> torch.Tensor:
        return self._Q

    def __repr__(self) -> str:
        return f"InstanceDependent(n={self.n}, r={self.r}, c={self.c:g}, floor={self.floor:g})"

    def value(self) -> float:
        """``tr(S M) = c² Σ σ_i/π_i`` for the ``S`` the design was built from (:func:`theory.design_value`)."""
        return theory.design_value(self.sigma, self._pi.numpy(), self.c)

    def second_moment(self) -> torch.Tensor:
        """``E[(VVᵀ)²] = c² Q diag(1/π) Qᵀ`` (float64, from :func:`theory.instance_dependent_second_moment`)."""
        return torch.as_tensor(theory.instance_dependent_second_moment(self._Q.numpy(), self._pi.numpy(), self.c))

    def second_moment_factor(self) -> float:
        raise ValueError("InstanceDependent is not isotropic: use second_moment() (an n×n matrix)")

    # ------------------------------------------------------------------ sampling
    def _on(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            pi = self._pi
            certain = torch.nonzero(pi >= 1.0).flatten()
            free = torch.nonzero((pi > 0) & (pi < 1.0)).flatten()
            scale = torch.where(pi > 0, torch.sqrt(self.c / torch.where(pi > 0, pi, 1.0)), 0.0)
            self._cache[key] = dict(
                certain=certain.to(device),
                free=free.to(device),
                pi_free=pi[free].to(device),  # float64 for the cumulative sums
                rows=(self._Q.mT.contiguous() * scale[:, None]).to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def _indices(self, batch_shape, generator, device):
        d = self._on(device, torch.float64)
        certain, free, pi_free = d["certain"], d["free"], d["pi_free"]
        tau = certain.numel()
        m = self.r - tau
        parts = [certain.expand(*batch_shape, tau)]
        if m > 0:
            nf = free.numel()
            keys = torch.rand(*batch_shape, nf, generator=generator, device=device)
            perm = keys.argsort(dim=-1)
            C = pi_free[perm].cumsum(dim=-1)
            C = torch.minimum(C, torch.tensor(float(m), dtype=C.dtype, device=device))
            C[..., -1] = float(m)
            u = torch.rand(*batch_shape, 1, generator=generator, device=device, dtype=torch.float64)
            points = u + torch.arange(m, device=device, dtype=torch.float64)
            pos = torch.searchsorted(C, points, right=True).clamp_(max=nf - 1)
            parts.append(free[perm.gather(-1, pos)])
        return torch.cat(parts, dim=-1)

    def sample_indices(self, *, batch_shape=(), generator=None, device=None) -> torch.Tensor:
        """The index sets ``J``: shape ``(*batch_shape, r)``, int64, ``r`` distinct per draw.

        Capped indices (``π_i = 1``) come first, the drawn ones in random order.
        ``V[..., :, k] = √(c/π_{j_k}) q_{j_k}``.
        """
        batch_shape = check_batch_shape(batch_shape)
        device = resolve_device(device, generator)
        if generator is None:
            generator = _fresh_generator(device)
        return self._indices(batch_shape, generator, device)

    def _sample(self, batch_shape, generator, device, dtype):
        idx = self._indices(batch_shape, generator, device)
        rows = self._on(device, dtype)["rows"]
        return rows[idx].mT.contiguous()

    def sample_from_indices(self, idx, *, dtype=None) -> torch.Tensor:
        """``V`` for given index sets (shape ``(*batch, r)``) from :meth:`sample_indices`."""
        out_dtype, compute = resolve_dtype(dtype)
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
            raise TypeError("`idx` must be an int64 tensor from sample_indices()")
        if idx.ndim == 0 or idx.shape[-1] != self.r:
            raise ValueError(f"`idx` must have shape (*batch, r={self.r}), got idx.shape={tuple(idx.shape)}")
        V = self._on(idx.device, compute)["rows"][idx].mT.contiguous()
        return V.to(out_dtype)
