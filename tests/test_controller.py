"""AdaptiveReuse: plateau detection, Amendments 3.1-3.3, strategies, state_dict, resume."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reuse_compiler import AdaptiveReuse, ReuseConfig, load_checkpoint, reuse_compile, save_checkpoint, set_stage
from reuse_compiler.models import cifarnet


def _one_layer(n_candidates_min=4):
    model = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    gm = reuse_compile(model, torch.randn(32, 16, 8, 8))
    assert len(gm.reuse_plan["0"].candidates) >= n_candidates_min
    return gm


class ScriptedProbe:
    """Probe accuracy as a function of the layer's candidate index (-1 = exact)."""

    def __init__(self, acc_by_index):
        self.acc = acc_by_index
        self.calls = []

    def __call__(self, gm):
        row = gm.reuse_plan["0"]
        i = -1 if row.exact else row.stage
        self.calls.append(i)
        return self.acc[i]


@pytest.mark.parametrize(
    "patience,threshold,mode,cooldown",
    [(0, 1e-4, "rel", 0), (2, 1e-2, "rel", 0), (1, 0.05, "abs", 2), (3, 0.0, "rel", 1)],
)
def test_plateaus_match_reduce_lr_on_plateau(patience, threshold, mode, cooldown):
    g = torch.Generator().manual_seed(1)
    losses = (torch.linspace(2, 0.5, 60) + 0.3 * torch.rand(60, generator=g)).tolist()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, patience=patience, threshold=threshold, threshold_mode=mode, cooldown=cooldown, factor=0.9
    )
    gm = _one_layer()
    ctl = AdaptiveReuse(gm, "fixed", patience=patience, threshold=threshold, threshold_mode=mode, cooldown=cooldown)
    ours, theirs = [], []
    for i, loss in enumerate(losses):
        lr = opt.param_groups[0]["lr"]
        sched.step(loss)
        if opt.param_groups[0]["lr"] < lr:
            theirs.append(i)
        if ctl.step(loss):
            ours.append(i)
    assert ours == theirs and ours


def test_window_averages_steps():
    gm = _one_layer()
    ctl = AdaptiveReuse(gm, "fixed", patience=0, window=3)
    for loss in [3, 1, 2]:  # mean 2
        assert not ctl.step(loss)
    assert ctl.best == 2.0 and ctl.steps == 3


def _plateau(ctl):
    """Drive the controller to its next plateau with a flat loss."""
    for _ in range(100):
        if ctl.step(1.0):
            return
    raise AssertionError("no plateau")


def test_lh_amendment_3_1_jumps_to_first_candidate_with_ratio_1_5():
    gm = _one_layer()
    probe = ScriptedProbe({0: 0.2, 1: 0.25, 2: 0.31, 3: 0.5, 4: 0.6, 5: 0.9, 6: 0.9, 7: 0.9, -1: 0.9})
    ctl = AdaptiveReuse(gm, "lh", probe=probe, patience=0)
    assert gm.reuse_plan["0"].stage == 0
    ctl.step(1.0)
    _plateau(ctl)
    h = ctl.history[-1]
    assert h["rule"] == "amendment 3.1" and gm.reuse_plan["0"].stage == 2  # 0.31 / 0.2 >= 1.5
    assert h["A_cur"] == 0.2 and h["A_new"] == 0.31 and [p["acc"] for p in h["probes"]] == [0.25, 0.31]


def test_lh_amendment_3_2_needs_plus_0_1_above_one_half():
    gm = _one_layer()
    probe = ScriptedProbe({0: 0.6, 1: 0.65, 2: 0.69, 3: 0.71, 4: 0.72, 5: 0.72, 6: 0.72, 7: 0.72, -1: 0.72})
    ctl = AdaptiveReuse(gm, "lh", probe=probe, patience=0)
    ctl.step(1.0)
    _plateau(ctl)
    assert ctl.history[-1]["rule"] == "amendment 3.2" and gm.reuse_plan["0"].stage == 3


def test_lh_amendment_3_3_takes_first_with_ratio_1_1():
    gm = _one_layer()
    # above 0.5, no candidate gains 0.1; the first with ratio >= 1.1 is index 3 (0.6 * 1.1 = 0.66)
    probe = ScriptedProbe({0: 0.6, 1: 0.62, 2: 0.65, 3: 0.67, 4: 0.68, 5: 0.69, 6: 0.69, 7: 0.69, -1: 0.69})
    ctl = AdaptiveReuse(gm, "lh", probe=probe, patience=0)
    ctl.step(1.0)
    _plateau(ctl)
    assert ctl.history[-1]["rule"] == "amendment 3.3" and gm.reuse_plan["0"].stage == 3


@pytest.mark.parametrize("finish", [None, "exact"])
def test_lh_3_3_end_when_no_candidate_qualifies(finish):
    gm = _one_layer()
    probe = ScriptedProbe({i: 0.9 for i in range(-1, 12)})
    ctl = AdaptiveReuse(gm, "lh", probe=probe, patience=0, finish=finish)
    ctl.step(1.0)
    _plateau(ctl)
    h = ctl.history[-1]
    assert h["rule"] == "end: no candidate passes 3.3"
    row = gm.reuse_plan["0"]
    assert row.exact == (finish == "exact") and (row.exact or row.stage == 0)
    assert ctl.done
    n = len(ctl.history)
    for _ in range(10):
        ctl.step(1.0)
    assert len(ctl.history) == n  # a settled layer is not probed again


def test_lh_does_not_probe_candidates_no_accuracy_could_promote(monkeypatch):
    gm = _one_layer()
    x = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = gm.eval()(x).argmax(1)  # A_cur = 1.0 > 1/1.1: no candidate could pass 3.2 or 3.3
    gm.train()
    ctl = AdaptiveReuse(gm, "lh", probe=(x, y), patience=0, finish="exact")
    calls = []
    probe = ctl._probe
    monkeypatch.setattr(ctl, "_probe", lambda: calls.append(1) or probe())
    ctl.step(1.0)
    _plateau(ctl)
    h = ctl.history[-1]
    assert h["A_cur"] == 1.0 and len(calls) == 1  # A_cur only
    assert h["rule"] == "end: no candidate passes 3.3" and h["probes"] == [] and h["unreachable"]
    assert gm.reuse_plan["0"].exact
    # below the bound a perfect candidate could pass 3.3, so the candidates are probed
    gm = _one_layer()
    y = y.clone()
    y[:8] = (y[:8] + 1) % 10  # A_cur <= 56/64 = 0.875 < 1/1.1
    ctl = AdaptiveReuse(gm, "lh", probe=(x, y), patience=0, finish="exact")
    ctl.step(1.0)
    _plateau(ctl)
    h = ctl.history[-1]
    assert h["probes"] and "unreachable" not in h


def test_lh_walks_to_the_last_candidate_then_finishes_exact():
    gm = _one_layer()
    n = len(gm.reuse_plan["0"].candidates)
    probe = ScriptedProbe({i: 0.1 * 1.6**i for i in range(n)} | {-1: 1.0})
    ctl = AdaptiveReuse(gm, "lh", probe=probe, patience=0, finish="exact")
    ctl.step(1.0)
    for _ in range(n + 2):
        if not ctl.done:
            _plateau(ctl)
    rules = [h["rule"] for h in ctl.history]
    assert rules[-1] == "end: last candidate" and gm.reuse_plan["0"].exact
    assert {r for r in rules[:-1]} == {"amendment 3.1", "amendment 3.2"}  # A crosses 0.5 on the way
    assert [h["new"] for h in ctl.history[:-1]] == [f"L={L} H={H}" for L, H in gm.reuse_plan["0"].candidates[1:]]


def test_cr_strategy_turns_cluster_reuse_off_then_exact():
    gm = _one_layer()
    ctl = AdaptiveReuse(gm, "cr", patience=0, finish="exact")
    assert gm.reuse_plan["0"].cluster_reuse and "store" in gm.code
    ctl.step(1.0)
    _plateau(ctl)
    assert not gm.reuse_plan["0"].cluster_reuse and ctl.history[-1]["rule"] == "cluster reuse off"
    assert "store" not in gm.code
    _plateau(ctl)
    assert gm.reuse_plan["0"].exact and ctl.done


def test_fixed_strategy_keeps_stage():
    gm = _one_layer()
    before = (gm.reuse_plan["0"].L, gm.reuse_plan["0"].H)
    ctl = AdaptiveReuse(gm, "fixed", patience=0)
    for _ in range(20):
        ctl.step(1.0)
    assert (gm.reuse_plan["0"].L, gm.reuse_plan["0"].H) == before and ctl.history == [] and ctl.done


def test_fixed_strategy_runs_without_cluster_reuse():
    """Table IV's strategy 1: a compiled across-batch stage has its store turned off."""
    torch.manual_seed(0)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=16, width=0.25), torch.randn(8, 1, 16, 16))
    set_stage(gm, cluster_reuse=True)
    AdaptiveReuse(gm, "fixed", patience=0)
    assert [r.cluster_reuse for r in gm.reuse_plan] == [False, False]


def test_bad_arguments():
    gm = _one_layer()
    with pytest.raises(ValueError, match="strategy"):
        AdaptiveReuse(gm, "fast")
    with pytest.raises(ValueError, match="probe"):
        AdaptiveReuse(gm, "lh")
    with pytest.raises(ValueError, match="patience"):
        AdaptiveReuse(gm, "fixed", patience=-1)
    with pytest.raises(ValueError, match="finish"):
        AdaptiveReuse(gm, "fixed", finish="exactly")
    with pytest.raises(TypeError, match="reuse_compile"):
        AdaptiveReuse(nn.Linear(2, 2), "fixed")


def test_state_dict_resume_takes_the_same_decisions():
    losses = [2.0, 1.5, 1.4, 1.41, 1.39, 1.5, 1.2, 1.25, 1.3, 1.1, 1.2, 1.2, 1.2, 1.0, 1.1, 1.1, 1.1, 1.1] * 2
    acc = {i: min(0.95, 0.2 * 1.3**i) for i in range(12)} | {-1: 0.95}

    def run(split=None):
        gm = _one_layer()
        ctl = AdaptiveReuse(gm, "lh", probe=ScriptedProbe(acc), patience=1, cooldown=1, finish="exact")
        for i, loss in enumerate(losses):
            if i == split:
                state = ctl.state_dict()
                gm = _one_layer()
                ctl = AdaptiveReuse(gm, "lh", probe=ScriptedProbe(acc), patience=1, cooldown=1, finish="exact")
                ctl.load_state_dict(state)
            ctl.step(loss)
        return ctl.history, {k: v for k, v in ctl.state_dict().items() if k != "history"}

    full = run()
    assert len(full[0]) >= 3
    for split in (3, 7, 16):
        assert run(split) == full


def _digits_like(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    return x, (x.mean((1, 2, 3)) * 1000).long() % 10


@pytest.mark.parametrize("strategy,scope", [("lh", "batch"), ("cr", "across-batch")])
def test_checkpoint_resume_matches_uninterrupted_training(tmp_path, strategy, scope):
    x, y = _digits_like()
    probe = (x[:32], y[:32])
    config = ReuseConfig(scope=scope, refresh=3, seed=7)

    def fresh():
        torch.manual_seed(0)
        gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x[:16], config=config)
        ctl = AdaptiveReuse(gm, strategy, probe=probe, patience=0, finish="exact")
        opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
        return gm, ctl, opt

    def train(gm, ctl, opt, steps):
        for s in steps:
            xb, yb = x[(s * 16) % 64 : (s * 16) % 64 + 16], y[(s * 16) % 64 : (s * 16) % 64 + 16]
            loss = F.cross_entropy(gm(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.step([2.0, 1.9, 1.95][s % 3])  # scripted plateaus every few steps

    gm, ctl, opt = fresh()
    train(gm, ctl, opt, range(10))
    ref_params = [p.detach().clone() for p in gm.parameters()]
    ref_history, ref_stages = ctl.history, ctl.state_dict()["stages"]

    gm, ctl, opt = fresh()
    train(gm, ctl, opt, range(5))
    save_checkpoint(tmp_path / "ckpt.pt", gm, controller=ctl, optimizer=opt, step=5)
    gm, ctl, opt = fresh()
    assert load_checkpoint(tmp_path / "ckpt.pt", gm, controller=ctl, optimizer=opt) == {"step": 5}
    train(gm, ctl, opt, range(5, 10))
    assert ctl.history == ref_history and ctl.state_dict()["stages"] == ref_stages
    for a, b in zip(gm.parameters(), ref_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_refuses_other_config(tmp_path):
    x, _ = _digits_like(8)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28), x)
    save_checkpoint(tmp_path / "c.pt", gm)
    other = reuse_compile(cifarnet(in_channels=1, image_size=28), x, config=ReuseConfig(seed=1))
    with pytest.raises(ValueError, match="ReuseConfig"):
        load_checkpoint(tmp_path / "c.pt", other)


def test_across_batch_store_bounded_refreshed_and_emptied():
    torch.manual_seed(0)
    gm = reuse_compile(
        cifarnet(in_channels=1, image_size=28, width=0.25),
        torch.randn(8, 1, 28, 28),
        config=ReuseConfig(scope="across-batch", cache_size=40, refresh=4, H=10),
    )
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    store = gm.reuse_state.conv2.store
    for _ in range(30):  # fresh random data every batch: the store keeps filling
        loss = gm(torch.randn(8, 1, 28, 28)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        st = store.stores[0]
        assert all(len(k) <= 40 for k in st.keys)
    assert sum(len(k) for k in st.keys) > 0
    # refreshed within the last `refresh` steps: outputs = stored centroid . current W_b
    assert st.step - st.last_refresh < 4
    # empty after a new (L, H)
    set_stage(gm, "conv2", H=11)
    assert store.stores == {}


def test_across_batch_second_identical_batch_reuses_everything():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28), x, config=ReuseConfig(scope="across-batch"))
    with torch.no_grad():
        y1 = gm(x)  # train mode: the store learns
        assert gm.reuse_plan["conv1"].reuse_rate == 0.0
        gm.eval()
        y2 = gm(x)
    assert gm.reuse_plan["conv1"].reuse_rate == 1.0 and gm.reuse_plan["conv2"].reuse_rate == 1.0
    torch.testing.assert_close(y1, y2)
    gm.train()
    y3 = gm(x)
    y3.sum().backward()  # gradient flows through stored outputs (straight-through)
    assert gm.conv1.weight.grad is not None and gm.conv1.weight.grad.abs().sum() > 0


def test_store_learns_in_train_mode_only():
    """Like BatchNorm statistics: eval forwards read the store but do not change it."""
    torch.manual_seed(0)
    gm = reuse_compile(
        cifarnet(in_channels=1, image_size=28, width=0.25),
        torch.randn(8, 1, 28, 28),
        config=ReuseConfig(scope="across-batch"),
    )
    gm(torch.randn(8, 1, 28, 28))  # train mode: fills
    st = gm.reuse_state.conv1.store.stores[0]
    size, step = sum(len(k) for k in st.keys), st.step
    gm.eval()
    with torch.no_grad():
        gm(torch.randn(8, 1, 28, 28))
    assert sum(len(k) for k in st.keys) == size and st.step == step
    assert gm.reuse_plan["conv1"].reuse_rate is not None


def test_cluster_reuse_training_does_not_diverge():
    """Stored outputs follow the current weights (refresh=1): no jump in the loss."""
    from reuse_compiler.models import cifarnet as cn

    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) * 1000).long() % 10
    torch.manual_seed(0)
    gm = reuse_compile(cn(in_channels=1, image_size=28, width=0.25), x[:32], config=ReuseConfig(scope="across-batch"))
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    losses = []
    for step in range(24):
        i = (step * 32) % 256
        loss = F.cross_entropy(gm(x[i : i + 32]), y[i : i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert max(losses) < 5 * losses[0]


@pytest.mark.parametrize("fail_at", [2, 4])
def test_a_failed_probe_leaves_the_layer_at_its_stage(fail_at):
    """An error (or Ctrl-C) inside a probe restores the stage the probe had set aside."""
    from reuse_compiler import stage_dict

    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=16, width=0.25), x)
    calls = {"n": 0}

    def probe(g):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt
        return 0.01

    ctl = AdaptiveReuse(gm, "lh", probe=probe, patience=0)
    before = stage_dict(gm)
    ctl.step(1.0)
    with pytest.raises(KeyboardInterrupt):
        ctl.step(2.0)
    assert stage_dict(gm) == before and ctl.history == []
    assert all(gm.reuse_plan[n].stage == 0 for n in ("conv1", "conv2"))


@pytest.mark.parametrize(
    "accs,stage,rule",
    [
        ({0: 0.6, 1: 0.7, 2: 0.8}, 1, "amendment 3.2"),  # 0.7 - 0.6 is 0.0999... in floats
        ({0: 0.2, 1: 0.3, 2: 0.9}, 1, "amendment 3.1"),  # 0.3 / 0.2 = 1.4999... in floats
        ({0: 0.7, 1: 0.77, 2: 0.78}, 1, "amendment 3.3"),  # 0.77 / 0.7 = 1.0999...
    ],
)
def test_lh_amendments_hold_at_their_exact_thresholds(accs, stage, rule):
    gm = _one_layer()
    probe = ScriptedProbe({**{k: accs[2] for k in range(3, 8)}, **accs, -1: accs[2]})
    ctl = AdaptiveReuse(gm, "lh", probe=probe, patience=0)
    ctl.step(1.0)
    _plateau(ctl)
    assert ctl.history[-1]["rule"] == rule and gm.reuse_plan["0"].stage == stage


def test_probes_leave_the_plans_r_c_as_it_was():
    """A walk that ends at the stage it had keeps the r_c of the training batches."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=16, width=0.25), x)
    ctl = AdaptiveReuse(gm, "lh", probe=lambda g: 0.5, patience=0)
    gm(x)
    before = {r.name: r.r_c for r in gm.reuse_plan}
    ctl.step(1.0)
    ctl.step(2.0)  # a plateau: every candidate probed, none passes 3.3
    assert ctl.history and all(h["rule"].startswith("end") for h in ctl.history)
    assert {r.name: r.r_c for r in gm.reuse_plan} == before
