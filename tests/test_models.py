"""Models and data generators with exact expected gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import ALPHA
from estimators.estimate import estimate
from estimators.models import (
    MLP,
    FinitePopulation,
    GaussianTeacher,
    LinearModel,
    ReLUNet,
    example1,
    linear_regression,
    squared_loss,
)
from theory.testing import unbiasedness_test


def test_relunet_forward_and_closed_form_gradient():
    g = torch.Generator().manual_seed(0)
    net = ReLUNet(6, 5, dtype=torch.float64, generator=g)
    X, y = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(net(X), torch.relu(X @ net.fc.weight.T) @ net.a)
    G = net.per_example_grad(X, y)
    for i in range(7):
        (Gi,) = torch.autograd.grad(squared_loss(net, (X[i:i + 1], y[i:i + 1])).sum(), net.fc.weight)
        torch.testing.assert_close(G[i], Gi)
    assert not net.a.requires_grad and [n for n, _ in net.named_parameters()] == ["fc.weight"]


def test_builders_reproducible_and_dtypes():
    a, pa = example1(8, 4, population=16, generator=torch.Generator().manual_seed(1))
    b, pb = example1(8, 4, population=16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.fc.weight, b.fc.weight) and torch.equal(pa.X, pb.X) and torch.equal(pa.Y, pb.Y)
    for dtype in (torch.float32, torch.float64):
        m, p = linear_regression(5, 3, population=8, dtype=dtype, generator=torch.Generator().manual_seed(2))
        assert m.fc.weight.dtype == dtype and p.X.dtype == dtype and squared_loss(m, p.data).shape == (8,)
    mlp = MLP([4, 8, 3], activation="relu", dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert mlp(torch.zeros(2, 4, dtype=torch.float64)).shape == (2, 3)


def test_finite_population_exact_quantities():
    g = torch.Generator().manual_seed(4)
    model, pop = linear_regression(4, 2, population=5, dtype=torch.float64, generator=g)
    X, Y = pop.data
    truth = pop.exact_gradient(model, squared_loss)["fc.weight"]
    torch.testing.assert_close(truth, (X @ model.fc.weight.T - Y).T @ X / 5)  # (ΘX − Y)ᵀX / P
    G = pop.per_example_gradients(model, squared_loss)["fc.weight"]
    S = pop.second_moment(model, squared_loss, "fc.weight")
    torch.testing.assert_close(S, sum(G[i].T @ G[i] for i in range(5)) / 5)
    Xb, Yb = pop.sample(7, generator=g)
    assert Xb.shape == (7, 4) and Yb.shape == (7, 2)
    Xs, Ys = pop.sample_batches(3, 7, generator=g)
    assert Xs.shape == (3, 7, 4) and Ys.shape == (3, 7, 2)


def test_teacher_gradient_is_unbiased_target(gen):
    g = torch.Generator().manual_seed(5)
    model = LinearModel(4, 2, dtype=torch.float64, generator=g)
    teacher = GaussianTeacher(torch.randn(2, 4, generator=g, dtype=torch.float64), noise_std=0.3)
    truth = teacher.exact_gradient(model)["fc.weight"]
    est = torch.stack([estimate(model, squared_loss, teacher.sample(8, generator=gen))["fc.weight"] for _ in range(1000)])
    assert unbiasedness_test(est, truth).pvalue > ALPHA
    # power: MUTANT "teacher gradient without subtracting Θ*" (i.e. Θ alone)
    assert unbiasedness_test(est, model.fc.weight.detach()).pvalue < ALPHA


def test_model_errors():
    with pytest.raises(ValueError, match="sizes"):
        MLP([4])
    with pytest.raises(ValueError, match="activation"):
        MLP([4, 2], activation="swish")
    with pytest.raises(ValueError, match="head"):
        ReLUNet(4, 3, head=torch.ones(2))
    with pytest.raises(ValueError, match="weight"):
        LinearModel(4, 3, weight=torch.ones(4, 3))
    with pytest.raises(ValueError, match="leading"):
        FinitePopulation(torch.ones(3, 2), torch.ones(4))
    with pytest.raises(TypeError, match="LinearModel"):
        GaussianTeacher(torch.ones(2, 2)).exact_gradient(MLP([2, 2]))
