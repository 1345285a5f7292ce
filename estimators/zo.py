r"""Zeroth-order (ZO) gradient estimators with Gaussian directions, full-rank and low-rank.

The targeted weights are perturbed along a Gaussian direction ``D`` and the
gradient of the Gaussian-smoothed objective is estimated from loss values only
(theory.md §7, the paper's Example 2):

* one-point: ``(f(Θ + μD) − b) D / μ``;
* two-point (SPSA, as in MeZO): ``[f(Θ + μD) − f(Θ − μD)] / (2μ) · D``;

with ``D = Z`` (``m×n``, i.i.d. ``N(0, 1)``) for the full-rank estimator and
``D = Z_B Vᵀ`` (``Z_B`` an ``m×r`` Gaussian) for the low-rank one, whose
estimate is formed in ``B`` and lifted by ``Vᵀ``.  The perturbation is applied
through forward hooks, ``y ← y ± μ D x``, so neither the weights nor the model
are modified, and for a low-rank direction only ``(Vᵀx)`` is formed.  For a
quadratic ``f`` the smoothed and true gradients coincide; for a linear ``f``
the two-point difference is exact and ``E‖ĝ‖²`` is
:func:`theory.zo_second_moment`.

:func:`zo_grad_B` returns the estimate in ``B`` for every
:class:`~estimators.lowrank.LowRankLinear` of a converted model.
"""

from __future__ import annotations

import numbers

import torch

from theory._checks import check_positive

from ._checks import check_generator
from .estimate import call_loss, finite_or_raise, fresh_generator, hooks, lift, lowrank_targets
from ._random import draw_normal

__all__ = ["zo_estimate", "zo_grad_B"]


def _check_zo_baseline(baseline, two_point):
    if baseline is None:
        return None
    if two_point:
        raise ValueError("`baseline` applies to the one-point estimator only (two_point=False)")
    if isinstance(baseline, str):
        if baseline != "clean":
            raise ValueError(f"`baseline` must be None, 'clean' or a float, got baseline={baseline!r}")
        return baseline
    if isinstance(baseline, bool) or not isinstance(baseline, numbers.Real):
        raise TypeError(f"`baseline` must be None, 'clean' or a float, got {baseline!r}")
    return float(baseline)


_draw_direction = draw_normal  # module attribute, so tests can substitute a mutant


def _zo_core(model, loss_fn, batch, targets, *, share_projection, generator, mu, two_point, baseline):
    """``{key: G}`` (full rank), ``{key: (G_B, V)}`` (low rank) or ``{key: G_B}`` (layer ``V``)."""
    mu = check_positive(mu, "mu")
    if not isinstance(two_point, bool):
        raise TypeError(f"`two_point` must be a bool, got two_point={two_point!r}")
    baseline = _check_zo_baseline(baseline, two_point)
    generator = check_generator(generator)
    if generator is None:
        generator = fresh_generator(targets[0].module.weight.device)
    per_example = not share_projection
    state = {t.key: {} for t in targets}

    def make_hook(t, sign):
        st = state[t.key]

        def hook(module, inputs, output):
            x = inputs[0]
            if per_example and x.dim() < 2:
                raise ValueError(
                    f"per-example ZO directions need the batch as the leading dimension of every targeted layer's "
                    f"input; layer {t.key!r} got input shape {tuple(x.shape)}"
                )
            N = x.shape[0] if per_example else None
            lead = () if N is None else (N,)
            if "Z" not in st:
                if t.use_layer_V:
                    k = module.rank
                elif t.projector is not None:
                    k = t.projector.r
                    st["V"] = t.projector.sample(batch_shape=lead, generator=generator,
                                                 dtype=output.dtype).to(output.device)
                else:
                    k = t.module.in_features
                st["Z"] = _draw_direction((*lead, t.module.out_features, k), generator, output)
            st.setdefault("inputs", []).append(x.shape)
            Z = st["Z"]
            if t.use_layer_V:
                feat, V = x, module.V
            else:
                feat, V = x, st.get("V")
            if per_example:
                f3 = feat.reshape(feat.shape[0], -1, feat.shape[-1])
                if V is not None:
                    f3 = torch.matmul(f3, V)
                pert = torch.matmul(f3, Z.transpose(-1, -2)).reshape(output.shape)
            else:
                if V is not None:
                    feat = torch.matmul(feat, V)
                pert = torch.matmul(feat, Z.T)
            return output + (sign * mu) * pert

        return hook

    with torch.no_grad():
        with hooks([(t.module, make_hook(t, 1.0)) for t in targets]):
            f_plus = call_loss(loss_fn, model, batch)
        N = f_plus.shape[0]
        if two_point:
            with hooks([(t.module, make_hook(t, -1.0)) for t in targets]):
                f_minus = call_loss(loss_fn, model, batch)
            if f_minus.shape != f_plus.shape:
                raise ValueError("`loss_fn` returned a different number of losses in the two passes")
            d = (f_plus - f_minus) / (2.0 * mu)
        else:
            if baseline == "clean":
                b = call_loss(loss_fn, model, batch)
            else:
                b = 0.0 if baseline is None else baseline
            d = (f_plus - b) / mu
        out = {}
        for t in targets:
            st = state[t.key]
            if "Z" not in st:  # the layer was not used: the estimate is 0
                k = t.module.rank if t.use_layer_V else (t.projector.r if t.projector is not None else t.module.in_features)
                zero = torch.zeros(t.module.out_features, k, dtype=f_plus.dtype, device=f_plus.device)
                if t.projector is not None and not t.use_layer_V:
                    V = t.projector.sample(generator=generator, dtype=zero.dtype).to(zero.device)
                    out[t.key] = (zero, V)
                else:
                    out[t.key] = zero
                continue
            if per_example:
                for shape in st["inputs"]:
                    if shape[0] != N:
                        raise ValueError(
                            f"per-example estimation needs the batch as the leading dimension of every targeted "
                            f"layer's input; layer {t.key!r} got input shape {tuple(shape)} but there are N={N} losses"
                        )
                G = st["Z"] * d.view(N, 1, 1)  # per-example estimates (N, m, ·)
            else:
                G = st["Z"] * d.mean()
            if t.projector is not None and not t.use_layer_V:
                out[t.key] = (G, st["V"])
            else:
                out[t.key] = G.mean(0) if per_example else G
    return out


def zo_estimate(model, loss_fn, batch, targets, *, share_projection=True, generator=None, mu=1e-3,
                two_point=True, baseline=None) -> dict[str, torch.Tensor]:
    r"""ZO estimate for resolved targets (see :func:`estimators.estimate`, ``method="zo"``).

    Parameters
    ----------
    model, loss_fn, batch, targets, generator
        As in :func:`estimators.estimate`.
    share_projection : bool, default True
        ``True``: one direction ``D`` (one ``Z``, one ``V``) per layer for the
        whole batch, as in MeZO; ``False``: a fresh ``D_i`` per example (each
        example's weights perturbed along its own direction).
    mu : float, default 1e-3
        Perturbation scale ``μ``.
    two_point : bool, default True
        Central difference (SPSA); ``False`` for the one-point estimator.
    baseline : None, "clean" or float, default None
        One-point only: subtracted from ``f(Θ + μD)``; ``"clean"`` uses the
        unperturbed loss (the forward difference, one extra pass).

    Returns
    -------
    dict[str, Tensor]

    Notes
    -----
    Shared: ``G = d·D`` with ``d = [L(Θ+μD) − L(Θ−μD)]/(2μ)`` (``L`` the mean
    loss).  Per example: ``G = (1/N) Σ_i d_i D_i``, ``d_i`` from example
    ``i``'s own losses.  Low rank: ``D = Z_B Vᵀ``; ``G_B = d Z_B`` is lifted by
    ``Vᵀ``.
    """
    raw = _zo_core(model, loss_fn, batch, targets, share_projection=share_projection, generator=generator,
                   mu=mu, two_point=two_point, baseline=baseline)
    out = {}
    for t in targets:
        v = raw[t.key]
        out[t.key] = lift(*v) if isinstance(v, tuple) else v
    return finite_or_raise(out)


def zo_grad_B(model, loss_fn, batch, *, mu=1e-3, two_point=True, baseline=None, share_direction=True,
              params=None, generator=None) -> dict[str, torch.Tensor]:
    r"""ZO estimate of the gradient in ``B`` for every low-rank layer of a converted model.

    Each :class:`~estimators.lowrank.LowRankLinear` has its ``B`` perturbed to
    ``B ± μ Z_B`` (applied as ``y ± μ Z_B (Vᵀx)`` through a hook, so nothing is
    modified), with its current ``V``; forward passes only.

    Parameters
    ----------
    model : nn.Module
        Converted with :func:`estimators.lowrank.convert`.
    loss_fn : callable
        ``loss_fn(model, batch) -> (N,)`` per-example losses.
    batch : any
    mu : float, default 1e-3
        Perturbation scale.
    two_point : bool, default True
        ``[L(B+μZ) − L(B−μZ)]/(2μ) · Z`` (two passes) or the one-point
        ``(L(B+μZ) − b)/μ · Z``.
    baseline : None, "clean" or float
        One-point only, see :func:`zo_estimate`.
    share_direction : bool, default True
        One ``Z_B`` per layer for the batch (MeZO) or one per example.
    params : None, iterable of str or callable, optional
        Which low-rank layers; default all.
    generator : torch.Generator, optional

    Returns
    -------
    dict[str, Tensor]
        ``{module_name: G_B}`` of shape ``(out, rank)``, an unbiased estimate
        of the Gaussian-smoothed gradient in ``B``.

    Examples
    --------
    >>> import torch
    >>> from estimators.lowrank import convert
    >>> from estimators.models import LinearModel
    >>> g = torch.Generator().manual_seed(0)
    >>> net = convert(LinearModel(6, 3, generator=g), rank=2, generator=g)   # layer "fc"
    >>> X = torch.randn(5, 6, generator=g)
    >>> zo_grad_B(net, lambda m, b: m(b).pow(2).sum(-1), X, mu=1e-3, generator=g)["fc"].shape
    torch.Size([3, 2])
    """
    if not isinstance(share_direction, bool):
        raise TypeError(f"`share_direction` must be a bool, got share_direction={share_direction!r}")
    targets = lowrank_targets(model, params)
    raw = _zo_core(model, loss_fn, batch, targets, share_projection=share_direction, generator=generator,
                   mu=mu, two_point=two_point, baseline=baseline)
    return finite_or_raise(raw)
