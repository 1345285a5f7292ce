r"""The memory-saving low-rank linear layer and in-place model conversion.

A dense layer ``y = Θx + b`` is reparametrised as ``y = Θx + b + B (Vᵀx)`` with
``Θ`` frozen, ``B ∈ R^{m×r}`` trainable (zero at the start of an outer step) and
``V ∈ R^{n×r}`` a random projection with ``E[VVᵀ] = cI`` (theory.md §1, §7, §8).
The gradient in ``B`` at ``B = 0`` is ``G V``; lifted back, ``G V Vᵀ`` is the
low-rank estimator.

The backward pass of :class:`LowRankLinear` keeps only the compressed input
``xV`` (``r`` numbers per token) plus references to the parameters/buffers
``Θ``, ``V`` and ``B``; it never stores ``x`` and computes no gradient for
``Θ``.  The gradient with respect to ``x`` still flows,
``∂L/∂x = gΘ + (gB)Vᵀ``, so converted layers can be stacked.

References
----------
.. [1] Z. Li et al., "Optimal low-rank stochastic gradient estimation for LLM
   training", arXiv:2603.20632, 2026.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from theory._checks import check_int, check_positive

from ._checks import check_generator
from .projectors import PROJECTORS, Projector, make_projector

__all__ = [
    "LowRankLinear",
    "lowrank_linear",
    "lowrank_term",
    "convert",
    "lowrank_layers",
    "merge_all",
    "resample_all",
    "resolve_projector",
]


# --------------------------------------------------------------------------- projector resolution
def resolve_projector(projector, n, rank, *, c=1.0, name="projector") -> Projector:
    """Turn a family name, a :class:`Projector` or a factory ``n -> Projector`` into a Projector.

    Parameters
    ----------
    projector : str, Projector or callable
        A family name of :data:`estimators.PROJECTORS`; a :class:`Projector`
        whose ``n`` and ``r`` equal ``n`` and ``rank``; or a callable taking
        ``n`` and returning such a Projector (so that instance-dependent
        designs, which need per-layer information, plug in).
    n, rank : int
        Input dimension of the layer and the rank.  ``rank`` may be ``None``
        for a Projector instance or factory, whose own ``r`` is then used.
    c : float, default 1.0
        Isotropy constant used with a family name.  A Projector instance or a
        factory carries its own ``c``.

    Returns
    -------
    Projector

    Raises
    ------
    ValueError
        Unknown family, ``rank`` outside ``1..n``, or a Projector whose shape
        does not match.
    TypeError
        Anything else.

    Examples
    --------
    >>> resolve_projector("coordinate", 8, 2)
    Coordinate(n=8, r=2, c=1, replace=False)
    """
    n = check_int(n, "n", minimum=1)
    if isinstance(projector, str):
        if rank is None:
            raise ValueError(f"`rank` is required with {name}={projector!r}")
        rank = check_int(rank, "rank", minimum=1)
        if rank > n:
            raise ValueError(f"`rank` must satisfy 1 <= rank <= n (the layer's input size), got rank={rank}, n={n}")
        if projector not in PROJECTORS:
            raise ValueError(f"`{name}` must be one of {sorted(PROJECTORS)}, a Projector or a callable, got {name}={projector!r}")
        return make_projector(projector, n, rank, c=c)
    if isinstance(projector, Projector):
        P = projector
    elif callable(projector):
        P = projector(n)
        if not isinstance(P, Projector):
            raise TypeError(f"the `{name}` factory must return a Projector, got {type(P).__name__}")
    else:
        raise TypeError(
            f"`{name}` must be a family name, a Projector or a callable n -> Projector, got {type(projector).__name__}"
        )
    if P.n != n:
        raise ValueError(f"`{name}` has n={P.n} but the layer's input size is n={n}")
    if rank is not None and P.r != check_int(rank, "rank", minimum=1):
        raise ValueError(f"`{name}` has r={P.r} but rank={rank}")
    return P


# --------------------------------------------------------------------------- autograd function
class _LowRankLinearFn(torch.autograd.Function):
    """``y = xΘᵀ + b + (xV)Bᵀ`` saving only ``xV`` (plus parameter references).

    ``V`` is ``(n, r)`` (shared) or ``(N, n, r)`` (one per example, ``N`` =
    leading dimension of ``x``); ``B`` is ``(m, r)`` or ``(N, m, r)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, V, B):
        batched = V.dim() == 3 or B.dim() == 3
        n = x.shape[-1]
        x3 = x.reshape(x.shape[0], -1, n) if batched else x.reshape(1, -1, n)
        xv = torch.matmul(x3, V)  # (N|1, T, r)
        low = torch.matmul(xv, B.transpose(-1, -2))  # (N|1, T, m)
        low = low.reshape(*x.shape[:-1], B.shape[-2])
        # weight None: only the low-rank term (B Vᵀ) x, added to a dense output computed elsewhere
        y = low if weight is None else torch.nn.functional.linear(x, weight, bias) + low
        # Θ is frozen by design; if a caller unfreezes it, x must be kept to form its gradient
        need_w = ctx.needs_input_grad[1]
        ctx.batched = batched
        ctx.x_shape = x.shape
        ctx.need_w = need_w
        if need_w:
            ctx.save_for_backward(xv, weight, V, B, x)
        else:
            ctx.save_for_backward(xv, weight, V, B)
        return y

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        xv, weight, V, B = saved[:4]
        m = B.shape[-2]
        N = xv.shape[0]
        g3 = g.reshape(N, -1, m)
        grad_x = grad_w = grad_b = grad_B = None
        if ctx.needs_input_grad[0]:
            back = torch.matmul(torch.matmul(g3, B), V.transpose(-1, -2))  # (N|1, T, n)
            grad_x = back.reshape(ctx.x_shape)
            if weight is not None:
                grad_x = grad_x + torch.matmul(g, weight)
        if ctx.need_w:
            x = saved[4]
            grad_w = g.reshape(-1, m).T @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, m).sum(0)
        if ctx.needs_input_grad[4]:
            grad_B = torch.matmul(g3.transpose(-1, -2), xv)  # (N|1, m, r)
            if B.dim() == 2:
                grad_B = grad_B.sum(0)
        return grad_x, grad_w, grad_b, None, grad_B


def lowrank_term(x, V, B) -> torch.Tensor:
    r"""Only the low-rank term ``(xV)Bᵀ`` of :func:`lowrank_linear`, saving only ``xV``.

    Added to the output of a dense layer whose weight does not require grad,
    it gives the reparametrisation ``Θ + BVᵀ`` without storing ``x``:
    ``∂L/∂B = gᵀ(xV)``, ``∂L/∂x = (gB)Vᵀ``.  Shapes as in :func:`lowrank_linear`.
    """
    if V.shape[-1] != B.shape[-1] or x.shape[-1] != V.shape[-2]:
        raise ValueError(f"shape mismatch: x.shape={tuple(x.shape)}, V.shape={tuple(V.shape)}, B.shape={tuple(B.shape)}")
    return _LowRankLinearFn.apply(x, None, None, V, B)


def lowrank_linear(x, weight, bias, V, B) -> torch.Tensor:
    r"""Functional form of :class:`LowRankLinear`: ``y = xΘᵀ + b + (xV)Bᵀ``.

    Parameters
    ----------
    x : Tensor, shape (N, ..., n)
    weight : Tensor, shape (m, n)
        ``Θ``.  No gradient is formed for it unless it requires grad (then
        ``x`` is saved as well and the memory saving is lost).
    bias : Tensor of shape (m,) or None
    V : Tensor, shape (n, r) or (N, n, r)
        Projection, shared or one per example (leading dimension of ``x``).
    B : Tensor, shape (m, r) or (N, m, r)

    Returns
    -------
    Tensor, shape (N, ..., m)

    Notes
    -----
    Saved for backward: ``xV`` (``r`` numbers per token) and references to
    ``Θ, V, B``.  ``∂L/∂B = gᵀ(xV)``, ``∂L/∂x = gΘ + (gB)Vᵀ``.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    >>> W, V, B = torch.zeros(2, 3), torch.eye(3)[:, :2], torch.ones(2, 2, requires_grad=True)
    >>> lowrank_linear(x, W, None, V, B).shape
    torch.Size([4, 2])
    """
    if x.shape[-1] != weight.shape[1] or V.shape[-2] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: x.shape={tuple(x.shape)}, weight.shape={tuple(weight.shape)}, V.shape={tuple(V.shape)}"
        )
    if B.shape[-2] != weight.shape[0] or B.shape[-1] != V.shape[-1]:
        raise ValueError(f"`B` must have shape (..., {weight.shape[0]}, {V.shape[-1]}), got B.shape={tuple(B.shape)}")
    for name, t in (("V", V), ("B", B)):
        if t.dim() == 3 and t.shape[0] != x.shape[0]:
            raise ValueError(
                f"a per-example `{name}` needs {name}.shape[0] == x.shape[0], got {tuple(t.shape)} and {tuple(x.shape)}"
            )
        if t.dim() not in (2, 3):
            raise ValueError(f"`{name}` must be 2-D or 3-D, got {name}.shape={tuple(t.shape)}")
    return _LowRankLinearFn.apply(x, weight, bias, V, B)


# --------------------------------------------------------------------------- the layer
def _fresh_generator(device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.seed()
    return g


class LowRankLinear(nn.Module):
    r"""Linear layer ``y = xΘᵀ + b + (xV)Bᵀ`` with ``Θ`` frozen and ``B`` trainable.

    Parameters
    ----------
    in_features, out_features : int
        ``n`` and ``m``.
    rank : int
        ``r``, ``1 <= r <= in_features``.
    projector : str, Projector or callable, default "haar"
        Law of ``V``: a family name (``"haar"``, ``"coordinate"``,
        ``"coordinate_replace"``, ``"gaussian"``, ``"rademacher"``), a
        :class:`~estimators.projectors.Projector` with ``n == in_features`` and
        ``r == rank``, or a callable ``n -> Projector``.
    c : float, default 1.0
        Isotropy constant ``E[VVᵀ] = cI`` (used with a family name).
    bias : bool, default True
    device, dtype : optional
    generator : torch.Generator, optional
        Randomness of the initial ``Θ`` (``nn.Linear``'s Kaiming-uniform law)
        and of the first ``V``; ``None`` uses a fresh generator (never the
        global RNG).

    Attributes
    ----------
    weight : nn.Parameter, shape (out, in), ``requires_grad=False``
        ``Θ``.
    bias : nn.Parameter or None, frozen
    B : nn.Parameter, shape (out, rank), initialised to zeros
    V : buffer, shape (in, rank)
        The current projection.
    projector : Projector

    Notes
    -----
    The backward pass keeps only ``xV`` per token (see :func:`lowrank_linear`);
    the gradient in ``B`` at ``B = 0`` is ``G V`` where ``G`` is the dense
    gradient of ``Θ``, and :meth:`merge` performs ``Θ ← Θ + B Vᵀ`` (the outer
    step of the lazy-update scheme, theory.md §8).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> layer = LowRankLinear(8, 3, rank=2, generator=g)
    >>> y = layer(torch.randn(5, 8, generator=g))
    >>> y.sum().backward()
    >>> layer.B.grad.shape, layer.weight.grad is None
    (torch.Size([3, 2]), True)
    >>> layer.merge(); layer.resample(generator=g)
    """

    def __init__(self, in_features, out_features, rank, *, projector="haar", c=1.0, bias=True,
                 device=None, dtype=None, generator=None):
        super().__init__()
        self.in_features = check_int(in_features, "in_features", minimum=1)
        self.out_features = check_int(out_features, "out_features", minimum=1)
        self.rank = check_int(rank, "rank", minimum=1)
        if self.rank > self.in_features:
            raise ValueError(
                f"`rank` must satisfy 1 <= rank <= in_features, got rank={self.rank}, in_features={self.in_features}"
            )
        c = check_positive(c, "c")
        generator = check_generator(generator)
        self.projector = resolve_projector(projector, self.in_features, self.rank, c=c)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.B = nn.Parameter(torch.zeros(self.out_features, self.rank, **factory))
        self.register_buffer("V", torch.empty(self.in_features, self.rank, **factory))
        gen = generator if generator is not None else _fresh_generator(self.weight.device)
        self._init_dense(gen)
        self.resample(generator=gen)

    def _init_dense(self, generator):
        # nn.Linear.reset_parameters, with an explicit generator
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound, generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank, *, projector="haar", c=1.0, generator=None) -> "LowRankLinear":
        """Wrap an existing ``nn.Linear``: ``Θ`` and ``b`` share its storage (no copy).

        Parameters
        ----------
        linear : nn.Linear
        rank : int
        projector, c, generator
            As in the constructor.

        Returns
        -------
        LowRankLinear
            Its ``weight``/``bias`` are new frozen Parameters viewing the same
            memory as ``linear.weight``/``linear.bias``, so :meth:`merge` also
            updates ``linear``.  ``B = 0``; ``V`` is freshly drawn.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"`linear` must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank = check_int(rank, "rank", minimum=1)
        if self.rank > self.in_features:
            raise ValueError(
                f"`rank` must satisfy 1 <= rank <= in_features, got rank={self.rank}, in_features={self.in_features}"
            )
        c = check_positive(c, "c")
        generator = check_generator(generator)
        self.projector = resolve_projector(projector, self.in_features, self.rank, c=c)
        w = linear.weight
        self.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=w.device, dtype=w.dtype))
        self.register_buffer("V", torch.empty(self.in_features, self.rank, device=w.device, dtype=w.dtype))
        self.resample(generator=generator)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, projector={self.projector!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got x.shape={tuple(x.shape)}")
        return _LowRankLinearFn.apply(x, self.weight, self.bias, self.V, self.B)

    @torch.no_grad()
    def resample(self, generator=None) -> None:
        """Draw a new ``V`` in place from :attr:`projector` (``B`` is left as is)."""
        generator = check_generator(generator)
        V = self.projector.sample(generator=generator, device=self.V.device if generator is None else None,
                                  dtype=self.V.dtype)
        self.V.copy_(V.to(self.V.device))

    @torch.no_grad()
    def merge(self) -> None:
        """``Θ ← Θ + B Vᵀ``; ``B ← 0`` (no gradient is recorded)."""
        self.weight.add_(self.B @ self.V.T)
        self.B.zero_()

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with weight ``Θ + B Vᵀ`` (a copy; this layer is unchanged)."""
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin = lin.to_empty(device=w.device).to(w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w + self.B @ self.V.T)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


# --------------------------------------------------------------------------- model conversion
def _target_predicate(target, model) -> Callable[[str, nn.Module], bool]:
    if target is None:
        return lambda name, mod: True
    if isinstance(target, str):
        target = [target]
    if callable(target):
        return target
    try:
        names = set(target)
    except TypeError as exc:
        raise TypeError(
            f"`target` must be None, an iterable of module names or a predicate (name, module) -> bool, "
            f"got {type(target).__name__}"
        ) from exc
    known = {name for name, _ in model.named_modules()}
    missing = sorted(n for n in names if n not in known)
    if missing:
        raise ValueError(f"`target` names modules the model does not have: {missing}")
    return lambda name, mod: name in names


def targeted_linears(model: nn.Module, target=None, *, include_lowrank=False) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of the ``nn.Linear`` layers selected by ``target``.

    ``target``: ``None`` (every ``nn.Linear``), an iterable of module names, or
    a predicate ``(name, module) -> bool``.  With ``include_lowrank`` the
    :class:`LowRankLinear` layers are candidates as well.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    pred = _target_predicate(target, model)
    kinds = (nn.Linear, LowRankLinear) if include_lowrank else (nn.Linear,)
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, kinds) and pred(name, mod)]


def convert(model, *, rank, projector="haar", c=1.0, target=None, generator=None):
    """Swap the targeted ``nn.Linear`` layers of ``model`` for :class:`LowRankLinear` in place.

    Parameters
    ----------
    model : nn.Module
    rank : int
        Rank of every converted layer; must not exceed any targeted layer's
        ``in_features``.
    projector : str, Projector or callable, default "haar"
        See :class:`LowRankLinear` (a Projector instance fits only layers of
        its ``n``; a factory ``n -> Projector`` fits all).
    c : float, default 1.0
    target : None, iterable of str, or callable, optional
        ``None``: every ``nn.Linear``; names of modules (as in
        ``model.named_modules()``); or a predicate ``(name, module) -> bool``.
    generator : torch.Generator, optional
        Randomness of the first ``V`` of each layer (drawn in module order).

    Returns
    -------
    nn.Module
        ``model`` itself (modified in place), or a new :class:`LowRankLinear`
        when ``model`` is itself an ``nn.Linear``.

    Raises
    ------
    ValueError
        If nothing matches, or ``rank`` exceeds a targeted layer's input size.

    Notes
    -----
    The converted layers share ``Θ`` and ``b`` with the replaced ones (no
    copy) and freeze them; other parameters of ``model`` are left as they are.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> net = convert(net, rank=2, target=["0"], generator=torch.Generator().manual_seed(0))
    >>> [name for name, _ in lowrank_layers(net)]
    ['0']
    """
    rank = check_int(rank, "rank", minimum=1)
    generator = check_generator(generator)
    if isinstance(model, nn.Linear):
        if target is not None and not _target_predicate(target, model)("", model):
            raise ValueError("`target` matches no nn.Linear layer of the model")
        return LowRankLinear.from_linear(model, rank, projector=projector, c=c, generator=generator)
    found = targeted_linears(model, target)
    if not found:
        raise ValueError(f"`model` has no nn.Linear layer matched by target={target!r}")
    for name, lin in found:
        if rank > lin.in_features:
            raise ValueError(
                f"`rank` must satisfy 1 <= rank <= in_features for every targeted layer, "
                f"got rank={rank} and layer {name!r} with in_features={lin.in_features}"
            )
    for name, lin in found:
        new = LowRankLinear.from_linear(lin, rank, projector=projector, c=c, generator=generator)
        _set_submodule(model, name, new)
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lowrank_layers(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    """All ``(name, layer)`` pairs of :class:`LowRankLinear` modules in ``model``, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)]


def merge_all(model: nn.Module) -> None:
    """:meth:`LowRankLinear.merge` on every low-rank layer of ``model``."""
    for _, layer in lowrank_layers(model):
        layer.merge()


def resample_all(model: nn.Module, generator=None) -> None:
    """:meth:`LowRankLinear.resample` on every low-rank layer of ``model`` (module order)."""
    generator = check_generator(generator)
    for _, layer in lowrank_layers(model):
        layer.resample(generator=generator)
