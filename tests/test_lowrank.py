"""Exact invariants of the low-rank linear layer, its conversion, and its memory saving."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from estimators import HaarStiefel
from estimators.lowrank import (
    LowRankLinear,
    convert,
    lowrank_layers,
    lowrank_linear,
    merge_all,
    resample_all,
)

FAMILIES = ["haar", "coordinate", "coordinate_replace", "gaussian", "rademacher"]


def _linear(n, m, g, dtype=torch.float64, bias=True):
    lin = nn.Linear(n, m, bias=bias, device="meta").to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g, dtype=dtype))
        if bias:
            lin.bias.copy_(torch.randn(m, generator=g, dtype=dtype))
    return lin


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(7,), (3, 5)])  # (N,) or (N, T) leading dims
def test_grad_B_equals_dense_grad_times_V(family, shape):
    g = torch.Generator().manual_seed(1)
    n, m, r = 9, 4, 3
    lin = _linear(n, m, g)
    x = torch.randn(*shape, n, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(*shape, m, generator=g, dtype=torch.float64)
    # dense reference
    y = lin(x)
    loss = ((torch.tanh(y) - target) ** 2).sum()
    G, gx = torch.autograd.grad(loss, (lin.weight, x))
    layer = LowRankLinear.from_linear(lin, r, projector=family, generator=g)
    y2 = layer(x)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-12)  # B = 0: same function
    loss2 = ((torch.tanh(y2) - target) ** 2).sum()
    gB, gx2 = torch.autograd.grad(loss2, (layer.B, x))
    torch.testing.assert_close(gB, G @ layer.V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx2, gx, rtol=1e-12, atol=1e-12)


def test_grad_x_and_B_at_nonzero_B_match_autograd_of_dense_formula():
    g = torch.Generator().manual_seed(2)
    n, m, r = 6, 5, 2
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    V = torch.randn(n, r, generator=g, dtype=torch.float64)
    B = torch.randn(m, r, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, n, generator=g, dtype=torch.float64, requires_grad=True)
    out = lowrank_linear(x, W, None, V, B).sin().sum()
    gB, gx = torch.autograd.grad(out, (B, x))
    ref = (x @ (W + B @ V.T).T).sin().sum()
    rB, rx = torch.autograd.grad(ref, (B, x))
    torch.testing.assert_close(gB, rB)
    torch.testing.assert_close(gx, rx)


def test_per_example_projection_gives_per_example_gradients():
    g = torch.Generator().manual_seed(3)
    N, T, n, m, r = 4, 3, 7, 2, 3
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    V = HaarStiefel(n, r).sample(batch_shape=(N,), generator=g, dtype=torch.float64)
    B = torch.zeros(N, m, r, dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, T, n, generator=g, dtype=torch.float64)
    t = torch.randn(N, T, m, generator=g, dtype=torch.float64)
    losses = ((lowrank_linear(x, W, None, V, B) - t) ** 2).sum(dim=(1, 2))
    (gB,) = torch.autograd.grad(losses.sum(), B)
    for i in range(N):
        Wi = W.clone().requires_grad_()
        (Gi,) = torch.autograd.grad(((x[i] @ Wi.T - t[i]) ** 2).sum(), Wi)
        torch.testing.assert_close(gB[i], Gi @ V[i])


def test_stacked_layers_backprop_through_both():
    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(_linear(6, 5, g), nn.Tanh(), _linear(5, 3, g))
    dense = [p.detach().clone().requires_grad_() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias)]
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)

    def dense_fwd(x):
        return torch.tanh(x @ dense[0].T + dense[1]) @ dense[2].T + dense[3]

    G0, G2 = torch.autograd.grad(dense_fwd(x).pow(2).sum(), (dense[0], dense[2]))
    convert(net, rank=2, generator=g)
    net(x).pow(2).sum().backward()
    torch.testing.assert_close(net[0].B.grad, G0 @ net[0].V)
    torch.testing.assert_close(net[2].B.grad, G2 @ net[2].V)
    assert net[0].weight.grad is None and net[2].weight.grad is None


def test_unfrozen_theta_gets_its_dense_gradient():
    g = torch.Generator().manual_seed(5)
    lin = _linear(5, 3, g)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    W = lin.weight.detach().clone().requires_grad_()
    (G,) = torch.autograd.grad((x @ W.T + lin.bias).pow(2).sum(), W)
    layer = LowRankLinear.from_linear(lin, 2, generator=g)
    layer.weight.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, G)


def test_merge_to_linear_and_resample():
    g = torch.Generator().manual_seed(6)
    layer = LowRankLinear(6, 4, 2, dtype=torch.float64, generator=g)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad and layer.B.requires_grad
    assert torch.count_nonzero(layer.B) == 0
    with torch.no_grad():
        layer.B.copy_(torch.randn(4, 2, generator=g, dtype=torch.float64))
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = layer(x)
    dense = layer.to_linear()
    torch.testing.assert_close(dense(x), y)
    W_expected = layer.weight + layer.B @ layer.V.T
    layer.merge()
    torch.testing.assert_close(layer.weight, W_expected)
    assert torch.count_nonzero(layer.B) == 0
    torch.testing.assert_close(layer(x), y)
    V_old = layer.V.clone()
    layer.resample(generator=g)
    assert not torch.equal(V_old, layer.V)
    torch.testing.assert_close(layer.V.T @ layer.V, 3.0 * torch.eye(2, dtype=torch.float64))  # Haar: VᵀV = (n/r) I
    torch.testing.assert_close(layer(x), y)  # B = 0 after merge: V does not matter


def test_same_generator_same_layer():
    a = LowRankLinear(6, 4, 2, generator=torch.Generator().manual_seed(7))
    b = LowRankLinear(6, 4, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.V, b.V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(dtype):
    g = torch.Generator().manual_seed(8)
    layer = LowRankLinear(6, 4, 2, dtype=dtype, generator=g)
    y = layer(torch.randn(3, 6, generator=g, dtype=dtype))
    y.sum().backward()
    assert y.dtype == dtype and layer.B.grad.dtype == dtype and layer.V.dtype == dtype


def test_convert_targets_and_helpers():
    g = torch.Generator().manual_seed(9)
    net = nn.Sequential(_linear(8, 6, g), nn.ReLU(), nn.Sequential(_linear(6, 4, g), nn.ReLU(), _linear(4, 2, g)))
    convert(net, rank=3, target=lambda name, mod: mod.in_features >= 6, generator=g)
    assert [n for n, _ in lowrank_layers(net)] == ["0", "2.0"]
    assert isinstance(net[2][2], nn.Linear)
    convert(net, rank=2, target=["2.2"], projector="coordinate", generator=g)
    assert [n for n, _ in lowrank_layers(net)] == ["0", "2.0", "2.2"]
    Vs = [l.V.clone() for _, l in lowrank_layers(net)]
    resample_all(net, generator=g)
    assert all(not torch.equal(a, l.V) for a, (_, l) in zip(Vs, lowrank_layers(net)))
    for _, l in lowrank_layers(net):
        with torch.no_grad():
            l.B.fill_(0.1)
    merge_all(net)
    assert all(torch.count_nonzero(l.B) == 0 for _, l in lowrank_layers(net))


def test_convert_projector_factory_and_instance():
    g = torch.Generator().manual_seed(10)
    net = nn.Sequential(_linear(8, 6, g), nn.ReLU(), _linear(6, 2, g))
    convert(net, rank=2, projector=lambda n: HaarStiefel(n, 2, c=0.5), generator=g)
    assert net[0].projector.n == 8 and net[2].projector.n == 6 and net[2].projector.c == 0.5
    single = convert(_linear(5, 3, g), rank=2, projector=HaarStiefel(5, 2), generator=g)
    assert isinstance(single, LowRankLinear)


def test_errors():
    g = torch.Generator().manual_seed(11)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 3, 5, generator=g)
    with pytest.raises(ValueError, match="in_features"):
        convert(nn.Sequential(_linear(4, 3, g)), rank=5)
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert(nn.Sequential(nn.ReLU()), rank=1)
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert(nn.Sequential(_linear(4, 3, g)), rank=1, target=lambda n, m: False)
    with pytest.raises(ValueError, match="does not have"):
        convert(nn.Sequential(_linear(4, 3, g)), rank=1, target=["nope"])
    with pytest.raises(ValueError, match="projector"):
        LowRankLinear(4, 3, 2, projector="sobol", generator=g)
    with pytest.raises(ValueError, match="n=5"):
        LowRankLinear(4, 3, 2, projector=HaarStiefel(5, 2), generator=g)
    with pytest.raises(TypeError, match="projector"):
        LowRankLinear(4, 3, 2, projector=3.0, generator=g)
    with pytest.raises(TypeError, match="generator"):
        LowRankLinear(4, 3, 2, generator=0)
    with pytest.raises(ValueError, match="last dimension"):
        LowRankLinear(4, 3, 2, generator=g)(torch.zeros(2, 5))


# ----------------------------------------------------------------------------- memory
def _saved_activation_bytes(module, x):
    """Bytes saved for backward by ``module(x)``, excluding parameters and buffers (by storage pointer)."""
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return total[0], out


@pytest.mark.parametrize("n,r", [(64, 1), (64, 8), (256, 16), (512, 4)])
def test_saved_for_backward_bytes_at_most_r_over_n(n, r):
    g = torch.Generator().manual_seed(12)
    m, N, T = 32, 4, 16
    dense = _linear(n, m, g, dtype=torch.float32)
    # input requires grad: the layer sits inside a network
    x = torch.randn(N, T, n, generator=g).requires_grad_()
    dense_bytes, _ = _saved_activation_bytes(dense, x)
    layer = LowRankLinear.from_linear(dense, r, generator=g)
    low_bytes, y = _saved_activation_bytes(layer, x)
    assert dense_bytes >= N * T * n * 4  # the dense layer keeps x
    assert low_bytes <= r / n * dense_bytes + 64 * r  # r/n of the dense layer's plus O(r)
    assert low_bytes == N * T * r * 4  # exactly xV
    y.sum().backward()  # and the backward still works
    assert layer.B.grad.shape == (m, r)
