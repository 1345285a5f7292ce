"""Shared pieces of the estimator tests: the fixed-subspace mutant, the one-thread
fixture, and the linear-regression problem with its exact gradient."""

from __future__ import annotations

import pytest
import torch

from estimators import Projector
from estimators.estimate import estimate
from estimators.models import linear_regression, squared_loss


class FixedSubspace(Projector):
    """MUTANT: always the first r coordinates scaled by √(cn/r), so E[VVᵀ] ≠ cI (a frozen subspace)."""

    family = None

    def _sample(self, batch_shape, generator, device, dtype):
        V = torch.zeros(*batch_shape, self.n, self.r, device=device, dtype=dtype)
        idx = torch.arange(self.r, device=device)
        V[..., idx, idx] = (self.c * self.n / self.r) ** 0.5
        return V


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny LAPACK calls (QR of 5×2) are ~100× slower with 2 threads on a shared machine; results do not change
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def linear():
    """Linear model with quadratic loss on a finite population: (model, population, exact gradient)."""
    model, pop = linear_regression(5, 3, population=10, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    truth = pop.exact_gradient(model, squared_loss)["fc.weight"]
    return model, pop, truth


def replications(linear, gen, R, *, method, n_batch, rank, projector=None, share=True, **opts):
    """``R`` independent estimates of the weight gradient of ``linear``'s model."""
    model, pop, _ = linear
    rank = rank if isinstance(projector, str) else None
    return torch.stack([
        estimate(model, squared_loss, pop.sample(n_batch, generator=gen), method=method, projector=projector,
                 rank=rank, share_projection=share, generator=gen, **opts)["fc.weight"]
        for _ in range(R)
    ])
