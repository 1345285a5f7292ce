r"""Infinitesimal perturbation analysis (back-propagation), full-rank and low-rank.

The IPA estimator of ``∇_Θ E f(Θ; ξ)`` is the pathwise gradient
``G = ∇_Θ f(Θ; ξ)``.  Its low-rank version back-propagates to ``B`` in the
reparametrisation ``Θ + BVᵀ`` at ``B = 0`` (theory.md §7): ``G_B = G V``, lifted
to ``ĝ = G_B Vᵀ``.  The layer's forward adds ``(xV)Bᵀ`` through
:func:`estimators.lowrank.lowrank_term`, which keeps only ``xV`` for the
backward pass, and ``Θ`` gets no gradient: the dense gradient is never formed.

Also here: :func:`ipa_grad_B` for converted models and :func:`ipa_replications`,
which computes ``R`` independent replications of an estimator with
``torch.func.vmap`` (no Python loop over ``R``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from theory._checks import check_int

from ._checks import check_generator
from .estimate import (
    call_loss,
    check_batch_dim,
    draw_V,
    finite_or_raise,
    fresh_generator,
    hooks,
    lift,
    lowrank_targets,
    resolve_targets,
)
from .lowrank import lowrank_term

__all__ = ["ipa_estimate", "ipa_grad_B", "ipa_replications"]


@contextlib.contextmanager
def _requires_grad_only(model, tensors):
    """Switch ``requires_grad`` off for every parameter except ``tensors``; restore afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def ipa_estimate(model, loss_fn, batch, targets, *, share_projection=True, generator=None) -> dict[str, torch.Tensor]:
    """IPA estimate for resolved targets (see :func:`estimators.estimate`, ``method="ipa"``).

    Parameters
    ----------
    model, loss_fn, batch
        As in :func:`estimators.estimate`.
    targets : list of Target
        From :func:`estimators.estimate.resolve_targets`: all full-rank or all
        low-rank.
    share_projection : bool, default True
    generator : torch.Generator, optional

    Returns
    -------
    dict[str, Tensor]
    """
    generator = check_generator(generator)
    if targets[0].projector is None:
        weights = [t.module.weight for t in targets]
        with _requires_grad_only(model, weights):
            losses = call_loss(loss_fn, model, batch)
            grads = torch.autograd.grad(losses.mean(), weights, allow_unused=True)
        out = {t.key: (g if g is not None else torch.zeros_like(t.module.weight)).detach()
               for t, g in zip(targets, grads)}
        return finite_or_raise(out)

    if generator is None:
        generator = fresh_generator(targets[0].module.weight.device)
    state = {t.key: {} for t in targets}

    def make_hook(t):
        st = state[t.key]

        def hook(module, inputs, output):
            x = inputs[0]
            if "V" not in st:
                N = None if share_projection else x.shape[0]
                st["V"] = draw_V(t, N, generator, output)
                shape = (t.m, t.projector.r) if share_projection else (N, t.m, t.projector.r)
                st["B"] = torch.zeros(shape, device=output.device, dtype=output.dtype, requires_grad=True)
            st.setdefault("inputs", []).append(x)
            return output + lowrank_term(x, st["V"], st["B"])

        return hook

    with _requires_grad_only(model, []), hooks([(t.module, make_hook(t)) for t in targets]):
        losses = call_loss(loss_fn, model, batch)
        used = [t for t in targets if "B" in state[t.key]]
        if not share_projection:
            for t in used:
                for x in state[t.key]["inputs"]:
                    check_batch_dim(t, x, losses.shape[0])
        for t in used:
            del state[t.key]["inputs"]
        grads = torch.autograd.grad(losses.mean(), [state[t.key]["B"] for t in used], allow_unused=True) if used else []
    out = {t.key: torch.zeros_like(t.module.weight).detach() for t in targets}
    for t, gB in zip(used, grads):
        st = state[t.key]
        if gB is None:
            continue
        # grad of the mean in per-example B_i is G_i V_i / N; lift(...) averages, so undo the 1/N
        if gB.dim() == 3:
            gB = gB * gB.shape[0]
        out[t.key] = lift(gB, st["V"]).detach()
    return finite_or_raise(out)


def ipa_grad_B(model, loss_fn, batch, *, params=None) -> dict[str, torch.Tensor]:
    """IPA gradient in ``B`` for every :class:`~estimators.lowrank.LowRankLinear` of a converted model.

    Parameters
    ----------
    model : nn.Module
        A model converted with :func:`estimators.lowrank.convert`.
    loss_fn : callable
        ``loss_fn(model, batch) -> (N,)`` per-example losses.
    batch : any
    params : None, iterable of str or callable, optional
        Which low-rank layers (module names or a predicate); default all.

    Returns
    -------
    dict[str, Tensor]
        ``{module_name: ∇_B mean loss}`` of shape ``(out, rank)``; ``.grad``
        fields are not touched.

    Examples
    --------
    >>> import torch
    >>> from estimators.lowrank import convert
    >>> from estimators.models import LinearModel
    >>> g = torch.Generator().manual_seed(0)
    >>> net = convert(LinearModel(6, 3, generator=g), rank=2, generator=g)   # layer "fc"
    >>> X = torch.randn(5, 6, generator=g)
    >>> ipa_grad_B(net, lambda m, b: m(b).pow(2).sum(-1), X)["fc"].shape
    torch.Size([3, 2])
    """
    targets = lowrank_targets(model, params)
    Bs = [t.module.B for t in targets]
    for t in targets:
        if not t.module.B.requires_grad:
            raise ValueError(f"layer {t.key!r}: `B` does not require grad")
    losses = call_loss(loss_fn, model, batch)
    grads = torch.autograd.grad(losses.mean(), Bs, allow_unused=True)
    out = {t.key: (g if g is not None else torch.zeros_like(t.module.B)).detach() for t, g in zip(targets, grads)}
    return finite_or_raise(out)


# --------------------------------------------------------------------------- Monte Carlo at scale
class _LossModule(nn.Module):
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _leading_sizes(batch):
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise TypeError("`batches` must contain at least one tensor")
    return leaves[0].shape


def ipa_replications(model, loss_fn, batches, *, projector=None, rank=None, c=1.0, share_projection=True,
                     params=None, generator=None, chunk_size=None) -> dict[str, torch.Tensor]:
    r"""``R`` independent replications of the IPA estimator, vectorised with ``torch.func.vmap``.

    Parameters
    ----------
    model : nn.Module
        Its parameters are read, not modified.
    loss_fn : callable
        ``loss_fn(model, batch) -> (N,)``; must be vmap-compatible (no
        ``.item()``, no data-dependent Python control flow).
    batches : pytree of tensors
        ``R`` batches stacked along a new leading dimension: every tensor leaf
        has shape ``(R, N, ...)``.
    projector, rank, c, share_projection, params
        As in :func:`estimators.estimate`.
    generator : torch.Generator, optional
        Draws all ``V`` up front (shape ``(R, n, r)`` or ``(R, N, n, r)``).
    chunk_size : int, optional
        Passed to ``torch.func.vmap`` to bound memory.

    Returns
    -------
    dict[str, Tensor]
        ``{"<module>.weight": (R, m, n)}``: replication ``k`` equals
        ``estimate(model, loss_fn, batch_k, method="ipa", ...)`` with the
        ``k``-th draws.

    Notes
    -----
    Full rank: ``vmap(grad(L))`` over the batches.  Low rank: each targeted
    layer's output gets ``(xV)Bᵀ`` added by a forward hook and the gradient in
    ``B = 0`` is taken (per-example ``B_i`` of shape ``(N, m, r)`` for the
    independent estimator), then lifted with ``V``.  No Python loop over ``R``.

    Examples
    --------
    >>> import torch
    >>> from estimators.models import LinearModel
    >>> g = torch.Generator().manual_seed(0)
    >>> net = LinearModel(6, 3, generator=g)
    >>> Xs = torch.randn(100, 8, 6, generator=g)       # R = 100 batches of N = 8
    >>> reps = ipa_replications(net, lambda m, X: m(X).pow(2).sum(-1), Xs,
    ...                         projector="haar", rank=2, generator=g)
    >>> reps["fc.weight"].shape
    torch.Size([100, 3, 6])
    """
    from torch.func import functional_call, grad, vmap

    generator = check_generator(generator)
    if not isinstance(share_projection, bool):
        raise TypeError(f"`share_projection` must be a bool, got share_projection={share_projection!r}")
    if rank is not None:
        rank = check_int(rank, "rank", minimum=1)
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    targets = resolve_targets(model, params, projector, rank, c)
    sizes = _leading_sizes(batches)
    if len(sizes) < 2:
        raise ValueError(f"`batches` leaves must have shape (R, N, ...), got {tuple(sizes)}")
    R, N = int(sizes[0]), int(sizes[1])
    wrapper = _LossModule(model, loss_fn)
    consts = {k: v.detach() for k, v in wrapper.named_parameters()}
    consts.update({k: v.detach() for k, v in wrapper.named_buffers()})
    names = {id(mod): name for name, mod in wrapper.named_modules()}

    if targets[0].projector is None:
        keys = [names[id(t.module)] + ".weight" for t in targets]

        def f_full(W, batch):
            losses = functional_call(wrapper, {**consts, **W}, (batch,))
            if losses.dim() != 1:
                raise ValueError(f"`loss_fn` must return per-example losses of shape (N,), got shape {tuple(losses.shape)}")
            return losses.mean()

        W0 = {k: consts[k] for k in keys}
        G = vmap(grad(f_full), in_dims=(None, 0), chunk_size=chunk_size)(W0, batches)
        return finite_or_raise({t.key: G[k] for t, k in zip(targets, keys)})

    if generator is None:
        generator = fresh_generator(targets[0].module.weight.device)
    like = targets[0].module.weight.detach()
    Vs = {}
    Bs = {}
    for t in targets:
        shape = (R,) if share_projection else (R, N)
        dev = like.device if generator is None else None
        Vs[t.key] = t.projector.sample(batch_shape=shape, generator=generator, device=dev,
                                       dtype=like.dtype).to(like.device)
        bshape = (t.m, t.projector.r) if share_projection else (N, t.m, t.projector.r)
        Bs[t.key] = torch.zeros(bshape, dtype=like.dtype, device=like.device)
    state = {}

    def make_hook(t):
        def hook(module, inputs, output):
            x = inputs[0]
            V, B = state["V"][t.key], state["B"][t.key]
            if V.dim() == 3:
                x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            else:
                x3 = x.reshape(1, -1, x.shape[-1])
            low = torch.matmul(torch.matmul(x3, V), B.transpose(-1, -2))
            return output + low.reshape(output.shape)

        return hook

    def f_low(B, V, batch):
        state["B"], state["V"] = B, V
        losses = functional_call(wrapper, consts, (batch,))
        if losses.dim() != 1:
            raise ValueError(f"`loss_fn` must return per-example losses of shape (N,), got shape {tuple(losses.shape)}")
        return losses.mean()

    with hooks([(t.module, make_hook(t)) for t in targets]):
        GB = vmap(grad(f_low), in_dims=(None, 0, 0), chunk_size=chunk_size)(Bs, Vs, batches)
    out = {}
    for t in targets:
        gB, V = GB[t.key], Vs[t.key]
        if share_projection:
            out[t.key] = gB @ V.transpose(-1, -2)
        else:  # gB_i = G_i V_i / N, so Σ_i gB_i V_iᵀ is the mean of the lifted per-example estimates
            out[t.key] = torch.einsum("kimr,kinr->kmn", gB, V)
    return finite_or_raise(out)
