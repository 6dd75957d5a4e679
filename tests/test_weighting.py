"""Task-weighting methods, on constant losses and on a tiny real two-task model."""
import io
import math

import pytest
import torch
from torch import nn

from mtl_models.suites.base import Split, TaskSuite
from mtl_models.training.train import TrainOptions, train
from mtl_models.training.weighting import KNOBS, METHODS, UNCERTAINTY_LR, make_weighter
from spaces.errors import PrunefuseError
from spaces.knobs import Knob

TASKS = ["a", "b"]
SPECS = {
    "equal": {"method": "equal"},
    "static": {"method": "static", "weights": {"a": 0.7, "b": 0.3}},
    "uncertainty": {"method": "uncertainty"},
    "dwa": {"method": "dwa", "temperature": 2.0},
    "rlw": {"method": "rlw", "seed": 3},
    "gradnorm": {"method": "gradnorm", "alpha": 1.5},
}


def _spec(name, tasks):
    spec = dict(SPECS[name])
    if name == "static":
        spec["weights"] = {t: i + 1.0 for i, t in enumerate(tasks)}
    return spec


class TwoTask(nn.Module):
    def __init__(self, tasks=TASKS):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})

    def forward(self, x):
        z = self.trunk(x)
        return {t: h(z).squeeze(1) for t, h in self.heads.items()}


def _data(tasks=TASKS, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    return x, {t: torch.randn(32, generator=g) for t in tasks}


def _losses(model, x, y, scale=None):
    out = model(x)
    scale = scale or {}
    return {t: scale.get(t, 1.0) * nn.functional.mse_loss(out[t], y[t]) for t in out}


def _shared(model):
    return list(model.trunk.parameters())


def test_registry_and_knobs():
    assert set(METHODS) == {"equal", "static", "uncertainty", "dwa", "rlw", "gradnorm"}
    assert set(KNOBS) == set(METHODS)
    assert KNOBS["dwa"] == {"temperature": Knob(0.5, 5.0, default=2.0)}
    assert KNOBS["gradnorm"] == {"alpha": Knob(0.0, 3.0, default=1.5)}
    assert KNOBS["uncertainty"] == {"lr": Knob(1e-3, 0.1, log=True, default=UNCERTAINTY_LR)}
    assert all(KNOBS[m] == {} for m in ("equal", "static", "rlw"))


def test_param_lr():
    assert all(make_weighter(_spec(m, TASKS), TASKS).param_lr is None for m in METHODS if m != "uncertainty")
    assert make_weighter({"method": "uncertainty"}, TASKS).param_lr == UNCERTAINTY_LR
    assert make_weighter({"method": "uncertainty", "lr": 0.01}, TASKS).param_lr == 0.01
    assert UNCERTAINTY_LR > 1e-3  # faster than the models' Adam lr: the point of the knob


def test_uncertainty_drives_variance_to_loss():
    w = make_weighter({"method": "uncertainty", "init": "zero"}, TASKS)
    losses = {"a": torch.tensor(4.0, requires_grad=True), "b": torch.tensor(0.25, requires_grad=True)}
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        w.combine(losses).backward()
        opt.step()
    var = torch.exp(w.parameters()[0].detach())
    assert var.tolist() == pytest.approx([4.0, 0.25], rel=0.02)
    # The effective weight 1/(2σ²) is then 1/(2L): the noisier task is down-weighted.
    assert w.weights()["a"] < w.weights()["b"]


def test_uncertainty_first_loss_init():
    losses = {"a": torch.tensor(4.0), "b": torch.tensor(0.25)}
    w = make_weighter({"method": "uncertainty"}, TASKS)
    assert w.init == "first_loss"
    with torch.no_grad():  # outside training (e.g. validation): no init
        w.combine(losses)
    assert w.parameters()[0].tolist() == [0.0, 0.0]
    live = {t: v.clone().requires_grad_() for t, v in losses.items()}
    w.combine(live)
    assert torch.exp(w.parameters()[0].detach()).tolist() == pytest.approx([4.0, 0.25])
    assert w.weights() == pytest.approx({"a": 1 / 8, "b": 2.0})
    w.combine({"a": torch.tensor(9.0, requires_grad=True), "b": torch.tensor(1.0, requires_grad=True)})
    assert torch.exp(w.parameters()[0].detach()).tolist() == pytest.approx([4.0, 0.25])  # only once
    zero = make_weighter({"method": "uncertainty", "init": "zero"}, TASKS)
    zero.combine(live)
    assert zero.parameters()[0].tolist() == [0.0, 0.0]


def test_dwa_weights():
    w = make_weighter({"method": "dwa", "temperature": 2.0}, ["a", "b", "c"])
    assert w.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}
    w.end_epoch({"a": 1.0, "b": 1.0, "c": 1.0})
    assert w.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}  # still epoch 2: one average only
    w.end_epoch({"a": 0.5, "b": 1.0, "c": 1.5})
    w.end_epoch({"a": 0.25, "b": 1.0, "c": 3.0})  # only the last two epochs count
    lam = w.weights()
    assert sum(lam.values()) == pytest.approx(3.0)
    assert lam["a"] < lam["b"] < lam["c"]  # the task whose loss fell least weighs most
    ratio = torch.tensor([0.5, 1.0, 2.0])
    assert list(lam.values()) == pytest.approx((3 * torch.softmax(ratio / 2.0, 0)).tolist())
    L = {t: torch.tensor(2.0) for t in "abc"}
    assert float(w.combine(L)) == pytest.approx(2.0 * 3.0)

    hot = make_weighter({"method": "dwa", "temperature": 1e6}, ["a", "b", "c"])
    for epoch in ({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.1, "b": 1.0, "c": 9.0}):
        hot.end_epoch(epoch)
    assert list(hot.weights().values()) == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)


def test_rlw_simplex_and_seed():
    L = {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(3.0)}

    def run(seed):
        w = make_weighter({"method": "rlw", "seed": seed}, ["a", "b", "c"])
        seq = []
        for _ in range(50):
            total = w.combine(L)
            lam = w.weights()
            assert all(v >= 0 for v in lam.values())
            assert sum(lam.values()) == pytest.approx(1.0)
            assert float(total.detach()) == pytest.approx(sum(lam[t] * float(L[t]) for t in L), rel=1e-5)
            seq.append(list(lam.values()))
        return seq

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert make_weighter({"method": "rlw"}, ["a"]).combine({"a": torch.tensor(5.0)}).item() == 5.0


@pytest.mark.parametrize("name", ["equal", "static", "dwa", "rlw", "gradnorm"])
def test_one_task_reduces_to_its_loss(name):
    torch.manual_seed(0)
    model, (x, y) = TwoTask(["a"]), _data(["a"])
    w = make_weighter(_spec(name, ["a"]), ["a"])
    for _ in range(3):
        losses = _losses(model, x, y)
        total = w.combine(losses, shared_params=_shared(model))
        assert float(total.detach()) == pytest.approx(losses["a"].item(), rel=1e-6)
        w.end_epoch({"a": losses["a"].item()})
    assert w.weights() == pytest.approx({"a": 1.0})


@pytest.mark.parametrize("init", ["zero", "first_loss"])
def test_one_task_uncertainty_keeps_gradient_direction(init):
    # s = 0: the loss is L/2 + 0; s = log L (first_loss): 1/2 + log(L)/2. Not L, but the
    # same descent direction for the model.
    torch.manual_seed(0)
    model, (x, y) = TwoTask(["a"]), _data(["a"])
    w = make_weighter({"method": "uncertainty", "init": init}, ["a"])
    losses = _losses(model, x, y)
    total = w.combine(losses)
    L = losses["a"].item()
    assert float(total.detach()) == pytest.approx(L / 2 if init == "zero" else 0.5 + math.log(L) / 2, rel=1e-6)
    g_total = torch.autograd.grad(total, list(model.parameters()), retain_graph=True)
    g_plain = torch.autograd.grad(losses["a"], list(model.parameters()))
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    assert torch.cosine_similarity(flat(g_total), flat(g_plain), dim=0) == pytest.approx(1.0, abs=1e-6)


def test_gradnorm_on_real_model():
    torch.manual_seed(0)
    model, (x, y) = TwoTask(), _data()
    model_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = make_weighter({"method": "gradnorm", "alpha": 1.5}, TASKS)
    scale = {"b": 10.0}  # b's gradients are 10x larger: GradNorm should shrink its weight
    for _ in range(30):
        before = w.weights()
        model_opt.zero_grad()
        losses = _losses(model, x, y, scale)
        total = w.combine(losses, shared_params=_shared(model))
        # The weight step ran inside combine() and left no gradient on the model.
        assert all(p.grad is None for p in model.parameters())
        assert float(total.detach()) == pytest.approx(sum(before[t] * losses[t].item() for t in TASKS), rel=1e-6)
        total.backward()
        got = [p.grad.clone() for p in model.parameters()]
        # The same loss built by hand, with the weights held fixed, gives the same grads.
        model_opt.zero_grad()
        losses = _losses(model, x, y, scale)
        sum(before[t] * losses[t] for t in TASKS).backward()
        for g, p in zip(got, model.parameters()):
            assert torch.allclose(g, p.grad, atol=1e-6)
        model_opt.step()
        assert sum(w.weights().values()) == pytest.approx(2.0, rel=1e-5)
    lam = w.weights()
    assert lam["a"] > 1.05 and lam["b"] < 0.95


def test_gradnorm_without_grad_only_combines():
    model, (x, y) = TwoTask(), _data()
    w = make_weighter({"method": "gradnorm"}, TASKS)
    with torch.no_grad():
        total = w.combine(_losses(model, x, y), shared_params=_shared(model))
    assert w.weights() == {"a": 1.0, "b": 1.0}
    assert w.state_dict()["initial"] is None
    assert total.ndim == 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_round_trip(name):
    torch.manual_seed(0)
    model, (x, y) = TwoTask(), _data()

    def step(w):
        losses = _losses(model, x, y, {"b": 3.0})
        total = w.combine(losses, shared_params=_shared(model))
        if w.parameters():  # what the loop does with uncertainty's log-variances
            grads = torch.autograd.grad(total, w.parameters(), retain_graph=True)
            with torch.no_grad():
                for p, g in zip(w.parameters(), grads):
                    p -= 0.1 * g
        return float(total.detach())

    first = make_weighter(SPECS[name], TASKS)
    for epoch in range(3):
        step(first)
        first.end_epoch({"a": 1.0 / (epoch + 1), "b": 1.0 + epoch})
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = make_weighter(SPECS[name], TASKS)
    second.load_state_dict(torch.load(buf, weights_only=True))
    assert second.weights() == pytest.approx(first.weights())
    for _ in range(3):  # both continue identically
        assert step(second) == pytest.approx(step(first), rel=1e-6)
        assert second.weights() == pytest.approx(first.weights(), rel=1e-6)


def test_static_normalisation():
    w = make_weighter({"method": "static", "weights": {"left": 0.5, "right": 0.3, "sum": 0.2}},
                      ["left", "right", "sum"])
    assert w.weights() == pytest.approx({"left": 1.5, "right": 0.9, "sum": 0.6})
    L = {"a": torch.tensor(1.5), "b": torch.tensor(0.5)}
    same = make_weighter({"method": "static", "weights": {"a": 2.0, "b": 2.0}}, TASKS)
    assert float(same.combine(L)) == pytest.approx(float(make_weighter({"method": "equal"}, TASKS).combine(L)))
    zero = make_weighter({"method": "static", "weights": {"a": 1.0, "b": 0.0}}, TASKS)
    assert float(zero.combine(L)) == pytest.approx(3.0)


@pytest.mark.parametrize("spec, match", [
    ({"method": "magic"}, "expected one of: dwa, equal, gradnorm, rlw, static, uncertainty"),
    ({}, "needs a 'method'"),
    ({"method": "dwa", "temp": 2.0}, "'temp'.*valid keys: method, temperature"),
    ({"method": "equal", "alpha": 1.0}, "'alpha'.*valid keys: method$"),
    ({"method": "static"}, "needs 'weights'"),
    ({"method": "static", "weights": {"a": 1.0}}, r"missing \['b'\]"),
    ({"method": "static", "weights": {"a": 1.0, "b": 1.0, "c": 1.0}}, r"unknown \['c'\]"),
    ({"method": "static", "weights": {"a": 1.0, "b": -0.5}}, "weight of 'b'"),
    ({"method": "static", "weights": {"a": 0.0, "b": 0.0}}, "all zero"),
    ({"method": "dwa", "temperature": 0.0}, "temperature"),
    ({"method": "gradnorm", "alpha": -1.0}, "alpha"),
    ({"method": "rlw", "seed": 1.5}, "seed"),
    ({"method": "uncertainty", "lr": 0.0}, "uncertainty lr"),
    ({"method": "uncertainty", "lr": -1.0}, "uncertainty lr"),
    ({"method": "uncertainty", "init": "ones"}, "uncertainty init"),
])
def test_bad_specs(spec, match):
    with pytest.raises(PrunefuseError, match=match):
        make_weighter(spec, TASKS)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss(name, bad):
    model, (x, y) = TwoTask(), _data()
    losses = _losses(model, x, y)
    losses["b"] = losses["b"] * bad
    w = make_weighter(SPECS[name], TASKS)
    with pytest.raises(FloatingPointError, match=f"loss of task 'b' is {bad}"):
        w.combine(losses, shared_params=_shared(model))


def _train_capturing(monkeypatch, weighting, **kw):
    """Run the real training loop on a tiny synthetic suite (task b's labels x10); return
    the weighter it built and the param groups of the Adam it built."""
    from mtl_models import suites
    from mtl_models.training import weighting as weighting_mod

    seen = {}
    real_make, real_adam = weighting_mod.make_weighter, torch.optim.Adam

    def make(spec, tasks):
        seen["weighter"] = real_make(spec, tasks)
        return seen["weighter"]

    def adam(params, **kwargs):
        seen["opt"] = real_adam(params, **kwargs)
        return seen["opt"]

    monkeypatch.setattr(weighting_mod, "make_weighter", make)
    monkeypatch.setattr(torch.optim, "Adam", adam)
    suite = suites.get("synthetic", tasks=2, correlation=1.0, dim=8, label_scale=[1.0, 10.0], seed=0,
                       train_samples=512, val_samples=16, test_samples=16)
    torch.manual_seed(0)
    model = suite.build_model("mlp", width=16, depth=2)
    train(model, suite, TrainOptions(epochs=1.0, lr=1e-3, batch_size=16, weighting=weighting, **kw))  # 32 steps
    return model, seen["weighter"], seen["opt"]


def test_train_puts_weighter_params_in_their_own_group(monkeypatch):
    model, w, opt = _train_capturing(monkeypatch, {"method": "uncertainty", "lr": 0.02}, weight_decay=1e-4)
    assert len(opt.param_groups) == 2
    trunk_and_heads, own = opt.param_groups
    assert trunk_and_heads["lr"] == 1e-3 and own["lr"] == 0.02
    assert {id(p) for p in trunk_and_heads["params"]} == {id(p) for p in model.parameters()}
    assert [id(p) for p in own["params"]] == [id(p) for p in w.parameters()]
    assert trunk_and_heads["weight_decay"] == own["weight_decay"] == 1e-4  # otherwise unchanged
    _, _, opt = _train_capturing(monkeypatch, {"method": "equal"})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3  # no weighter params, one group


def test_uncertainty_default_lr_moves_log_variances_within_one_epoch(monkeypatch):
    # 32 Adam steps; the losses start at ~9.5 and ~890 (s* = log L ≈ 2.3 and 6.8). At the
    # model's lr (1e-3) Adam moves s_t by at most ~32 * 1e-3 ≈ 0.03: the weights stay equal.
    # At the default lr both log-variances climb measurably towards log L_t within the epoch.
    _, slow, _ = _train_capturing(monkeypatch, {"method": "uncertainty", "lr": 1e-3, "init": "zero"})
    s_slow = slow.parameters()[0].detach()
    assert s_slow.abs().max() < 0.05
    _, fast, opt = _train_capturing(monkeypatch, {"method": "uncertainty", "init": "zero"})
    assert opt.param_groups[1]["lr"] == UNCERTAINTY_LR
    s = fast.parameters()[0].detach()
    assert s.min() > 0.5  # > 15x what the model's lr allows


def test_uncertainty_default_starts_at_first_losses_in_training(monkeypatch):
    # The default init sets s_t = log L_t at the first step: the x10 task (loss ~100x the
    # other's) is down-weighted from the start, and s keeps tracking log L_t afterwards.
    _, w, _ = _train_capturing(monkeypatch, {"method": "uncertainty"})
    s = w.parameters()[0].detach()
    assert s[1] - s[0] > 3.0  # log(890 / 9.5) ≈ 4.5
    assert w.weights()["task1"] > 20 * w.weights()["task2"]
