r"""The lazy-update optimiser: train ``B`` in a fixed random subspace for ``K`` steps, then merge.

For a model converted by :func:`estimators.lowrank.convert` (its
:class:`~estimators.lowrank.LowRankLinear` layers compute
``y = Θx + b + B(Vᵀx)`` with ``Θ`` frozen), :class:`LazyUpdate` runs the scheme
of theory.md §8 (the paper's Figure 1)::

    for t = 0, 1, …:   draw V_t;  B_{t,0} = 0
        for k = 0..K−1:  B_{t,k+1} = inner_step(B_{t,k}, ∇_B f(ξ_{t,k}; Θ_t + B Vᵀ_t))
        Θ_{t+1} = Θ_t + B_{t,K} Vᵀ_t

with any torch optimiser as the inner step (SGD gives exactly the displayed
recursion; AdamW keeps its state in ``m×r``).  The gradient in ``B`` comes from
backpropagation (IPA: ``loss.backward(); opt.step()``) or from forward passes
only (likelihood ratio or zeroth order: :meth:`LazyUpdate.step_estimate`).

References
----------
.. [1] Z. Li et al., "Optimal low-rank stochastic gradient estimation for LLM
   training", arXiv:2603.20632, 2026.
.. [2] Y. Hao, Y. Cao, L. Mou, "Flora: low-rank adapters are secretly gradient
   compressors", ICML 2024 (projections regenerated from a seed).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn

from theory._checks import check_choice, check_int, check_positive

from ._checks import check_generator
from .lowrank import LowRankLinear, lowrank_layers
from .projectors import Projector

__all__ = ["LazyUpdate", "InstanceDependentFactory"]

_STATES = ("reset", "carry")
_V_STORAGE = ("buffer", "seed")
_METHODS = ("lr", "zo")
_SEED_HIGH = 2**62


def _fresh_generator() -> torch.Generator:
    g = torch.Generator()
    g.seed()
    return g


class LazyUpdate:
    r"""Lazy-update training of a converted model: ``K`` inner steps on ``B``, then ``Θ ← Θ + BVᵀ``.

    Parameters
    ----------
    model : nn.Module
        A model converted by :func:`estimators.lowrank.convert` (at least one
        :class:`~estimators.lowrank.LowRankLinear`).  Its other trainable
        parameters (embeddings, norms, heads) are stepped at full rank by the
        inner optimiser too, unless listed in ``exclude``.
    inner : type, callable or torch.optim.Optimizer, default torch.optim.AdamW
        The inner optimiser: a :class:`torch.optim.Optimizer` subclass (or any
        callable ``(params, **inner_kwargs) -> Optimizer``), called with two
        parameter groups (the ``B`` matrices first, then the other trainable
        parameters, when there are any); or an optimiser instance already
        built on (a subset of) those parameters.
    inner_kwargs : dict, optional
        Keyword arguments of ``inner`` (``{"lr": 1e-3}``).
    K : int, default 200
        Inner steps per subspace, ``K >= 1`` (``K = 1``: SGD with the low-rank
        estimator).
    state : {"reset", "carry"}, default "reset"
        What happens to the inner optimiser's state of each ``B`` at a merge:
        ``"reset"`` forgets it (a new subspace starts from a fresh optimiser, as
        the definition above); ``"carry"`` keeps it as is, so that momentum and
        second-moment estimates of the ``m×r`` coordinates go on into the new
        subspace (their meaning changes with ``V``; Flora and GaLore carry
        them).  The state of the other parameters is never touched.
    projector_factory : callable, optional
        ``projector_factory(name, layer) -> Projector`` is called at every
        merge for each low-rank layer and the new ``V`` is drawn from the
        Projector it returns (``n = layer.in_features``, ``r = layer.rank``).
        This is how a per-layer, instance-dependent design built from an
        estimated second moment plugs in (:class:`InstanceDependentFactory`).
        If the factory has a method ``observe(name, layer, grad_B, V)`` it is
        called before every inner step with each layer's gradient in ``B``; if
        it has ``state_dict``/``load_state_dict`` its state is checkpointed
        with the optimiser's.  ``None`` keeps each layer's own
        ``layer.projector``.
    generator : torch.Generator, optional
        Source of every random draw (new ``V``'s and, unless the estimator's
        options say otherwise, the perturbations of :meth:`step_estimate`).
        ``None``: a fresh non-deterministic generator.  Its state is part of
        :meth:`state_dict`.
    v_storage : {"buffer", "seed"}, default "buffer"
        ``"buffer"``: each ``V`` lives in its layer's buffer.  ``"seed"``: only a
        63-bit seed per layer is kept; ``V`` is regenerated from it by a forward
        pre-hook at the first forward pass after a step and dropped at the end of
        :meth:`step` (Flora's trick [2]_), so between steps the projections cost
        no memory and checkpoints hold seeds instead of matrices.  Costs one
        draw (a QR for Haar–Stiefel) per layer and step.  Outside a step,
        ``layer.V`` is then an empty ``(0, r)`` tensor: read :meth:`current_V`.
        Build the optimiser before loading a model checkpoint saved in this mode.
        Not available with a ``projector_factory``.
    exclude : iterable of nn.Parameter, optional
        Trainable parameters the inner optimiser must not own.
    check_finite : bool, default True
        Raise :class:`FloatingPointError` naming the layer when a gradient of a
        ``B`` is NaN or Inf, instead of merging it into ``Θ``.

    Attributes
    ----------
    inner : torch.optim.Optimizer
        The inner optimiser (attach LR schedulers to it).
    K : int
    state_policy : str
        ``"reset"`` or ``"carry"`` (the ``state`` argument).
    steps : int
        Inner steps taken so far.
    merges : int
        Subspaces finished (merges done) so far.

    Raises
    ------
    ValueError
        A model without low-rank layers, ``K < 1``, an unknown option, or an
        inner optimiser holding parameters this optimiser cannot own (frozen
        ``Θ``, ``V``, or tensors outside the model).
    TypeError
        Wrong argument types.

    Notes
    -----
    One call of :meth:`step` is one inner step.  After the ``K``-th inner step of
    a subspace it merges every low-rank layer, ``Θ ← Θ + B Vᵀ``, sets ``B = 0``,
    draws a new ``V`` and resets or carries the inner state of the ``B``'s.
    Memory per ``m×n`` layer: gradient and optimiser state ``m×r`` instead of
    ``m×n``; activations for backward ``r`` numbers per token instead of ``n``;
    ``V`` costs ``n×r`` (``"buffer"``) or a seed (``"seed"``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from estimators.lowrank import convert
    >>> g = torch.Generator().manual_seed(0)
    >>> net = convert(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)), rank=2, target=["0"], generator=g)
    >>> opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=3, generator=g)
    >>> x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    >>> for _ in range(6):
    ...     loss = ((net(x) - y) ** 2).mean()
    ...     loss.backward(); opt.step(); opt.zero_grad()
    >>> opt.steps, opt.merges
    (6, 2)
    """

    def __init__(self, model, *, inner=torch.optim.AdamW, inner_kwargs=None, K=200, state="reset",
                 projector_factory=None, generator=None, v_storage="buffer", exclude=None, check_finite=True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._layers: list[tuple[str, LowRankLinear]] = lowrank_layers(model)
        if not self._layers:
            raise ValueError(
                "`model` has no low-rank layer to train: convert it first, "
                "e.g. estimators.lowrank.convert(model, rank=8)"
            )
        self.K = check_int(K, "K", minimum=1)
        self.state_policy = check_choice(state, "state", _STATES)
        self.v_storage = check_choice(v_storage, "v_storage", _V_STORAGE)
        if projector_factory is not None and not callable(projector_factory):
            raise TypeError(
                "`projector_factory` must be None or a callable (name, layer) -> Projector, "
                f"got {type(projector_factory).__name__}"
            )
        self.projector_factory = projector_factory
        if projector_factory is not None and self.v_storage == "seed":
            raise ValueError(
                "v_storage='seed' regenerates V from a seed and the layer's projector, which a projector_factory "
                "replaces at every merge (and a checkpoint cannot hold): use v_storage='buffer' with a factory"
            )
        generator = check_generator(generator)
        self.generator = generator if generator is not None else _fresh_generator()
        if not isinstance(check_finite, bool):
            raise TypeError(f"`check_finite` must be a bool, got check_finite={check_finite!r}")
        self.check_finite = check_finite

        # ---- the parameters this optimiser may own
        self._B = [layer.B for _, layer in self._layers]
        b_ids = {id(p) for p in self._B}
        excluded = set()
        if exclude is not None:
            try:
                excluded = {id(p) for p in exclude}
            except TypeError as exc:
                raise TypeError(f"`exclude` must be an iterable of parameters, got {type(exclude).__name__}") from exc
            if excluded & b_ids:
                raise ValueError("`exclude` lists the B matrix of a low-rank layer; those are what LazyUpdate trains")
        self._dense = [p for p in model.parameters()
                       if p.requires_grad and id(p) not in b_ids and id(p) not in excluded]
        self.inner = self._build_inner(inner, inner_kwargs)

        self.steps = 0
        self.merges = 0
        self._k = 0
        self._seeds: dict[str, int] = {}
        self._hooks = []
        if self.v_storage == "seed":
            for name, layer in self._layers:
                self._seeds[name] = self._draw_seed()
                self._release(layer)
                self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(name)))

    # ------------------------------------------------------------------ construction helpers
    def _build_inner(self, inner, inner_kwargs) -> torch.optim.Optimizer:
        names = self._param_names()
        if isinstance(inner, torch.optim.Optimizer):
            if inner_kwargs:
                raise ValueError("`inner_kwargs` applies when `inner` is a class; got an optimiser instance and inner_kwargs")
            allowed = {id(p) for p in self._B} | {id(p) for p in self._dense}
            for group in inner.param_groups:
                for p in group["params"]:
                    if id(p) not in allowed:
                        raise ValueError(
                            "the inner optimiser holds a parameter LazyUpdate cannot own: "
                            f"{self._describe(p, names)}; it may hold only the B matrices of the low-rank "
                            "layers and the model's other trainable (non-excluded) parameters"
                        )
            return inner
        if inner_kwargs is None:
            inner_kwargs = {}
        if not isinstance(inner_kwargs, dict):
            raise TypeError(f"`inner_kwargs` must be a dict or None, got {type(inner_kwargs).__name__}")
        if not callable(inner):
            raise TypeError(
                "`inner` must be a torch.optim.Optimizer subclass, a callable (params, **kw) -> Optimizer "
                f"or an Optimizer instance, got {type(inner).__name__}"
            )
        groups = [{"params": list(self._B)}]
        if self._dense:
            groups.append({"params": list(self._dense)})
        opt = inner(groups, **inner_kwargs)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"`inner` must build a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt

    def _param_names(self) -> dict[int, str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        names.update({id(b): f"{n}.V (buffer)" for n, b in self.model.named_buffers()})
        return names

    @staticmethod
    def _describe(p, names) -> str:
        if id(p) in names:
            frozen = "" if getattr(p, "requires_grad", False) else " (frozen: requires_grad=False)"
            return f"{names[id(p)]!r}{frozen}"
        return f"a tensor of shape {tuple(p.shape)} that is not a parameter of `model`"

    def _draw_seed(self) -> int:
        return int(torch.randint(0, _SEED_HIGH, (1,), generator=self.generator,
                                 device=self.generator.device).item())

    # ------------------------------------------------------------------ V storage by seed
    def _projector(self, name, layer) -> Projector:
        if self.projector_factory is None:
            return layer.projector
        P = self.projector_factory(name, layer)
        if not isinstance(P, Projector):
            raise TypeError(f"`projector_factory` must return a Projector, got {type(P).__name__} for layer {name!r}")
        if (P.n, P.r) != (layer.in_features, layer.rank):
            raise ValueError(
                f"`projector_factory` returned n={P.n}, r={P.r} for layer {name!r}, "
                f"which needs n={layer.in_features}, r={layer.rank}"
            )
        return P

    @staticmethod
    def _draw_V(layer, seed) -> torch.Tensor:
        dev = layer.weight.device
        g = torch.Generator(device=dev).manual_seed(seed)
        return layer.projector.sample(generator=g, device=dev, dtype=layer.weight.dtype)

    @staticmethod
    def _release(layer) -> None:
        layer.V = torch.empty(0, layer.rank, device=layer.weight.device, dtype=layer.weight.dtype)

    def _materialise(self, name, layer) -> None:
        if layer.V.numel() == 0:
            layer.V = self._draw_V(layer, self._seeds[name])

    def _pre_hook(self, name):
        def hook(layer, args):
            self._materialise(name, layer)
        return hook

    def current_V(self, name) -> torch.Tensor:
        """The current ``V`` of the low-rank layer ``name`` (regenerated in ``"seed"`` mode)."""
        for n, layer in self._layers:
            if n == name:
                if self.v_storage == "seed":
                    return self._draw_V(layer, self._seeds[name])
                return layer.V
        raise ValueError(f"`name` must be a low-rank layer of the model, got name={name!r}")

    # ------------------------------------------------------------------ optimiser interface
    @property
    def param_groups(self):
        """The inner optimiser's parameter groups."""
        return self.inner.param_groups

    @property
    def state(self):
        """The inner optimiser's per-parameter state (as ``torch.optim.Optimizer.state``)."""
        return self.inner.state

    @property
    def layer_names(self) -> list[str]:
        """Names of the low-rank layers, in module order."""
        return [n for n, _ in self._layers]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter of the inner optimiser."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def _check_grads(self) -> None:
        if not self.check_finite:
            return
        for name, layer in self._layers:
            g = layer.B.grad
            if g is not None and not bool(torch.isfinite(g).all()):
                raise FloatingPointError(
                    f"the gradient of B in low-rank layer {name!r} contains NaN or Inf; nothing was updated"
                )

    def step(self, closure=None):
        """One inner step on the current gradients; merge and redraw after every ``K``-th.

        Parameters
        ----------
        closure : callable, optional
            Passed to the inner optimiser (``LBFGS``-style).

        Returns
        -------
        The inner optimiser's return value (the closure's loss, or ``None``).
        """
        self._check_grads()
        observe = getattr(self.projector_factory, "observe", None)
        if observe is not None:
            for name, layer in self._layers:
                if layer.B.grad is not None:
                    observe(name, layer, layer.B.grad, layer.V)
        out = self.inner.step() if closure is None else self.inner.step(closure)
        self.steps += 1
        self._k += 1
        if self._k >= self.K:
            self.refresh()
        if self.v_storage == "seed":
            for _, layer in self._layers:
                self._release(layer)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """``Θ ← Θ + B Vᵀ`` and ``B ← 0`` in every low-rank layer, keeping ``V``.

        The model's function is unchanged; use it before exporting the model (or
        call :meth:`refresh` to start a new subspace as well).
        """
        for name, layer in self._layers:
            if self.v_storage == "seed":
                layer.weight.add_(layer.B @ self._draw_V(layer, self._seeds[name]).T)
                layer.B.zero_()
            else:
                layer.merge()

    @torch.no_grad()
    def refresh(self) -> None:
        """End the current subspace now: merge, draw new ``V``'s, reset or carry the inner state."""
        self.merge()
        for name, layer in self._layers:
            layer.projector = self._projector(name, layer)
            if self.v_storage == "seed":
                self._seeds[name] = self._draw_seed()
            else:
                layer.resample(generator=self.generator)
            if self.state_policy == "reset":
                self.inner.state.pop(layer.B, None)
        self._k = 0
        self.merges += 1

    def step_estimate(self, loss_fn, batch, *, method="zo", **options):
        """One inner step with a forward-only estimate of ``∇_B`` (likelihood ratio or zeroth order).

        Parameters
        ----------
        loss_fn : callable
            ``loss_fn(model, batch) -> Tensor (N,)`` of per-example losses.
        batch
            Passed to ``loss_fn``.
        method : {"lr", "zo"}, default "zo"
            ``"lr"``: :func:`estimators.lr.lr_grad_B` (noise ``N(0, σ²)`` on
            every low-rank layer's output); ``"zo"``:
            :func:`estimators.zo.zo_grad_B` (perturbations ``B ± μ Z_B``, i.e.
            ``Θ ± μ Z_B Vᵀ``).
        **options
            Passed to the estimator (``sigma``, ``antithetic``, ``baseline`` for
            LR; ``mu``, ``two_point`` for ZO).  ``generator`` defaults to this
            optimiser's generator.

        Returns
        -------
        dict of str to Tensor
            The estimates of ``∇_B`` used, per low-rank layer (``(out, rank)``).

        Notes
        -----
        Only the ``B`` matrices receive a gradient; the model's other trainable
        parameters get none from a forward-only estimate and are left unchanged
        by this step (optimisers skip parameters whose ``.grad`` is ``None``).
        """
        check_choice(method, "method", _METHODS)
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable (model, batch) -> losses, got {type(loss_fn).__name__}")
        options.setdefault("generator", self.generator)
        fn = _estimator(method)
        with torch.no_grad():
            est = fn(self.model, loss_fn, batch, **options)
        names = set(self.layer_names)
        if set(est) != names:
            raise ValueError(f"the {method} estimator returned layers {sorted(est)}, expected {sorted(names)}")
        self.zero_grad(set_to_none=True)
        for name, layer in self._layers:
            layer.B.grad = est[name].to(dtype=layer.B.dtype, device=layer.B.device)
        self.step()
        return est

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume bit for bit, besides ``model.state_dict()``.

        Holds the inner optimiser's state, the step and merge counters, the
        position inside the current subspace, the generator state and the
        current projections (``V`` per layer, or its seed in ``"seed"`` mode).
        All entries are tensors, numbers, strings and dicts, so that
        ``torch.load(path, weights_only=True)`` reads a checkpoint back.

        Examples
        --------
        >>> import io, torch
        >>> from torch import nn
        >>> from estimators.lowrank import convert
        >>> g = torch.Generator().manual_seed(0)
        >>> net = convert(nn.Linear(4, 2), rank=2, generator=g)
        >>> opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=2, generator=g)
        >>> buf = io.BytesIO(); torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
        >>> _ = buf.seek(0); ck = torch.load(buf, weights_only=True)
        >>> net.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
        <All keys matched successfully>
        """
        out = {
            "inner": self.inner.state_dict(),
            "steps": self.steps,
            "merges": self.merges,
            "k": self._k,
            "K": self.K,
            "state": self.state_policy,
            "v_storage": self.v_storage,
            "generator": self.generator.get_state(),
            "layers": self.layer_names,
        }
        if self.v_storage == "seed":
            out["seeds"] = dict(self._seeds)
        else:
            out["V"] = {name: layer.V.detach().clone() for name, layer in self._layers}
        if hasattr(self.projector_factory, "state_dict"):
            out["factory"] = self.projector_factory.state_dict()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (load the model's own state dict as well)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"`state_dict` must be a dict, got {type(state_dict).__name__}")
        missing = {"inner", "steps", "merges", "k", "K", "state", "v_storage", "generator", "layers"} - set(state_dict)
        if missing:
            raise ValueError(f"`state_dict` lacks the entries {sorted(missing)}")
        if list(state_dict["layers"]) != self.layer_names:
            raise ValueError(
                f"`state_dict` was saved for low-rank layers {list(state_dict['layers'])}, "
                f"this model has {self.layer_names}"
            )
        if state_dict["v_storage"] != self.v_storage:
            raise ValueError(
                f"`state_dict` was saved with v_storage={state_dict['v_storage']!r}, this optimiser uses "
                f"v_storage={self.v_storage!r}"
            )
        if int(state_dict["K"]) != self.K or state_dict["state"] != self.state_policy:
            raise ValueError(
                f"`state_dict` was saved with K={state_dict['K']}, state={state_dict['state']!r}; "
                f"this optimiser has K={self.K}, state={self.state_policy!r}"
            )
        self.inner.load_state_dict(state_dict["inner"])
        if "factory" in state_dict and hasattr(self.projector_factory, "load_state_dict"):
            self.projector_factory.load_state_dict(state_dict["factory"])
        self.steps = int(state_dict["steps"])
        self.merges = int(state_dict["merges"])
        self._k = int(state_dict["k"])
        self.generator.set_state(state_dict["generator"])
        with torch.no_grad():
            if self.v_storage == "seed":
                self._seeds = {name: int(s) for name, s in state_dict["seeds"].items()}
                for _, layer in self._layers:
                    self._release(layer)
            else:
                for name, layer in self._layers:
                    layer.V.copy_(state_dict["V"][name])

    def close(self) -> None:
        """Remove the forward hooks of ``"seed"`` mode and put each current ``V`` back in its buffer."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.v_storage == "seed":
            for name, layer in self._layers:
                layer.V = self._draw_V(layer, self._seeds[name])
            self.v_storage = "buffer"

    def __repr__(self) -> str:
        return (f"LazyUpdate(inner={type(self.inner).__name__}, K={self.K}, state={self.state_policy!r}, "
                f"v_storage={self.v_storage!r}, layers={len(self._layers)}, steps={self.steps})")


class InstanceDependentFactory:
    r"""A ``projector_factory`` drawing each new ``V`` from the instance-dependent optimal design.

    Keeps, per low-rank layer, the last ``window`` lifted gradient estimates
    ``ĝ_k = G_{B,k} V_kᵀ`` (``m×n``) seen by :class:`LazyUpdate`, and at each merge
    builds :meth:`estimators.instance.InstanceDependent.from_gradients` from them
    with a uniform ``floor`` (that class's recommendation for an estimated second
    moment: every direction keeps ``π_i >= floor · r/n``, so ``E[VVᵀ] = cI`` holds
    on the whole space and the estimator stays unbiased).

    Parameters
    ----------
    window : int, default 8
        Number of recent gradients per layer (across subspaces).
    floor : float in (0, 1], default 0.1
        Uniform mixing weight of the inclusion probabilities.
    c : float, default 1.0
        Isotropy constant of the design.

    Notes
    -----
    The estimate of ``S = E[GᵀG]`` is ``Ŝ = window⁻¹ Σ_k ĝ_kᵀ ĝ_k``: each
    ``ĝ_k`` lies in the span of its own ``V_k``, so ``Ŝ`` is built from at most
    ``window·r`` directions and is stale by up to ``window`` steps.  Until a layer
    has an observation its own projector is used.  Memory: ``window·m·n`` numbers
    per layer (as much as ``window`` dense gradients); time: one SVD of a
    ``(window·m)×n`` matrix per layer and merge.  Whether this beats Haar–Stiefel
    on a given model is an empirical question (theory.md §5); it is provided so
    that it can be measured.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from estimators.lowrank import convert
    >>> g = torch.Generator().manual_seed(0)
    >>> net = convert(nn.Linear(6, 2), rank=2, generator=g)
    >>> opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=2, generator=g,
    ...                  projector_factory=InstanceDependentFactory(window=4))
    >>> x = torch.randn(8, 6, generator=g)
    >>> for _ in range(2):
    ...     net(x).pow(2).mean().backward(); opt.step(); opt.zero_grad()
    >>> type(net.projector).__name__
    'InstanceDependent'
    """

    def __init__(self, *, window=8, floor=0.1, c=1.0):
        self.window = check_int(window, "window", minimum=1)
        self.floor = check_positive(floor, "floor")
        if self.floor > 1.0:
            raise ValueError(f"`floor` must be in (0, 1], got floor={floor}")
        self.c = check_positive(c, "c")
        self._grads: dict[str, list[torch.Tensor]] = {}

    def observe(self, name, layer, grad_B, V) -> None:
        """Record the lifted gradient ``grad_B Vᵀ`` of layer ``name``."""
        buf = self._grads.setdefault(name, [])
        buf.append((grad_B.detach() @ V.detach().T).to("cpu", torch.float64))
        del buf[:-self.window]

    def __call__(self, name, layer) -> Projector:
        from .instance import InstanceDependent

        buf = self._grads.get(name)
        if not buf:
            return layer.projector
        return InstanceDependent.from_gradients(torch.stack(buf), layer.rank, c=self.c, floor=self.floor)

    def state_dict(self) -> dict:
        return {"window": self.window, "grads": {k: torch.stack(v) for k, v in self._grads.items() if v}}

    def load_state_dict(self, state_dict) -> None:
        self._grads = {k: list(v.unbind(0)) for k, v in state_dict["grads"].items()}


def _estimator(method) -> Callable:
    if method == "lr":
        from .lr import lr_grad_B

        return lr_grad_B
    from .zo import zo_grad_B

    return zo_grad_B
