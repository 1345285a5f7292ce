"""The lazy-update optimiser: exact updates, merging, training, checkpoints, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from estimators.lazy import LazyUpdate
from estimators.lowrank import convert, lowrank_layers
from estimators.projectors import Coordinate

DT = torch.float64


def _linear(n, m, g, *, bias=True, dtype=torch.float32, scale=1.0):
    """An nn.Linear filled from `g` (its own initialiser would draw from the global RNG)."""
    lin = nn.Linear(n, m, bias=bias, device="meta").to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * scale)
    return lin


def _quadratic_setup(n=6, m=4, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = _linear(n, m, g, bias=False, dtype=DT)
    layer = convert(lin, rank=r, generator=g)
    return layer, g


def _grad_W(W, X, Y):
    """∇_W of f(W) = ½ mean_i ‖W x_i − y_i‖², by hand: (1/N)(XWᵀ − Y)ᵀ X."""
    return (X @ W.T - Y).T @ X / X.shape[0]


@pytest.mark.parametrize("K", [1, 3])
def test_K_sgd_steps_equal_hand_computed_update(K):
    layer, g = _quadratic_setup()
    eta = 0.3
    opt = LazyUpdate(layer, inner=torch.optim.SGD, inner_kwargs={"lr": eta}, K=K, generator=g)
    data = torch.Generator().manual_seed(1)
    theta = layer.weight.detach().clone()
    for outer in range(2):
        V = layer.V.detach().clone()
        B = torch.zeros(layer.out_features, layer.rank, dtype=DT)
        for k in range(K):
            X = torch.randn(5, 6, generator=data, dtype=DT)
            Y = torch.randn(5, 4, generator=data, dtype=DT)
            # by hand: B ← B − η ∇_W f(Θ + BVᵀ) V
            B = B - eta * _grad_W(theta + B @ V.T, X, Y) @ V
            loss = 0.5 * ((layer(X) - Y) ** 2).sum(1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        theta = theta + B @ V.T  # Θ_{t+1} = Θ_t + B_{t,K} V_tᵀ
        torch.testing.assert_close(layer.weight.detach(), theta, rtol=1e-12, atol=1e-12)
        assert torch.count_nonzero(layer.B) == 0
        assert not torch.equal(layer.V, V)  # a new subspace was drawn
        assert opt.merges == outer + 1 and opt.steps == K * (outer + 1)


def test_merge_keeps_outputs():
    g = torch.Generator().manual_seed(2)
    net = nn.Sequential(_linear(8, 16, g, dtype=DT), nn.Tanh(), _linear(16, 3, g, dtype=DT))
    convert(net, rank=3, generator=g)
    opt = LazyUpdate(net, inner=torch.optim.AdamW, inner_kwargs={"lr": 0.05}, K=100, generator=g)
    x = torch.randn(10, 8, generator=g, dtype=DT)
    for _ in range(3):
        net(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.count_nonzero(layer.B) > 0 for _, layer in lowrank_layers(net))
    with torch.no_grad():
        before = net(x)
        dense = nn.Sequential(*(m.to_linear() if hasattr(m, "to_linear") else m for m in net))(x)
        opt.merge()
        after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense, before, rtol=1e-12, atol=1e-12)
    assert all(torch.count_nonzero(layer.B) == 0 for _, layer in lowrank_layers(net))


def _teacher_task(seed, n_in=12, n_out=3, N=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n_in, generator=g)
    W = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    return X, torch.tanh(X @ W.T) * 2.0


def _student(seed, rank=3, target=None):
    g = torch.Generator().manual_seed(seed)
    torch_net = nn.Sequential(_linear(12, 24, g, scale=0.3), nn.Tanh(), _linear(24, 3, g, scale=0.3))
    return convert(torch_net, rank=rank, generator=g, target=target), g


def _mse(net, X, Y):
    return ((net(X) - Y) ** 2).mean()


@pytest.mark.parametrize("inner,lr", [(torch.optim.SGD, 0.2), (torch.optim.AdamW, 0.02)])
@pytest.mark.parametrize("state", ["reset", "carry"])
def test_ipa_training_loss_falls(inner, lr, state):
    X, Y = _teacher_task(0)
    net, g = _student(1)
    opt = LazyUpdate(net, inner=inner, inner_kwargs={"lr": lr}, K=10, state=state, generator=g)
    with torch.no_grad():
        start = _mse(net, X, Y).item()
    for _ in range(50):
        _mse(net, X, Y).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        end = _mse(net, X, Y).item()
    assert opt.merges == 5
    assert end < 0.5 * start, (start, end)


def test_state_reset_versus_carry():
    for state in ("reset", "carry"):
        net, g = _student(3, target=["0"])  # the last layer stays dense and trainable
        X, Y = _teacher_task(4)
        opt = LazyUpdate(net, inner=torch.optim.AdamW, inner_kwargs={"lr": 0.01}, K=2, state=state, generator=g)
        for _ in range(2):
            _mse(net, X, Y).backward()
            opt.step()
            opt.zero_grad()
        for _, layer in lowrank_layers(net):
            assert (len(opt.inner.state.get(layer.B, {})) == 0) == (state == "reset")
        # the full-rank bias of the last layer keeps its state either way
        assert len(opt.inner.state[net[2].weight]) > 0 and len(opt.inner.state[net[2].bias]) > 0


def test_frozen_bias_and_dense_params_ownership():
    net, g = _student(5)
    opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=2, generator=g)
    owned = {id(p) for group in opt.inner.param_groups for p in group["params"]}
    for _, layer in lowrank_layers(net):
        assert id(layer.B) in owned and id(layer.weight) not in owned


def test_projector_factory_coordinate():
    net, g = _student(6)
    opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=1, generator=g,
                     projector_factory=lambda name, layer: Coordinate(layer.in_features, layer.rank))
    X, Y = _teacher_task(7)
    _mse(net, X, Y).backward()
    opt.step()
    for _, layer in lowrank_layers(net):
        V = layer.V
        scale = (layer.in_features / layer.rank) ** 0.5
        assert torch.count_nonzero(V) == layer.rank
        torch.testing.assert_close(V.abs().max(), torch.tensor(scale, dtype=V.dtype))


def test_seed_storage():
    net, g = _student(8)
    opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.2}, K=4, generator=g, v_storage="seed")
    X, Y = _teacher_task(0)
    for _, layer in lowrank_layers(net):
        assert layer.V.numel() == 0  # nothing stored between steps
    with torch.no_grad():
        start = _mse(net, X, Y).item()
    for _ in range(40):
        _mse(net, X, Y).backward()
        opt.step()
        opt.zero_grad()
        for name, layer in lowrank_layers(net):
            assert layer.V.numel() == 0
    with torch.no_grad():
        end = _mse(net, X, Y).item()
    assert end < 0.5 * start
    V = opt.current_V("0")
    n, r = V.shape
    torch.testing.assert_close(V.T @ V, (n / r) * torch.eye(r), rtol=1e-5, atol=1e-5)
    # the same seed gives the same V
    torch.testing.assert_close(opt.current_V("0"), V, rtol=0, atol=0)
    opt.close()
    torch.testing.assert_close(net[0].V, V, rtol=0, atol=0)


def _train(net, opt, X, Y, steps):
    for _ in range(steps):
        _mse(net, X, Y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("v_storage", ["buffer", "seed"])
@pytest.mark.parametrize("state", ["reset", "carry"])
def test_checkpoint_kill_resume_identical(tmp_path, v_storage, state):
    X, Y = _teacher_task(9)
    kw = dict(inner=torch.optim.AdamW, inner_kwargs={"lr": 0.01}, K=4, state=state, v_storage=v_storage)
    # uninterrupted: 10 steps (two merges, then 2 steps into the third subspace)
    net_a, g_a = _student(10)
    opt_a = LazyUpdate(net_a, generator=g_a, **kw)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a.inner, step_size=3, gamma=0.5)
    for _ in range(10):
        _mse(net_a, X, Y).backward()
        opt_a.step()
        opt_a.zero_grad()
        sched_a.step()
    # interrupted after 6 steps (mid-subspace), checkpointed to disk, everything discarded
    net_b, g_b = _student(10)
    opt_b = LazyUpdate(net_b, generator=g_b, **kw)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b.inner, step_size=3, gamma=0.5)
    for _ in range(6):
        _mse(net_b, X, Y).backward()
        opt_b.step()
        opt_b.zero_grad()
        sched_b.step()
    path = tmp_path / "ck.pt"
    torch.save({"model": net_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, path)
    del net_b, opt_b, sched_b, g_b
    # a fresh process would rebuild from another seed: resume must not depend on it
    net_c, g_c = _student(99)
    opt_c = LazyUpdate(net_c, generator=g_c, **kw)
    sched_c = torch.optim.lr_scheduler.StepLR(opt_c.inner, step_size=3, gamma=0.5)
    ck = torch.load(path, weights_only=True)
    net_c.load_state_dict(ck["model"])
    opt_c.load_state_dict(ck["opt"])
    sched_c.load_state_dict(ck["sched"])
    for _ in range(4):
        _mse(net_c, X, Y).backward()
        opt_c.step()
        opt_c.zero_grad()
        sched_c.step()
    assert opt_c.steps == 10 and opt_c.merges == opt_a.merges == 2
    sa, sc = net_a.state_dict(), net_c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    assert torch.equal(g_a.get_state(), opt_c.generator.get_state())


def test_load_state_dict_mismatch():
    net, g = _student(11)
    opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=4, generator=g)
    sd = opt.state_dict()
    other = LazyUpdate(copy.deepcopy(net), inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=5, generator=g)
    with pytest.raises(ValueError, match="K=4"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict({"inner": sd["inner"]})


def test_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="no low-rank layer"):
        LazyUpdate(nn.Sequential(_linear(4, 2, g)), inner=torch.optim.SGD, inner_kwargs={"lr": 0.1})
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert(nn.Sequential(nn.ReLU()), rank=2)
    net, g = _student(12)
    for K in (0, -3):
        with pytest.raises(ValueError, match="`K` must be >= 1"):
            LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=K)
    with pytest.raises(TypeError, match="`K`"):
        LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=2.5)
    # an inner optimiser holding the frozen Θ, or a tensor outside the model
    frozen = torch.optim.SGD([net[0].weight, net[0].B], lr=0.1)
    with pytest.raises(ValueError, match=r"cannot own: '0.weight' \(frozen"):
        LazyUpdate(net, inner=frozen)
    stranger = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of `model`"):
        LazyUpdate(net, inner=stranger)
    with pytest.raises(ValueError, match="state"):
        LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, state="keep")
    with pytest.raises(ValueError, match="v_storage"):
        LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, v_storage="disk")
    with pytest.raises(TypeError, match="inner"):
        LazyUpdate(net, inner="adam")
    with pytest.raises(TypeError, match="generator"):
        LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, generator=3)
    with pytest.raises(ValueError, match="exclude"):
        LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, exclude=[net[0].B])
    opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1},
                     projector_factory=lambda name, layer: Coordinate(layer.in_features + 1, layer.rank), K=1)
    X, Y = _teacher_task(0)
    _mse(net, X, Y).backward()
    with pytest.raises(ValueError, match="projector_factory"):
        opt.step()


def test_nan_gradient_reported():
    net, g = _student(13)
    opt = LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, K=2, generator=g)
    before = net[0].weight.detach().clone()
    net[0].B.grad = torch.full_like(net[0].B, float("nan"))
    with pytest.raises(FloatingPointError, match="'0'"):
        opt.step()
    assert torch.equal(net[0].weight, before)


def _per_example_mse(m, batch):
    return ((m(batch[0]) - batch[1]) ** 2).mean(1)


@pytest.mark.parametrize("method,opts,inner,lr,target", [
    ("lr", {"sigma": 0.1}, torch.optim.SGD, 0.05, 0.5),
    ("zo", {"mu": 1e-3}, torch.optim.AdamW, 0.02, 0.8),
])
def test_forward_only_training_loss_falls(method, opts, inner, lr, target):
    pytest.importorskip(f"estimators.{method}")  # estimators.lr / estimators.zo (issue 4)
    X, Y = _teacher_task(0)
    net, g = _student(1)
    opt = LazyUpdate(net, inner=inner, inner_kwargs={"lr": lr}, K=10, generator=g)
    with torch.no_grad():
        start = _mse(net, X, Y).item()
    for _ in range(60):
        est = opt.step_estimate(_per_example_mse, (X, Y), method=method, **opts)
    assert set(est) == {"0", "2"} and est["0"].shape == (24, 3)
    assert opt.steps == 60 and opt.merges == 6
    with torch.no_grad():
        end = _mse(net, X, Y).item()
    assert end < target * start, (start, end)
    with pytest.raises(ValueError, match="method"):
        opt.step_estimate(_per_example_mse, (X, Y), method="ipa")


def test_instance_dependent_factory_trains_and_resumes(tmp_path):
    from estimators.instance import InstanceDependent
    from estimators.lazy import InstanceDependentFactory

    X, Y = _teacher_task(14)

    def make():
        net, g = _student(15)
        # floor 0.5: directions with small π have ‖V e‖² = c/π, so a low floor needs a smaller step
        fac = InstanceDependentFactory(window=4, floor=0.5)
        return net, LazyUpdate(net, inner=torch.optim.SGD, inner_kwargs={"lr": 0.05}, K=5, generator=g,
                               projector_factory=fac)

    net_a, opt_a = make()
    with torch.no_grad():
        start = _mse(net_a, X, Y).item()
    _train(net_a, opt_a, X, Y, 20)
    with torch.no_grad():
        end = _mse(net_a, X, Y).item()
    assert end < 0.7 * start
    for _, layer in lowrank_layers(net_a):
        assert isinstance(layer.projector, InstanceDependent)
        assert float(layer.projector.pi.min()) >= 0.5 * layer.rank / layer.in_features - 1e-12
    # checkpoint mid-subspace, resume in fresh objects: identical parameters
    net_b, opt_b = make()
    _train(net_b, opt_b, X, Y, 12)
    path = tmp_path / "ck.pt"
    torch.save({"model": net_b.state_dict(), "opt": opt_b.state_dict()}, path)
    net_c, opt_c = make()
    ck = torch.load(path, weights_only=True)
    net_c.load_state_dict(ck["model"])
    opt_c.load_state_dict(ck["opt"])
    _train(net_c, opt_c, X, Y, 8)
    for k, v in net_a.state_dict().items():
        assert torch.equal(v, net_c.state_dict()[k]), k
    with pytest.raises(ValueError, match="v_storage='seed'"):
        LazyUpdate(net_a, inner=torch.optim.SGD, inner_kwargs={"lr": 0.1}, v_storage="seed",
                   projector_factory=InstanceDependentFactory())
