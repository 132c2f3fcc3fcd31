"""Smoke test of examples/reproduce.py: ``all --quick`` end to end, then real properties of
what it wrote (files, table shapes, accuracies and ratios in range, paired r_c)."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples import reproduce  # noqa: E402
from reuse_compiler import ReuseConfig, reuse_compile  # noqa: E402

COMMANDS = ("train", "fig7", "fig8", "table3", "table4", "norm")


def _table_rows(md: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and data rows of the markdown table whose header begins with ``header_start``."""
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert all(len(r) == len(header) for r in rows)
    return header, rows


def test_all_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("REUSE_COMPILER_CACHE", str(tmp_path / "calibration"))
    out = tmp_path / "repro"
    results = reproduce.main(["all", "--quick", "--out", str(out)])
    s = reproduce.Settings.quick_settings()

    assert set(results) == set(COMMANDS)
    for name in COMMANDS:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.md").read_text().startswith("# ")
        json.loads((out / f"{name}.json").read_text())
    assert (out / reproduce.WEIGHTS).stat().st_size > 100_000

    # train
    assert 0.0 <= results["train"]["test_acc"] <= 1.0

    # fig7: every (layer, scope, k/N) point, r_c = |C|/N in (0, k/N] up to rounding k = k/N * N
    # to an int: at most 0.5 / N, and N >= 196 (conv2's rows per image)
    f7 = results["fig7"]
    assert 0.0 <= f7["exact_accuracy"] <= 1.0
    expected = sum(len(v) for v in s.fig7_rc.values())
    assert len(f7["points"]) == expected
    for p in f7["points"]:
        assert 0.0 <= p["accuracy"] <= 1.0
        assert 0.0 < p["r_c"] <= p["ratio"] + 0.5 / 196 + 1e-12
    header, rows = _table_rows((out / "fig7.md").read_text(), "layer")
    assert header == ["layer", "scope", "k/N", "r_c", "accuracy", "vs exact"]
    assert len(rows) == expected
    assert {r[1] for r in rows} == {"single-input", "single-batch"}

    # fig8: both centroids, every (layer, L, H); the same clusters (hence r_c) for both
    f8 = results["fig8"]
    n_points = sum(len(s.fig8_L[layer]) * len(s.fig8_H[layer]) for layer in reproduce.LAYERS)
    assert len(f8["points"]) == 2 * n_points
    for p in f8["points"]:
        assert 0.0 <= p["accuracy"] <= 1.0
        assert 0.0 < p["r_c"] <= 1.0
    by = {(p["centroid"], p["layer"], p["L"], p["H"]): p for p in f8["points"]}
    for (c, layer, L, H), p in by.items():
        if c == "mean":
            assert abs(by[("norm", layer, L, H)]["r_c"] - p["r_c"]) < 1e-9
    md8 = (out / "fig8.md").read_text()
    header, rows = _table_rows(md8, "layer | L | H")
    assert header == ["layer", "L", "H", "r_c", "acc (mean)", "acc (norm)"]
    assert len(rows) == n_points
    _, summary = _table_rows(md8, "layer | L | mean")
    assert len(summary) == sum(len(v) for v in s.fig8_L.values())

    # table3: the store starts empty (R = 0 on the first batch), then fills
    t3 = results["table3"]
    assert [(r["layer"], r["L"], r["H"]) for r in t3["rows"]] == [tuple(x) for x in s.table3_stages]
    for r in t3["rows"]:
        assert 0.0 <= r["acc_cr0"] <= 1.0 and 0.0 <= r["acc_cr1"] <= 1.0
        assert 0.0 < r["r_c"] <= 1.0
        assert r["R"][0] == 0.0
        assert all(0.0 <= v <= 1.0 for v in r["R"]) and r["R"][-1] > 0.0
    header, rows = _table_rows((out / "table3.md").read_text(), "layer")
    assert header[:6] == ["layer", "L", "H", "r_c (CR=0)", "acc CR=0", "acc CR=1"]
    assert len(rows) == len(s.table3_stages)

    # table4: one train.py call per run, each with its own stock baseline
    t4 = results["table4"]
    assert [r["name"] for r in t4["runs"]] == ["fixed", "lh", "cr", "lh-paper-fast"]
    for r in t4["runs"]:
        sm = r["summary"]
        assert sm["stock_train_time_s"] > 0 and sm["reuse_train_time_s"] > 0
        assert abs(sm["time_saved"] - (1 - sm["reuse_train_time_s"] / sm["stock_train_time_s"])) < 1e-9
        for k in ("stock_final_test_acc", "reuse_final_test_acc_exact", "reuse_final_test_acc_at_stage"):
            assert 0.0 <= sm[k] <= 1.0
        assert (out / "table4" / r["name"] / "results.json").exists()
    assert [r["args"]["policy"] for r in t4["runs"]] == ["measured"] * 3 + ["paper"]
    header, rows = _table_rows((out / "table4.md").read_text(), "run")
    assert len(rows) == 4 and "time saved" in header and "reuse/stock" in header

    # norm: paired stats cover both layers; three training runs of the same length
    nm = results["norm"]
    assert {p["layer"] for p in nm["paired"]} == set(reproduce.LAYERS)
    for p in nm["paired"]:
        assert p["points"] == p["norm_better"] + p["equal"] + p["mean_better"]
    names = [f"{n} s{seed}" for seed in s.norm_seeds for n in ("stock", "mean", "norm")]
    assert list(nm["runs"]) == names
    for rec in nm["runs"].values():
        assert len(rec["epochs"]) == s.norm_epochs
        assert all(0.0 <= e["test_acc"] <= 1.0 and 0.0 <= e["test_acc_at_stage"] <= 1.0 for e in rec["epochs"])
    for name in names[1:]:
        assert set(nm["runs"][name]["epochs"][-1]["r_c"]) == set(reproduce.LAYERS)
    md = (out / "norm.md").read_text()
    _, rows = _table_rows(md, "run")
    assert [r[0] for r in rows] == names


def test_reuse_phase_ratio_ignores_layers_exact_from_the_start():
    """Table IV's reuse-epoch column: a layer the plan keeps exact throughout (the measured
    policy's conv1) does not disqualify the epochs in which conv2 reuses."""
    ep = [{"epoch": i + 1, "time": t} for i, t in enumerate([1.0, 2.0, 4.0, 7.0])]
    stages = ["L=320 H=8", "L=320 H=8", "exact", "exact"]
    run = {
        "reuse_epochs": [dict(e, stages={"conv1": "exact", "conv2": s}) for e, s in zip(ep, stages)],
        "stock_epochs": [{"epoch": i + 1, "time": 3.0 * (i + 1)} for i in range(4)],
        "switches": [{"epoch": 3, "layer": "conv2", "old": "L=320 H=8", "new": "exact"}],
    }
    # epochs 1 and 2 (1 s each) ran at reuse; stock took 3 s each
    assert reproduce.reuse_phase_ratio(run) == (2.0 / 6.0, 2)
    # nothing reused from the start: no such epochs
    for e in run["reuse_epochs"]:
        e["stages"]["conv2"] = "exact"
    run["switches"] = []
    assert reproduce.reuse_phase_ratio(run) is None


def test_end_to_end_rows_from_curves():
    """benchmarks/end_to_end.py's figures from two runs' per-epoch curves."""
    from benchmarks import end_to_end

    stock = {"train_time": 9.0, "epochs": [{"time": t, "test_acc": a} for t, a in [(3, 0.90), (6, 0.98), (9, 0.97)]]}
    reuse = {
        "train_time": 6.0,
        "switches": [{}],
        "epochs": [{"time": t, "test_acc": a} for t, a in [(1, 0.80), (2, 0.966), (4, 0.975), (6, 0.96)]],
    }
    r = end_to_end.row_of(0, stock, reuse, tolerance=0.005)
    assert r["target_acc"] == 0.97 and r["stock_time_to_target"] == 6 and r["reuse_time_to_target"] == 4
    assert r["ratio"] == 4 / 6 and r["total_ratio"] == 6 / 9 and r["reuse_final_acc"] == 0.96
    assert r["ratio_within_tolerance"] == 2 / 6  # 0.966 >= 0.965 at 2 s; stock 0.98 at 6 s
    assert r["reuse_best_acc"] == 0.975 and r["stock_acc_at_reuse_total"] == 0.98
    assert r["reuse_epoch_to_target"] == 3 and r["ratio_in_stock_epochs"] == 4 / 6
    # smoothed curves: 1-epoch means are the curves themselves; with 2-epoch means stock's
    # target is (0.98 + 0.97) / 2 and reuse's means (0.883, 0.9705, 0.9675) stay below it
    assert end_to_end.row_of(0, stock, reuse, 0.005, smooth=1)["ratio_smoothed"] == r["ratio"]
    assert end_to_end.row_of(0, stock, reuse, 0.005, smooth=2)["ratio_smoothed"] is None
    assert end_to_end.smoothed(stock, 2)["epochs"][0]["time"] == 6
    # a reuse run longer than stock's that reaches the target after stock's last epoch
    longer = {**reuse, "epochs": [*reuse["epochs"][:2], {"time": 5, "test_acc": 0.96}, {"time": 6, "test_acc": 0.971}]}
    r = end_to_end.row_of(0, stock, longer, 0.005)
    assert r["reuse_epoch_to_target"] == 4 and r["ratio"] == 1.0 and r["ratio_in_stock_epochs"] is None
    assert "within stock's 3 epochs (the reuse run trained up to 4): reached in 0/1" in end_to_end.report([r], [])
    reuse["epochs"] = reuse["epochs"][:1]
    assert end_to_end.row_of(0, stock, reuse, 0.005)["ratio"] is None
    # epoch times: stock 3, 3, 3; reuse 1, 2, 2 (then the curves end): ratios 2/3, 2/3
    reuse["epochs"] = [{"time": t, "test_acc": a} for t, a in [(1, 0.80), (3, 0.966), (5, 0.975)]]
    assert end_to_end.row_of(0, stock, reuse, 0.005)["epoch_ratio"] == 2 / 3


def test_interleaved_runs_have_their_separate_curves():
    """examples/train.py's interleaved schedule: two runs taking turns epoch by epoch each end
    with the record it has when run alone, though the other run draws from the global RNG
    (dropout) between its epochs."""
    import argparse

    import torch.nn as nn

    from examples.train import interleave, train_epochs, train_run

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    data = ((x[:64], y[:64]), (x[64:], y[64:]))
    args = argparse.Namespace(epochs=3, seed=5, batch_size=16, lr=1e-2, adam="foreach", no_progress=True)

    def model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10))

    def curves(rec):
        return [(e["train_loss"], e["test_loss"], e["test_acc"]) for e in rec["epochs"]]

    alone = {name: train_run(name, model(s), data, args) for name, s in (("a", 1), ("b", 2))}
    both = interleave({name: train_epochs(name, model(s), data, args) for name, s in (("a", 1), ("b", 2))})
    for name in ("a", "b"):
        assert curves(both[name]) == curves(alone[name])
        assert len(both[name]["epochs"]) == 3
    # runs of different lengths: the longer one goes on alone
    longer = interleave(
        {"a": train_epochs("a", model(1), data, args, epochs=1), "b": train_epochs("b", model(2), data, args)}
    )
    assert len(longer["a"]["epochs"]) == 1 and curves(longer["b"]) == curves(alone["b"])


def test_main_job_norm_grad_auto():
    """The main job's --norm-grad auto: norms constant for cifarnet only (AlexNet stalled)."""
    from examples.train import MODELS, auto_norm_grad, build_parser

    assert build_parser().parse_args([]).norm_grad == "auto"
    assert auto_norm_grad("cifarnet") == "off"
    assert {auto_norm_grad(m) for m in MODELS if m != "cifarnet"} == {"on"}


def test_cifarnet_pool_first_is_the_same_function_and_gradient():
    """CifarNet's default pools before its ReLUs; the values and every gradient equal those of
    conv -> ReLU -> pool bit for bit (max-pool and ReLU commute), also after reuse_compile."""
    from reuse_compiler.models import cifarnet

    torch.manual_seed(0)
    old = cifarnet(in_channels=1, image_size=28, pool_first=False)
    new = cifarnet(in_channels=1, image_size=28)
    new.load_state_dict(old.state_dict())
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    config = ReuseConfig(seed=0)
    pairs = [(old, new), (reuse_compile(copy.deepcopy(old), x, config=config), reuse_compile(new, x, config=config))]
    for a, b in pairs:
        la, lb = (torch.nn.functional.cross_entropy(m(x), y) for m in (a, b))
        la.backward()
        lb.backward()
        assert torch.equal(la, lb)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p.grad, q.grad), name


def test_main_job_adam_foreach_equals_for_loop():
    """The main job's Adam (foreach, the default) gives the for-loop's parameters bit for bit;
    an unknown implementation is refused by name."""
    from examples.train import build_parser, make_adam

    assert build_parser().parse_args([]).adam == "foreach"
    torch.manual_seed(0)
    params = {impl: [torch.randn(5, 3).requires_grad_(), torch.randn(3).requires_grad_()] for impl in ("a", "b")}
    params["b"] = [p.detach().clone().requires_grad_() for p in params["a"]]
    opts = {"a": make_adam(params["a"], 1e-2, "foreach"), "b": make_adam(params["b"], 1e-2, "for-loop")}
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params["a"]]
        for k, opt in opts.items():
            for p, g in zip(params[k], grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params["a"], params["b"]))
    with pytest.raises(ValueError, match="Adam implementation 'sgd'"):
        make_adam(params["a"], 1e-2, "sgd")


def test_exact_after_turns_the_reused_layers_exact_and_stops_the_controller():
    """examples/train.py --exact-after E: after the reuse run's epoch E every reused layer is
    exact (switches recorded with rule "exact-after"), and the controller is no longer
    stepped (no r_c gathered, its history unchanged)."""
    import argparse

    from examples.train import train_run
    from reuse_compiler import AdaptiveReuse, ReuseConfig, reuse_compile
    from reuse_compiler.models import cifarnet

    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    data = ((x[:64], y[:64]), (x[64:], y[64:]))
    torch.manual_seed(0)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=12, width=0.125), x[:16], config=ReuseConfig(L=4, H=4))
    reused = [r.name for r in gm.reuse_plan if r.rewritable and not r.exact]
    assert reused
    args = argparse.Namespace(epochs=3, seed=0, batch_size=16, lr=1e-3, adam="foreach", no_progress=True, exact_after=1)
    seen = []

    def controller(m):
        ctl = AdaptiveReuse(m, "fixed", patience=0)
        step = ctl.step
        ctl.step = lambda loss: (seen.append(loss), step(loss))[1]
        return ctl

    rec = train_run("reuse", gm, data, args, controller)
    assert len(seen) == 4  # epoch 1's four steps only
    assert [(s["layer"], s["rule"], s["epoch"]) for s in rec["switches"]] == [(n, "exact-after", 1) for n in reused]
    assert all(r.exact for r in gm.reuse_plan if r.rewritable)
    assert rec["epochs"][0]["r_c"] and not rec["epochs"][1]["r_c"]
    assert all(rec["epochs"][0]["stages"][n] != "exact" for n in reused)  # epoch 1 trained with reuse
    assert set(rec["epochs"][2]["stages"].values()) == {"exact"}


@pytest.mark.parametrize(
    "argv", [["--exact-after", "-1"], ["--exact-after", "12"], ["--exact-after", "16", "--reuse-epochs", "16"]]
)
def test_exact_after_outside_the_reuse_run_is_refused(argv, capsys):
    """--exact-after must fall inside the reuse run (below its epochs), and is refused by name
    before anything is loaded or trained."""
    from examples.train import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "--exact-after must be >= 0" in capsys.readouterr().err


def test_train_run_under_autocast():
    """examples/train.py --autocast bf16: both runs' forwards under bfloat16 autocast; a compiled
    model trains (its losses finite and falling), the stock one too."""
    import argparse
    import copy

    from examples.train import train_run
    from reuse_compiler import ReuseConfig, reuse_compile
    from reuse_compiler.models import cifarnet

    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    data = ((x[:64], y[:64]), (x[64:], y[64:]))
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=12, width=0.125)
    gm = reuse_compile(copy.deepcopy(model), x[:16], config=ReuseConfig(L=4, H=4))
    args = argparse.Namespace(epochs=3, seed=0, batch_size=16, lr=1e-2, adam="foreach", no_progress=True)
    args.autocast = "bf16"
    for m in (model, gm):
        rec = train_run("run", m, data, args)
        losses = [e["train_loss"] for e in rec["epochs"]]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
