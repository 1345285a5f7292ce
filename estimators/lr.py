r"""The likelihood-ratio (score-function) estimator with noise in layer outputs, full-rank and low-rank.

Gaussian noise ``ε ~ N(0, σ² I_m)`` is injected into the output of every
targeted linear layer, ``z = Θx + ε`` (per token), and the gradient of the
smoothed objective ``F_σ(Θ) = E L(Θx + ε)`` is estimated from forward passes
only (theory.md §7; the approach of Peng and coauthors to training without
back-propagation):

.. math::  ∇F_σ = E[(L − b)\, (ε/σ²)\, xᵀ].

The low-rank version perturbs ``z = Θx + B(Vᵀx) + ε`` and forms
``G_B = (L − b)(ε/σ²)(Vᵀx)ᵀ``: only the compressed input ``Vᵀx`` (``r`` numbers
per token) is kept.  A baseline ``b`` independent of the example's own noise
(a constant, or the leave-one-out mean of the other examples' losses) and
antithetic pairs ``±ε`` keep the estimator unbiased and reduce its variance.
For a quadratic loss of a linear layer ``F_σ`` and ``F`` have the same
gradient.

:func:`lr_grad_B` returns the estimate in ``B`` for every
:class:`~estimators.lowrank.LowRankLinear` of a converted model (forward-only
training).
"""

from __future__ import annotations

import numbers

import torch

from theory._checks import check_positive

from ._checks import check_generator
from .estimate import call_loss, check_batch_dim, finite_or_raise, fresh_generator, hooks, lift, lowrank_targets
from ._random import draw_normal

__all__ = ["lr_estimate", "lr_grad_B"]


def _check_baseline(baseline, allowed):
    if baseline is None:
        return None
    if isinstance(baseline, str):
        if baseline not in allowed:
            raise ValueError(f"`baseline` must be None, a float or one of {list(allowed)}, got baseline={baseline!r}")
        return baseline
    if isinstance(baseline, bool) or not isinstance(baseline, numbers.Real):
        raise TypeError(f"`baseline` must be None, a float or one of {list(allowed)}, got {baseline!r}")
    return float(baseline)


def _weights(losses, baseline):
    """``ℓ_i − b_i`` with ``b_i`` independent of example ``i``'s own noise."""
    if baseline is None:
        return losses
    if baseline == "loo":
        N = losses.shape[0]
        if N < 2:
            raise ValueError("baseline='loo' (leave-one-out mean) needs at least 2 examples in the batch")
        return losses - (losses.sum() - losses) / (N - 1)
    return losses - baseline


_draw_normal = draw_normal  # module attribute, so tests can substitute a mutant


def _lr_core(model, loss_fn, batch, targets, *, share_projection, generator, sigma, antithetic, baseline):
    """Return ``{key: G}`` (full rank), ``{key: (G_B, V)}`` (low rank) or ``{key: G_B}`` (layer ``V``)."""
    sigma = check_positive(sigma, "sigma")
    if not isinstance(antithetic, bool):
        raise TypeError(f"`antithetic` must be a bool, got antithetic={antithetic!r}")
    baseline = _check_baseline(baseline, ("loo",))
    generator = check_generator(generator)
    if generator is None:
        generator = fresh_generator(targets[0].module.weight.device)
    state = {t.key: {"eps": [], "V": None, "rec": []} for t in targets}

    def make_hook(t, sign, pass_idx):
        st = state[t.key]

        def hook(module, inputs, output):
            x = inputs[0]
            if x.dim() < 2:
                raise ValueError(
                    f"the LR estimator needs the batch as the leading dimension of every targeted layer's input; "
                    f"layer {t.key!r} got input shape {tuple(x.shape)}"
                )
            call = len(st["rec"][pass_idx])
            if pass_idx == 0:
                st["eps"].append(_draw_normal(output.shape, generator, output).mul_(sigma))
            eps = st["eps"][call]
            if eps.shape != output.shape:
                raise ValueError(f"layer {t.key!r}: output shape changed between the antithetic passes")
            N = x.shape[0]
            x3 = x.reshape(N, -1, x.shape[-1])
            if t.use_layer_V:
                feat = torch.matmul(x3, module.V)
            elif t.projector is not None:
                if st["V"] is None:
                    shape = () if share_projection else (N,)
                    st["V"] = t.projector.sample(batch_shape=shape, generator=generator,
                                                 dtype=output.dtype).to(output.device)
                feat = torch.matmul(x3, st["V"])
            else:
                feat = x3
            st["rec"][pass_idx].append(feat)
            return output + eps if sign > 0 else output - eps

        return hook

    signs = (1, -1) if antithetic else (1,)
    weights = []
    with torch.no_grad():
        for p, s in enumerate(signs):
            for t in targets:
                state[t.key]["rec"].append([])
            with hooks([(t.module, make_hook(t, s, p)) for t in targets]):
                losses = call_loss(loss_fn, model, batch)
            weights.append(s * _weights(losses, baseline))
        N = losses.shape[0]
        out = {}
        for t in targets:
            st = state[t.key]
            acc = None
            for p in range(len(signs)):
                for eps, feat in zip(st["eps"], st["rec"][p]):
                    check_batch_dim(t, feat, N)
                    e3 = eps.reshape(N, -1, eps.shape[-1])
                    per_ex = torch.einsum("itm,itk->imk", e3, feat) * weights[p].view(N, 1, 1)  # (N, m, n|r)
                    acc = per_ex if acc is None else acc + per_ex
            if acc is None:  # the layer was not used in the forward pass
                k = t.module.in_features if (t.projector is None and not t.use_layer_V) else (
                    t.module.rank if t.use_layer_V else t.projector.r)
                acc = torch.zeros(N, t.module.out_features, k, dtype=losses.dtype, device=losses.device)
            acc = acc / (sigma * sigma * len(signs))  # (N, m, ·): per-example estimates
            if t.projector is not None and not t.use_layer_V:
                V = st["V"] if st["V"] is not None else t.projector.sample(
                    batch_shape=() if share_projection else (N,), generator=generator, dtype=acc.dtype).to(acc.device)
                out[t.key] = (acc.mean(0), V) if V.dim() == 2 else (acc, V)
            else:
                out[t.key] = acc.mean(0)
    return out


def lr_estimate(model, loss_fn, batch, targets, *, share_projection=True, generator=None, sigma=0.1,
                antithetic=False, baseline=None) -> dict[str, torch.Tensor]:
    r"""LR estimate for resolved targets (see :func:`estimators.estimate`, ``method="lr"``).

    Parameters
    ----------
    model, loss_fn, batch, targets, share_projection, generator
        As in :func:`estimators.estimate`.
    sigma : float, default 0.1
        Noise scale ``σ`` (``ε ~ N(0, σ²I)`` per token and targeted layer).
    antithetic : bool, default False
        Average the estimates of the noise ``ε`` and ``−ε`` (two forward
        passes).
    baseline : None, "loo" or float, default None
        Subtracted from each example's loss: a constant, or ``"loo"``, the mean
        of the other examples' losses in the batch (independent of the
        example's own noise, hence unbiased; needs ``N >= 2``).

    Returns
    -------
    dict[str, Tensor]
        Estimates of ``∇_Θ F_σ``, shaped like the weights.

    Notes
    -----
    Per example ``i``, pass sign ``s`` and token ``t``:
    ``G = (1/N) Σ_i (1/|S|) Σ_s (ℓ_i^s − b_i^s)(s ε_{it}/σ²) x_{it}^{s\,ᵀ}``,
    ``x`` replaced by ``Vᵀx`` (then lifted by ``Vᵀ``) in the low-rank case.
    """
    raw = _lr_core(model, loss_fn, batch, targets, share_projection=share_projection, generator=generator,
                   sigma=sigma, antithetic=antithetic, baseline=baseline)
    out = {}
    for t in targets:
        v = raw[t.key]
        out[t.key] = lift(*v) if isinstance(v, tuple) else v
    return finite_or_raise(out)


def lr_grad_B(model, loss_fn, batch, *, sigma=0.1, antithetic=True, baseline=None, params=None,
              generator=None) -> dict[str, torch.Tensor]:
    r"""LR estimate of the gradient in ``B`` for every low-rank layer of a converted model.

    Forward passes only: no autograd graph is built (the model may be used
    under ``torch.no_grad()``), and only ``Vᵀx`` is kept per token and layer.

    Parameters
    ----------
    model : nn.Module
        Converted with :func:`estimators.lowrank.convert`; each
        :class:`~estimators.lowrank.LowRankLinear` uses its current ``V`` and
        ``B`` (the estimate is at the current ``B``, not only at ``B = 0``).
        The targeted layers' inputs must have the batch as leading dimension.
    loss_fn : callable
        ``loss_fn(model, batch) -> (N,)`` per-example losses.
    batch : any
    sigma : float, default 0.1
        Scale of the Gaussian noise added to each low-rank layer's output.
    antithetic : bool, default True
        Two passes with ``±ε`` (recommended: it removes the ``L·ε`` noise term).
    baseline : None, "loo" or float, default None
        See :func:`lr_estimate`.
    params : None, iterable of str or callable, optional
        Which low-rank layers (module names or a predicate); default all.
    generator : torch.Generator, optional

    Returns
    -------
    dict[str, Tensor]
        ``{module_name: G_B}`` with ``G_B`` of shape ``(out, rank)``, an
        unbiased estimate of ``∇_B F_σ`` (use it as ``B.grad``).

    Notes
    -----
    ``G_B = (1/N) Σ_i (ℓ_i − b_i) Σ_t (ε_{it}/σ²)(Vᵀx_{it})ᵀ`` (averaged over
    ``±ε`` with signs when antithetic).

    Examples
    --------
    >>> import torch
    >>> from estimators.lowrank import convert
    >>> from estimators.models import LinearModel
    >>> g = torch.Generator().manual_seed(0)
    >>> net = convert(LinearModel(6, 3, generator=g), rank=2, generator=g)   # layer "fc"
    >>> X = torch.randn(5, 6, generator=g)
    >>> lr_grad_B(net, lambda m, b: m(b).pow(2).sum(-1), X, sigma=0.1, generator=g)["fc"].shape
    torch.Size([3, 2])
    """
    targets = lowrank_targets(model, params)
    raw = _lr_core(model, loss_fn, batch, targets, share_projection=True, generator=generator,
                   sigma=sigma, antithetic=antithetic, baseline=baseline)
    return finite_or_raise(raw)
