r"""Samplers of random projections ``V ∈ R^{n×r}`` with ``E[V Vᵀ] = c I``.

The low-rank estimator of a gradient estimator ``G`` is ``ĝ = G V Vᵀ``; with
``E[VVᵀ] = cI`` and ``c = 1`` it is unbiased, and the law of ``V`` decides its
variance through ``M = E[(VVᵀ)²]`` (``theory.moments``).  Haar–Stiefel and
coordinate sampling without replacement attain the minimax optimum
``M = c² (n/r) I``; Gaussian, Rademacher and coordinate sampling with
replacement do not.

Every sampler draws a whole batch in one call, takes its randomness from a
``torch.Generator`` passed in (never the global RNG) and computes half-precision
requests in float32 before casting.

References
----------
.. [1] Z. Li et al., "Optimal low-rank stochastic gradient estimation for LLM
   training", arXiv:2603.20632, 2026.
.. [2] F. Mezzadri, "How to generate random matrices from the classical compact
   groups", Notices of the AMS 54(5), 2007.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import theory
from theory._checks import check_choice, check_positive, check_rank

from ._checks import check_batch_shape, resolve_device, resolve_dtype

__all__ = [
    "Projector",
    "HaarStiefel",
    "Coordinate",
    "Gaussian",
    "Rademacher",
    "make_projector",
    "PROJECTORS",
]


class Projector:
    """Base class of the samplers: a distribution of ``V ∈ R^{n×r}`` with ``E[VVᵀ] = cI``.

    Subclasses implement :meth:`_sample` (in a float32 or float64 compute dtype)
    and :meth:`second_moment`.

    Parameters
    ----------
    n : int
        Ambient dimension (input features of a linear layer).
    r : int
        Rank, ``1 <= r <= n``.
    c : float, default 1.0
        Isotropy constant, ``E[VVᵀ] = c I_n``.
    """

    #: name of the family in :data:`theory.FAMILIES` (``None`` for non-isotropic designs)
    family: str | None = None

    def __init__(self, n, r, *, c=1.0):
        self._n, self._r = check_rank(n, r)
        self._c = check_positive(c, "c")

    @property
    def n(self) -> int:
        return self._n

    @property
    def r(self) -> int:
        return self._r

    @property
    def c(self) -> float:
        return self._c

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, r={self.r}, c={self.c:g})"

    def sample(self, *, batch_shape=(), generator=None, device=None, dtype=None) -> torch.Tensor:
        """Draw ``V`` (or a batch of independent draws).

        Parameters
        ----------
        batch_shape : tuple of int, default ()
            Leading shape of independent draws.
        generator : torch.Generator, optional
            Source of randomness; ``None`` uses a fresh non-deterministic
            generator (the global RNG is never touched).
        device : torch.device or str, optional
            Defaults to the generator's device, else the CPU.
        dtype : torch.dtype, optional
            float64, float32, float16 or bfloat16 (half precision is computed in
            float32 and cast).  Defaults to ``torch.get_default_dtype()``.

        Returns
        -------
        torch.Tensor
            Shape ``(*batch_shape, n, r)``.
        """
        batch_shape = check_batch_shape(batch_shape)
        device = resolve_device(device, generator)
        out_dtype, compute = resolve_dtype(dtype)
        if generator is None:
            generator = _fresh_generator(device)
        V = self._sample(batch_shape, generator, device, compute)
        return V if V.dtype == out_dtype else V.to(out_dtype)

    def _sample(self, batch_shape, generator, device, dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def second_moment(self) -> torch.Tensor:
        """Closed form of ``E[(VVᵀ)²]`` (float64, ``n×n``) from :mod:`theory`."""
        return torch.as_tensor(theory.second_moment_matrix(self.family, self.n, self.r, self.c))

    def second_moment_factor(self) -> float:
        """``α`` with ``E[(VVᵀ)²] = α I`` (isotropic families only)."""
        return theory.isotropic_second_moment(self.family, self.n, self.r, self.c)


def _fresh_generator(device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.seed()
    return g


class HaarStiefel(Projector):
    r"""``V = √(cn/r) U`` with ``U`` uniform (Haar) on the Stiefel manifold ``V_r(R^n)``.

    ``U`` is the Q factor of an ``n×r`` standard Gaussian matrix ``G = QR`` in
    the thin QR factorisation whose ``R`` has a positive diagonal (Mezzadri's
    sign fix [2]_; a plain Householder QR is not Haar-distributed).

    Notes
    -----
    Two numerically different routes to the same ``Q``:

    * ``n >= 4r`` and a batch, or a single draw with ``r >= 64``: Cholesky QR,
      ``Q = G L^{-T}`` with ``L = chol(GᵀG)``, whose
      ``R = Lᵀ`` has a positive diagonal by construction.  A Gaussian ``n×r``
      with ``n >= 4r`` has condition number about ``(√n+√r)/(√n−√r) <= 3``, so
      the loss of orthogonality ``~κ² ε`` stays at rounding level.  It is all
      matrix products and one small triangular solve, so batches run as batched
      BLAS-3; torch's batched Householder QR on the CPU was 19× slower than a
      loop at ``n = 4096, r = 128`` (``python -m studies bench-samplers``).
      Should the Cholesky factorisation fail, the draw falls back to the route
      below.
    * otherwise: Householder QR (``torch.linalg.qr``) and columns multiplied by
      ``sign(diag R)``.  For a single small draw this is what
      ``torch.nn.init.orthogonal_`` does, and the few small kernels of the
      Cholesky route cost more than they save there (measured with 2 threads).

    ``VᵀV = c (n/r) I_r`` exactly, so ``E[(VVᵀ)²] = c² (n/r) I``: minimax optimal
    (theory.md §5).

    Examples
    --------
    >>> import torch
    >>> P = HaarStiefel(6, 2)
    >>> V = P.sample(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> torch.allclose(V.T @ V, 3.0 * torch.eye(2, dtype=torch.float64))
    True
    """

    family = "haar"

    #: Cholesky QR needs ``n >= CHOLESKY_QR_RATIO * r`` (see Notes).
    CHOLESKY_QR_RATIO = 4
    #: ... and is used for single draws from this rank on (batches: any rank).
    CHOLESKY_QR_MIN_RANK = 64

    def _sample(self, batch_shape, generator, device, dtype):
        G = torch.randn(*batch_shape, self.n, self.r, generator=generator, device=device, dtype=dtype)
        scale = math.sqrt(self.c * self.n / self.r)
        cholesky = self.n >= self.CHOLESKY_QR_RATIO * self.r and (
            len(batch_shape) > 0 or self.r >= self.CHOLESKY_QR_MIN_RANK
        )
        if cholesky:
            # Q = G R⁻¹ with R = Lᵀ, L = chol(GᵀG): the thin QR with diag R > 0
            L, info = torch.linalg.cholesky_ex(G.mT @ G)
            if not bool(info.any()):
                # G L⁻ᵀ as one (batched) matrix product: the r×r inverse is cheap and,
                # with κ(L) = κ(G) <= ~3, accurate; a triangular solve against the
                # n×r matrix was twice as slow on the CPU
                eye = torch.eye(self.r, device=device, dtype=dtype)
                Linv = torch.linalg.solve_triangular(L, eye, upper=False)
                return torch.matmul(G, Linv.mT.mul_(scale))
        Q, R = torch.linalg.qr(G)
        # sign(diag R) is ±1 almost surely (a zero diagonal has probability zero)
        d = torch.diagonal(R, dim1=-2, dim2=-1).sign()
        return Q.mul_(d.mul_(scale).unsqueeze(-2))


class Coordinate(Projector):
    r"""Coordinate sampling: ``V = √(cn/r) [e_{j_1} … e_{j_r}]``.

    Parameters
    ----------
    n, r : int
    c : float, default 1.0
    replace : bool, default False
        ``False``: ``j`` is a uniform ``r``-subset (minimax optimal,
        ``M = c² (n/r) I``); ``True``: ``j_k`` i.i.d. uniform
        (``M = c² (n+r−1)/r · I``).

    Notes
    -----
    :meth:`sample_indices` returns the indices alone, so code can gather
    columns (``x[..., idx] * scale``) instead of multiplying by a 0/1 matrix.

    Examples
    --------
    >>> import torch
    >>> P = Coordinate(5, 2)
    >>> idx = P.sample_indices(generator=torch.Generator().manual_seed(0))
    >>> idx.shape, P.scale
    (torch.Size([2]), 1.5811388300841898)
    """

    def __init__(self, n, r, *, c=1.0, replace=False):
        super().__init__(n, r, c=c)
        if not isinstance(replace, bool):
            raise TypeError(f"`replace` must be a bool, got replace={replace!r}")
        self.replace = replace

    @property
    def family(self):  # type: ignore[override]
        return "coordinate_replace" if self.replace else "coordinate"

    @property
    def scale(self) -> float:
        """The non-zero entry ``√(cn/r)`` of each column."""
        return math.sqrt(self.c * self.n / self.r)

    def __repr__(self) -> str:
        return f"Coordinate(n={self.n}, r={self.r}, c={self.c:g}, replace={self.replace})"

    def sample_indices(self, *, batch_shape=(), generator=None, device=None) -> torch.Tensor:
        """Indices ``j`` of shape ``(*batch_shape, r)`` (int64)."""
        batch_shape = check_batch_shape(batch_shape)
        device = resolve_device(device, generator)
        if generator is None:
            generator = _fresh_generator(device)
        return self._indices(batch_shape, generator, device)

    def _indices(self, batch_shape, generator, device):
        if self.replace:
            return torch.randint(self.n, (*batch_shape, self.r), generator=generator, device=device)
        if self.r == self.n:
            keys = torch.rand(*batch_shape, self.n, generator=generator, device=device)
            return keys.argsort(dim=-1)
        # the r largest of n i.i.d. uniform keys form a uniform r-subset
        keys = torch.rand(*batch_shape, self.n, generator=generator, device=device)
        return keys.topk(self.r, dim=-1, sorted=False).indices

    def _sample(self, batch_shape, generator, device, dtype):
        idx = self._indices(batch_shape, generator, device)
        V = torch.zeros(*batch_shape, self.n, self.r, device=device, dtype=dtype)
        V.scatter_(-2, idx.unsqueeze(-2), self.scale)
        return V


class Gaussian(Projector):
    r"""I.i.d. ``N(0, c/r)`` entries (the Flora/APOLLO projection).

    Notes
    -----
    ``E[(VVᵀ)²] = c² (n+r+1)/r · I``: worse than the optimum by ``(n+r+1)/n``.
    """

    family = "gaussian"

    def _sample(self, batch_shape, generator, device, dtype):
        V = torch.randn(*batch_shape, self.n, self.r, generator=generator, device=device, dtype=dtype)
        return V.mul_(math.sqrt(self.c / self.r))


class Rademacher(Projector):
    r"""I.i.d. ``±√(c/r)`` entries.

    Notes
    -----
    ``E[(VVᵀ)²] = c² (n+r−1)/r · I``: worse than the optimum by ``(n+r−1)/n``.
    """

    family = "rademacher"

    def _sample(self, batch_shape, generator, device, dtype):
        bits = torch.randint(0, 2, (*batch_shape, self.n, self.r), generator=generator, device=device)
        return bits.to(dtype).mul_(2.0).sub_(1.0).mul_(math.sqrt(self.c / self.r))


#: Projector families constructible from a name and ``(n, r, c)``.
PROJECTORS = {
    "haar": HaarStiefel,
    "coordinate": Coordinate,
    "coordinate_replace": lambda n, r, *, c=1.0: Coordinate(n, r, c=c, replace=True),
    "gaussian": Gaussian,
    "rademacher": Rademacher,
}


def make_projector(name, n, r, *, c=1.0) -> Projector:
    """Build an instance-independent projector from its family name.

    Parameters
    ----------
    name : {"haar", "coordinate", "coordinate_replace", "gaussian", "rademacher"}
    n, r : int
    c : float, default 1.0

    Examples
    --------
    >>> make_projector("haar", 16, 4)
    HaarStiefel(n=16, r=4, c=1)
    """
    check_choice(name, "projector", tuple(PROJECTORS))
    return PROJECTORS[name](n, r, c=c)
