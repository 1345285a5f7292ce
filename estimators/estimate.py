r"""One entry point for the IPA, LR and ZO gradient estimators, full-rank and low-rank.

``estimate(model, loss_fn, batch, method=..., projector=..., rank=...)`` returns,
for every targeted ``nn.Linear`` weight ``Θ ∈ R^{m×n}`` of ``model``, an
estimate of ``∇_Θ`` of the mean of the per-example losses
``loss_fn(model, batch)``:

* ``projector=None``: the full-rank base estimator ``G`` (IPA, LR or ZO);
* otherwise the low-rank estimator ``ĝ = G_B Vᵀ`` where ``G_B`` is the
  estimate of the gradient in ``B`` of the reparametrisation ``Θ + B Vᵀ`` at
  ``B = 0`` and ``E[VVᵀ] = cI`` (theory.md §1, §2, §7).  It is computed in
  ``B`` directly (by back-propagation through :mod:`estimators.lowrank` for IPA,
  from the compressed input ``Vᵀx`` for LR, with directions ``Z_B Vᵀ`` for ZO),
  never by projecting a dense gradient after the fact.

``share_projection=True`` is the *dependent* estimator (one ``V`` per layer for
the whole batch); ``False`` draws a fresh ``V_i`` per example (the
*independent* estimator, theory.md §3).

This module also holds the helpers the three methods share.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from theory._checks import check_choice, check_int, check_positive

from ._checks import check_generator
from .lowrank import LowRankLinear, resolve_projector
from .projectors import Projector

__all__ = ["estimate", "METHODS"]

#: The estimation methods of :func:`estimate`.
METHODS = ("ipa", "lr", "zo")


# --------------------------------------------------------------------------- shared helpers
@dataclass
class Target:
    """A targeted weight: its key in the output, the module, and the projection law.

    ``projector`` is ``None`` for the full-rank estimator; ``use_layer_V`` means
    the module is a :class:`LowRankLinear` and the estimate is wanted in its
    ``B`` with its current ``V`` (no lifting).
    """

    key: str
    module: nn.Module
    projector: Projector | None = None
    use_layer_V: bool = False

    @property
    def n(self) -> int:
        return self.module.in_features

    @property
    def m(self) -> int:
        return self.module.out_features


def fresh_generator(device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.seed()
    return g


def _param_predicate(params, model):
    if params is None:
        return lambda name, mod: True
    if isinstance(params, str):
        params = [params]
    if callable(params):
        return params
    try:
        names = list(params)
    except TypeError as exc:
        raise TypeError(
            "`params` must be None, an iterable of module or weight names, or a predicate (name, module) -> bool, "
            f"got {type(params).__name__}"
        ) from exc
    wanted = set()
    for p in names:
        if not isinstance(p, str):
            raise TypeError(f"`params` must hold module or weight names (str), got {p!r}")
        wanted.add(p[: -len(".weight")] if p.endswith(".weight") else ("" if p == "weight" else p))
    known = {name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    missing = sorted(w for w in wanted if w not in known)
    if missing:
        raise ValueError(f"`params` names no nn.Linear layer of the model: {missing}; its nn.Linear layers: {sorted(known)}")
    return lambda name, mod: name in wanted


def resolve_targets(model, params, projector, rank, c) -> list[Target]:
    """The targeted ``nn.Linear`` layers of ``model`` with their projectors (``None`` = full rank)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    c = check_positive(c, "c")
    if projector is None and rank is not None:
        raise ValueError(
            f"`rank` was given (rank={rank}) but `projector` is None (the full-rank estimator); "
            "pass a projector, e.g. projector='haar'"
        )
    pred = _param_predicate(params, model)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and pred(name, mod)]
    if not found:
        hint = ""
        if any(isinstance(mod, LowRankLinear) for mod in model.modules()):
            hint = " (its LowRankLinear layers: use ipa_grad_B, lr_grad_B or zo_grad_B for estimates in B)"
        raise ValueError(
            "`model` has no targeted nn.Linear layer"
            + ("" if params is None else f" (params={params!r})")
            + "; the estimators act on nn.Linear weights" + hint
        )
    targets = []
    for name, mod in found:
        key = f"{name}.weight" if name else "weight"
        P = None
        if projector is not None:
            if rank is not None and isinstance(rank, int) and not isinstance(rank, bool) and rank > mod.in_features:
                raise ValueError(
                    f"`rank` must satisfy 1 <= rank <= n for every targeted layer, got rank={rank} "
                    f"and layer {name!r} with n={mod.in_features}"
                )
            P = resolve_projector(projector, mod.in_features, rank, c=c)
        targets.append(Target(key, mod, P))
    return targets


def lowrank_targets(model, params=None) -> list[Target]:
    """The :class:`LowRankLinear` layers of a converted model (keyed by module name)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if params is None:
        pred = lambda name, mod: True  # noqa: E731
    elif callable(params):
        pred = params
    else:
        wanted = {params} if isinstance(params, str) else set(params)
        pred = lambda name, mod: name in wanted  # noqa: E731
    found = [Target(name, mod, None, True) for name, mod in model.named_modules()
             if isinstance(mod, LowRankLinear) and pred(name, mod)]
    if not found:
        raise ValueError("`model` has no (targeted) LowRankLinear layer; convert it with estimators.lowrank.convert")
    return found


def draw_V(target: Target, N, generator, like: torch.Tensor) -> torch.Tensor:
    """``V`` of shape ``(n, r)`` (``N is None``) or ``(N, n, r)`` on ``like``'s device and dtype."""
    shape = () if N is None else (N,)
    dev = like.device if generator is None else None
    V = target.projector.sample(batch_shape=shape, generator=generator, device=dev, dtype=like.dtype)
    return V.to(like.device)


def check_losses(losses, *, what="loss_fn(model, batch)") -> torch.Tensor:
    """Per-example losses: a finite 1-D tensor of length ``N >= 1``."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"`{what}` must return a tensor of per-example losses, got {type(losses).__name__}")
    if losses.dim() == 0:
        raise ValueError(
            f"`{what}` must return per-example losses of shape (N,), got a scalar; "
            "return the vector of losses (e.g. reduction='none'), not their mean"
        )
    if losses.dim() != 1 or losses.shape[0] == 0:
        raise ValueError(f"`{what}` must return per-example losses of shape (N,), got shape {tuple(losses.shape)}")
    if not torch.is_floating_point(losses):
        raise TypeError(f"`{what}` must return floating-point losses, got dtype={losses.dtype}")
    if not bool(torch.isfinite(losses).all()):
        bad = int((~torch.isfinite(losses)).sum())
        raise ValueError(f"`{what}` returned {bad} non-finite loss(es) (NaN or Inf) out of {losses.shape[0]}")
    return losses


def check_batch_dim(target: Target, x: torch.Tensor, N: int) -> None:
    if x.dim() < 2 or x.shape[0] != N:
        raise ValueError(
            f"per-example estimation needs the batch as the leading dimension of every targeted layer's input; "
            f"layer {target.key!r} got input shape {tuple(x.shape)} but there are N={N} losses"
        )


def finite_or_raise(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for k, v in out.items():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"the gradient estimate of {k!r} contains NaN or Inf")
    return out


@contextlib.contextmanager
def hooks(modules_and_fns):
    """Register forward hooks ``(module, fn)`` for the duration of the block."""
    handles = [mod.register_forward_hook(fn) for mod, fn in modules_and_fns]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def call_loss(loss_fn, model, batch) -> torch.Tensor:
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable (model, batch) -> per-example losses, got {type(loss_fn).__name__}")
    return check_losses(loss_fn(model, batch))


def lift(G_B: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``G_B Vᵀ`` for shared ``V (n, r)``/``G_B (m, r)``, or ``mean_i G_B,i V_iᵀ`` for per-example ones."""
    if V.dim() == 2:
        return G_B @ V.T
    return torch.einsum("imr,inr->mn", G_B, V) / V.shape[0]


# --------------------------------------------------------------------------- entry point
def estimate(model, loss_fn, batch, *, method="ipa", projector=None, rank=None, c=1.0,
             share_projection=True, params=None, generator=None, **method_options) -> dict[str, torch.Tensor]:
    r"""Estimate the gradient of the mean per-example loss for the ``nn.Linear`` weights of a model.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model; its ``nn.Linear`` layers are the targets.  Its
        parameters are left as they were (``requires_grad`` flags and ``.grad``
        are restored/untouched) and no hook or module swap survives the call.
    loss_fn : callable
        ``loss_fn(model, batch) -> Tensor`` of shape ``(N,)``: the per-example
        losses; the objective is their mean.
    batch : any
        Passed to ``loss_fn`` unchanged.
    method : {"ipa", "lr", "zo"}, default "ipa"
        Back-propagation; the likelihood-ratio (score-function) estimator with
        Gaussian noise in each targeted layer's output; zeroth order with
        Gaussian perturbations of the targeted weights.
    projector : None, str or callable, default None
        ``None``: the full-rank estimator.  A family name (``"haar"``,
        ``"coordinate"``, ``"coordinate_replace"``, ``"gaussian"``,
        ``"rademacher"``), or a factory ``n -> Projector`` (so
        ``lambda n: InstanceDependent(S[n], r)`` plugs in), or a
        :class:`~estimators.projectors.Projector` instance (one ``n`` only).
    rank : int, optional
        ``r``; required with a family name, at most every targeted layer's
        input size.
    c : float, default 1.0
        Isotropy constant ``E[VVᵀ] = cI`` for a family name; the estimate then
        has mean ``c ∇`` (unbiased at ``c = 1``).
    share_projection : bool, default True
        ``True``: one ``V`` per layer for the whole batch (the *dependent*
        estimator, as in training); ``False``: a fresh ``V_i`` per example (the
        *independent* one; requires the batch to be the leading dimension of
        each targeted layer's input).  For ZO it also decides whether the
        perturbation direction is shared by the batch or drawn per example.
    params : None, iterable of str, or callable, optional
        Which layers: ``None`` = every ``nn.Linear``; module or weight names
        (``"fc"`` or ``"fc.weight"``); or a predicate ``(name, module) -> bool``.
    generator : torch.Generator, optional
        All randomness (projections, noise, directions); ``None`` uses a fresh
        generator, never the global RNG.
    **method_options
        ``method="lr"``: ``sigma`` (default 0.1), ``antithetic`` (default
        False), ``baseline`` (None, ``"loo"`` or a float; default None); see
        :func:`estimators.lr.lr_estimate`.  ``method="zo"``: ``mu`` (default
        1e-3), ``two_point`` (default True), ``baseline`` (one-point: None,
        ``"clean"`` or a float); see :func:`estimators.zo.zo_estimate`.

    Returns
    -------
    dict[str, Tensor]
        ``{"<module>.weight": estimate}``, each shaped like the weight.

    Raises
    ------
    ValueError
        No targeted ``nn.Linear``; ``loss_fn`` returns a scalar or a tensor of
        the wrong shape; a non-finite loss or estimate; ``rank`` above a
        layer's input size; bad options.
    TypeError
        Wrong argument types.

    Notes
    -----
    For a target ``Θ`` the estimates are (theory.md §7), with
    ``L = (1/N) Σ_i ℓ_i``:

    * IPA: ``G = ∇_Θ L``; low-rank: ``G_B = ∇_B L(Θ + BVᵀ)|_{B=0} = G V``.
    * LR: ``z = Θx + ε``, ``ε ~ N(0, σ²I)``: ``G = (1/N) Σ_i (ℓ_i − b_i) Σ_t ε_{it} x_{it}ᵀ / σ²``;
      low-rank uses ``Vᵀx`` in place of ``x``.
    * ZO: ``G = [L(Θ+μD) − L(Θ−μD)]/(2μ) · D`` with ``D = Z`` or ``Z_B Vᵀ``.

    The low-rank estimate is ``G_B Vᵀ`` (or ``(1/N) Σ_i G_{B,i} V_iᵀ``).

    Examples
    --------
    >>> import torch
    >>> from estimators.models import MLP
    >>> g = torch.Generator().manual_seed(0)
    >>> net = MLP([6, 4, 1], generator=g)                  # net.0 and net.2 are nn.Linear
    >>> X, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
    >>> loss_fn = lambda model, b: 0.5 * ((model(b[0]) - b[1]) ** 2).sum(-1)
    >>> est = estimate(net, loss_fn, (X, y), method="lr", projector="haar", rank=2,
    ...                sigma=0.1, antithetic=True, generator=g)
    >>> sorted(est), est["net.0.weight"].shape
    (['net.0.weight', 'net.2.weight'], torch.Size([4, 6]))
    """
    check_choice(method, "method", METHODS)
    if not isinstance(share_projection, bool):
        raise TypeError(f"`share_projection` must be a bool, got share_projection={share_projection!r}")
    generator = check_generator(generator)
    if rank is not None:
        rank = check_int(rank, "rank", minimum=1)
    targets = resolve_targets(model, params, projector, rank, c)
    if method == "ipa":
        from .ipa import ipa_estimate

        if method_options:
            raise TypeError(f"method='ipa' takes no options, got {sorted(method_options)}")
        return ipa_estimate(model, loss_fn, batch, targets, share_projection=share_projection, generator=generator)
    if method == "lr":
        from .lr import lr_estimate

        return lr_estimate(model, loss_fn, batch, targets, share_projection=share_projection,
                           generator=generator, **method_options)
    from .zo import zo_estimate

    return zo_estimate(model, loss_fn, batch, targets, share_projection=share_projection,
                       generator=generator, **method_options)
