"""Clear errors at the boundary of `estimate` and the grad-in-B helpers; state is restored after errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from estimators.estimate import estimate
from estimators.ipa import ipa_grad_B
from estimators.lowrank import convert
from estimators.lr import lr_grad_B
from estimators.models import MLP, squared_loss
from estimators.zo import zo_grad_B

METHODS = ["ipa", "lr", "zo"]


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    net = MLP([5, 4, 2], dtype=torch.float64, generator=g)
    X, Y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    return net, (X, Y), g


@pytest.mark.parametrize("method", METHODS)
def test_no_targeted_linear(method, setup):
    _, batch, g = setup
    model = nn.Sequential(nn.Tanh())
    with pytest.raises(ValueError, match="no targeted nn.Linear"):
        estimate(model, lambda m, b: m(b[0]).sum(-1), batch, method=method, generator=g)
    net = setup[0]
    with pytest.raises(ValueError, match="no targeted nn.Linear"):
        estimate(net, squared_loss, batch, method=method, params=lambda name, mod: False, generator=g)
    with pytest.raises(ValueError, match="params"):
        estimate(net, squared_loss, batch, method=method, params=["nope"], generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_scalar_loss_is_rejected(method, setup):
    net, batch, g = setup
    with pytest.raises(ValueError, match="per-example losses of shape \\(N,\\), got a scalar"):
        estimate(net, lambda m, b: squared_loss(m, b).mean(), batch, method=method, generator=g)
    with pytest.raises(ValueError, match="shape \\(N,\\)"):
        estimate(net, lambda m, b: m(b[0]), batch, method=method, generator=g)  # (N, 2)


@pytest.mark.parametrize("method", METHODS)
def test_rank_above_input_size(method, setup):
    net, batch, g = setup
    with pytest.raises(ValueError, match="rank"):
        estimate(net, squared_loss, batch, method=method, projector="haar", rank=5, generator=g)  # layer net.2 has n=4


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_losses(method, setup):
    net, (X, Y), g = setup
    Y = Y.clone()
    Y[2, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        estimate(net, squared_loss, (X, Y), method=method, generator=g)
    Y[2, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        estimate(net, squared_loss, (X, Y), method=method, projector="haar", rank=2, generator=g)
    # nothing is left behind: no hooks, flags restored
    assert all(not m._forward_hooks for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


def test_option_errors(setup):
    net, batch, g = setup
    with pytest.raises(ValueError, match="method"):
        estimate(net, squared_loss, batch, method="spsa")
    with pytest.raises(ValueError, match="projector"):
        estimate(net, squared_loss, batch, rank=2)
    with pytest.raises(ValueError, match="projector"):
        estimate(net, squared_loss, batch, projector="sobol", rank=2)
    with pytest.raises(ValueError, match="rank"):
        estimate(net, squared_loss, batch, projector="haar")
    with pytest.raises(TypeError, match="share_projection"):
        estimate(net, squared_loss, batch, share_projection=1)
    with pytest.raises(TypeError, match="generator"):
        estimate(net, squared_loss, batch, generator=0)
    with pytest.raises(TypeError, match="options"):
        estimate(net, squared_loss, batch, method="ipa", sigma=0.1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        estimate(net, squared_loss, batch, method="lr", mu=0.1, generator=g)
    with pytest.raises(ValueError, match="sigma"):
        estimate(net, squared_loss, batch, method="lr", sigma=0.0, generator=g)
    with pytest.raises(ValueError, match="mu"):
        estimate(net, squared_loss, batch, method="zo", mu=-1.0, generator=g)
    with pytest.raises(ValueError, match="baseline"):
        estimate(net, squared_loss, batch, method="lr", baseline="mean", generator=g)
    with pytest.raises(ValueError, match="one-point"):
        estimate(net, squared_loss, batch, method="zo", baseline="clean", generator=g)
    with pytest.raises(ValueError, match="at least 2"):
        estimate(net, squared_loss, tuple(t[:1] for t in batch), method="lr", baseline="loo", generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_per_example_needs_batch_leading_dimension(method, setup):
    net, (X, Y), g = setup
    # the model flattens the batch into the feature axis: per-example V cannot be matched to losses
    loss_fn = lambda m, b: squared_loss(m, (b[0].reshape(1, -1)[:, :5].expand(6, 5), b[1]))[:3]  # noqa: E731
    with pytest.raises(ValueError, match="leading dimension"):
        estimate(net, loss_fn, (X, Y), method=method, projector="haar", rank=2, share_projection=False, generator=g)


def test_grad_B_helpers_need_a_converted_model(setup):
    net, batch, g = setup
    for fn, kw in ((ipa_grad_B, {}), (lr_grad_B, {"generator": g}), (zo_grad_B, {"generator": g})):
        with pytest.raises(ValueError, match="LowRankLinear"):
            fn(net, squared_loss, batch, **kw)
    convert(net, rank=2, generator=g)
    with pytest.raises(ValueError, match="scalar"):
        zo_grad_B(net, lambda m, b: squared_loss(m, b).mean(), batch, generator=g)
