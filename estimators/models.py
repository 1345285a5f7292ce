r"""Small models with data whose exact expected gradient is computable.

* :class:`ReLUNet` — the one-layer ReLU network of the paper's Example 1,
  ``x ↦ aᵀ relu(Θx)`` with a fixed head ``a``; per-example gradient
  ``G = (δ ⊙ 1[Θx > 0]) xᵀ`` with ``δ = (ŷ − y) a`` for the squared loss.
* :class:`MLP` — a small multilayer perceptron.
* :class:`LinearModel` — ``x ↦ Θx``; with :func:`squared_loss` the objective is
  quadratic in ``Θ``, so the Gaussian-smoothed gradients targeted by LR and ZO
  equal the true gradient.
* :class:`FinitePopulation` — a finite data set sampled uniformly with
  replacement: the exact expected gradient is the population-mean gradient and
  the exact second moment ``S = E[GᵀG]`` is a population average.
* :class:`GaussianTeacher` — ``x ~ N(0, I)``, ``y = Θ*x + noise`` for
  :class:`LinearModel`: the expected gradient is ``Θ − Θ*`` in closed form.

All constructors take a ``generator`` (never the global RNG).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from theory._checks import check_int, check_positive

from ._checks import check_generator

__all__ = [
    "ReLUNet",
    "MLP",
    "LinearModel",
    "squared_loss",
    "FinitePopulation",
    "GaussianTeacher",
    "example1",
    "linear_regression",
]


def _gen(generator):
    generator = check_generator(generator)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return generator


def _dtype(dtype):
    return torch.get_default_dtype() if dtype is None else dtype


def _init_linear(lin, generator, scale=None):
    with torch.no_grad():
        s = 1.0 / math.sqrt(lin.in_features) if scale is None else scale
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator, dtype=lin.weight.dtype) * s)
        if lin.bias is not None:
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=generator, dtype=lin.bias.dtype) * 0.1)


def _linear(n, m, bias, dtype):
    return nn.Linear(n, m, bias=bias, device="meta", dtype=dtype).to_empty(device="cpu")


class ReLUNet(nn.Module):
    r"""The one-layer ReLU network of Example 1: ``ŷ = aᵀ relu(Θx)``.

    Parameters
    ----------
    n, m : int
        Input size and width (``Θ ∈ R^{m×n}``).
    head : Tensor of shape (m,), optional
        The fixed output weights ``a`` (a buffer); default i.i.d. ``±1/√m``.
    dtype : torch.dtype, optional
    generator : torch.Generator, optional
        ``Θ`` has i.i.d. ``N(0, 1/n)`` entries.

    Notes
    -----
    For the squared loss ``½(ŷ − y)²`` the per-example gradient is
    ``G = (δ ⊙ 1[Θx > 0]) xᵀ`` with ``δ = (ŷ − y) a`` (:meth:`per_example_grad`).

    Examples
    --------
    >>> import torch
    >>> net = ReLUNet(8, 4, generator=torch.Generator().manual_seed(0))
    >>> net(torch.ones(3, 8)).shape
    torch.Size([3])
    """

    def __init__(self, n, m, *, head=None, dtype=None, generator=None):
        super().__init__()
        n = check_int(n, "n", minimum=1)
        m = check_int(m, "m", minimum=1)
        g = _gen(generator)
        dtype = _dtype(dtype)
        self.fc = _linear(n, m, False, dtype)
        _init_linear(self.fc, g)
        if head is None:
            signs = torch.randint(0, 2, (m,), generator=g).to(dtype) * 2 - 1
            head = signs / math.sqrt(m)
        head = torch.as_tensor(head, dtype=dtype)
        if head.shape != (m,):
            raise ValueError(f"`head` must have shape ({m},), got head.shape={tuple(head.shape)}")
        self.register_buffer("a", head.clone())

    def forward(self, x):
        return torch.relu(self.fc(x)) @ self.a

    def per_example_grad(self, x, y) -> torch.Tensor:
        """Closed-form ``∇_Θ ½(ŷ − y)²`` per example, shape ``(N, m, n)``."""
        with torch.no_grad():
            z = self.fc(x)
            delta = (torch.relu(z) @ self.a - y).unsqueeze(-1) * self.a * (z > 0)
            return delta.unsqueeze(-1) * x.unsqueeze(-2)


class MLP(nn.Module):
    """A multilayer perceptron ``sizes[0] → … → sizes[-1]``.

    Parameters
    ----------
    sizes : sequence of int
        At least two layer sizes.
    activation : {"tanh", "relu", "gelu"}, default "tanh"
    bias : bool, default True
    dtype : torch.dtype, optional
    generator : torch.Generator, optional

    Examples
    --------
    >>> import torch
    >>> MLP([4, 8, 2], generator=torch.Generator().manual_seed(0))(torch.ones(3, 4)).shape
    torch.Size([3, 2])
    """

    _ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}

    def __init__(self, sizes, *, activation="tanh", bias=True, dtype=None, generator=None):
        super().__init__()
        sizes = [check_int(s, "sizes", minimum=1) for s in sizes]
        if len(sizes) < 2:
            raise ValueError(f"`sizes` must hold at least two sizes, got sizes={sizes}")
        if activation not in self._ACTS:
            raise ValueError(f"`activation` must be one of {sorted(self._ACTS)}, got activation={activation!r}")
        g = _gen(generator)
        dtype = _dtype(dtype)
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            lin = _linear(a, b, bias, dtype)
            _init_linear(lin, g)
            layers.append(lin)
            if i < len(sizes) - 2:
                layers.append(self._ACTS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class LinearModel(nn.Module):
    """``x ↦ Θx`` (no bias): with :func:`squared_loss` a quadratic objective in ``Θ``.

    Parameters
    ----------
    n, m : int
    weight : Tensor (m, n), optional
        Initial ``Θ``; default i.i.d. ``N(0, 1/n)``.
    dtype : torch.dtype, optional
    generator : torch.Generator, optional
    """

    def __init__(self, n, m, *, weight=None, dtype=None, generator=None):
        super().__init__()
        n = check_int(n, "n", minimum=1)
        m = check_int(m, "m", minimum=1)
        dtype = _dtype(dtype)
        self.fc = _linear(n, m, False, dtype)
        if weight is None:
            _init_linear(self.fc, _gen(generator))
        else:
            weight = torch.as_tensor(weight, dtype=dtype)
            if weight.shape != (m, n):
                raise ValueError(f"`weight` must have shape ({m}, {n}), got weight.shape={tuple(weight.shape)}")
            with torch.no_grad():
                self.fc.weight.copy_(weight)

    def forward(self, x):
        return self.fc(x)


def squared_loss(model, batch) -> torch.Tensor:
    r"""Per-example ``½‖model(x) − y‖²`` for ``batch = (X, Y)``; shape ``(N,)``.

    Examples
    --------
    >>> import torch
    >>> squared_loss(lambda X: 2 * X, (torch.ones(3, 2), torch.zeros(3, 2)))
    tensor([4., 4., 4.])
    """
    X, Y = batch
    diff = model(X) - Y
    if diff.dim() == 1:
        return 0.5 * diff * diff
    return 0.5 * (diff * diff).reshape(diff.shape[0], -1).sum(1)


class FinitePopulation:
    r"""A finite data set ``{(x_p, y_p)}_{p=1..P}`` sampled uniformly with replacement.

    The objective is the population mean ``F(Θ) = (1/P) Σ_p ℓ(Θ; x_p, y_p)``; a
    batch of ``N`` i.i.d. draws gives an unbiased IPA estimate, and the exact
    expected gradient and second moment are population averages.

    Parameters
    ----------
    X, Y : Tensor
        Leading dimension ``P``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> pop = FinitePopulation(torch.randn(10, 3, generator=g), torch.randn(10, generator=g))
    >>> X, Y = pop.sample(4, generator=g)
    >>> X.shape, pop.sample_batches(5, 4, generator=g)[0].shape
    (torch.Size([4, 3]), torch.Size([5, 4, 3]))
    """

    def __init__(self, X, Y):
        if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
            raise TypeError("`X` and `Y` must be tensors")
        if X.dim() < 1 or Y.dim() < 1 or X.shape[0] != Y.shape[0] or X.shape[0] == 0:
            raise ValueError(f"`X` and `Y` must share a non-empty leading dimension, got {tuple(X.shape)}, {tuple(Y.shape)}")
        self.X, self.Y = X, Y

    def __len__(self):
        return self.X.shape[0]

    @property
    def data(self):
        """The whole population as a batch ``(X, Y)``."""
        return self.X, self.Y

    def sample(self, batch_size, *, generator=None):
        """``N`` i.i.d. uniform draws with replacement, as a batch ``(X, Y)``."""
        N = check_int(batch_size, "batch_size", minimum=1)
        idx = torch.randint(len(self), (N,), generator=_gen(generator))
        return self.X[idx], self.Y[idx]

    def sample_batches(self, n_batches, batch_size, *, generator=None):
        """``R`` independent batches stacked: ``(X, Y)`` with leading shape ``(R, N)``."""
        R = check_int(n_batches, "n_batches", minimum=1)
        N = check_int(batch_size, "batch_size", minimum=1)
        idx = torch.randint(len(self), (R, N), generator=_gen(generator))
        return self.X[idx], self.Y[idx]

    def exact_gradient(self, model, loss_fn, *, params=None) -> dict[str, torch.Tensor]:
        """``∇F`` for every targeted ``nn.Linear`` weight: the population-mean gradient."""
        from .estimate import estimate

        return estimate(model, loss_fn, self.data, method="ipa", params=params)

    def per_example_gradients(self, model, loss_fn, *, params=None) -> dict[str, torch.Tensor]:
        """``G_p`` for every member of the population: ``{key: (P, m, n)}``."""
        from .ipa import ipa_replications

        batches = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(1), self.data)
        return ipa_replications(model, loss_fn, batches, params=params)

    def second_moment(self, model, loss_fn, key) -> torch.Tensor:
        """``S = E[GᵀG] = (1/P) Σ_p G_pᵀ G_p`` (``n×n``) for the weight ``key``."""
        G = self.per_example_gradients(model, loss_fn)[key]
        return torch.einsum("pmi,pmj->ij", G, G) / G.shape[0]


class GaussianTeacher:
    r"""``x ~ N(0, I_n)``, ``y = Θ* x + s·ξ`` with ``ξ ~ N(0, I_m)``, for :class:`LinearModel`.

    With :func:`squared_loss`, ``E ∇_Θ ½‖Θx − y‖² = (Θ − Θ*) E[xxᵀ] = Θ − Θ*``.

    Parameters
    ----------
    teacher : Tensor (m, n)
        ``Θ*``.
    noise_std : float, default 0.0
    """

    def __init__(self, teacher, *, noise_std=0.0):
        if not isinstance(teacher, torch.Tensor) or teacher.dim() != 2:
            raise TypeError("`teacher` must be a 2-D tensor")
        self.teacher = teacher
        self.noise_std = check_positive(noise_std, "noise_std", allow_zero=True)

    def sample(self, batch_size, *, generator=None):
        N = check_int(batch_size, "batch_size", minimum=1)
        g = _gen(generator)
        m, n = self.teacher.shape
        X = torch.randn(N, n, generator=g, dtype=self.teacher.dtype)
        Y = X @ self.teacher.T + self.noise_std * torch.randn(N, m, generator=g, dtype=self.teacher.dtype)
        return X, Y

    def exact_gradient(self, model) -> dict[str, torch.Tensor]:
        """``{"fc.weight": Θ − Θ*}`` for a :class:`LinearModel` with :func:`squared_loss`."""
        if not isinstance(model, LinearModel):
            raise TypeError(f"`model` must be a LinearModel, got {type(model).__name__}")
        return {"fc.weight": (model.fc.weight - self.teacher).detach().clone()}


def example1(n=256, m=64, *, population=512, noise_std=0.1, dtype=None, generator=None):
    """Example 1: a :class:`ReLUNet` and a :class:`FinitePopulation` labelled by a teacher ReLU net.

    Parameters
    ----------
    n, m : int
        Input size and width.
    population : int, default 512
        ``P``.
    noise_std : float, default 0.1
        Label noise.
    dtype : torch.dtype, optional
    generator : torch.Generator, optional

    Returns
    -------
    (ReLUNet, FinitePopulation)
        Use with :func:`squared_loss`.
    """
    g = _gen(generator)
    P = check_int(population, "population", minimum=1)
    dtype = _dtype(dtype)
    model = ReLUNet(n, m, dtype=dtype, generator=g)
    teacher = ReLUNet(n, m, head=model.a, dtype=dtype, generator=g)
    X = torch.randn(P, n, generator=g, dtype=dtype)
    with torch.no_grad():
        Y = teacher(X) + check_positive(noise_std, "noise_std", allow_zero=True) * torch.randn(P, generator=g, dtype=dtype)
    return model, FinitePopulation(X, Y)


def linear_regression(n, m, *, population=64, noise_std=0.1, dtype=None, generator=None):
    """A :class:`LinearModel` and a :class:`FinitePopulation` labelled by a linear teacher.

    Returns
    -------
    (LinearModel, FinitePopulation)
        Use with :func:`squared_loss` (a quadratic objective).
    """
    g = _gen(generator)
    P = check_int(population, "population", minimum=1)
    dtype = _dtype(dtype)
    model = LinearModel(n, m, dtype=dtype, generator=g)
    teacher = torch.randn(m, n, generator=g, dtype=dtype) / math.sqrt(n)
    X = torch.randn(P, n, generator=g, dtype=dtype)
    Y = X @ teacher.T + check_positive(noise_std, "noise_std", allow_zero=True) * torch.randn(P, m, generator=g, dtype=dtype)
    return model, FinitePopulation(X, Y)
