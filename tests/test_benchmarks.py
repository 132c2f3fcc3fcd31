"""The graph edits of benchmarks/accuracy_gap.py do what its docs say: ``fwd`` keeps the
chain's output values with the exact convolution's gradients, ``bwd`` the converse, and
``sumscale`` makes each cluster's outputs sum to those of its members' mean, ``stunit``
changes only the input gradient; ``vq``'s ids are nearest codewords. The benchmarks'
measurements and reports: peak memory leaves out what existed before the call, ops.py
times round-robin, accuracy_gap's long-run report and report-only mode, end_to_end's
labels from the runs' saved arguments, timeline's segments and chain_ops' op and kernel
tables."""

import argparse
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import accuracy_gap  # noqa: E402
from reuse_compiler import ReuseConfig, reuse_compile  # noqa: E402
from reuse_compiler.models import cifarnet  # noqa: E402


def _one_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1))
    x = torch.relu(torch.randn(2, 8, 10, 10, dtype=torch.float64))
    gm = reuse_compile(model.double(), x, config=ReuseConfig(L=8, H=4, seed=1))
    assert not gm.reuse_plan.rows()[0].exact
    return model, gm, x


def _edited(gm, edit, *args):
    gm = copy.deepcopy(gm)
    edit(gm, "_0", *args)  # the chain of Sequential's conv "0"
    gm.graph.lint()
    gm.recompile()
    return gm


def _value_and_grads(m, x, g):
    m.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = m(xx)
    (y * g).sum().backward()
    w = next(p for n, p in m.named_parameters() if n.endswith("weight"))
    return y.detach(), w.grad.clone(), xx.grad.clone()


def test_mix_keeps_one_side_value_and_the_other_gradient():
    model, gm, x = _one_conv()
    g = torch.randn(2, 6, 10, 10, dtype=torch.float64)
    y_exact, gw_exact, gx_exact = _value_and_grads(model, x, g)
    y_reuse, gw_reuse, gx_reuse = _value_and_grads(gm, x, g)
    assert (y_reuse - y_exact).norm() > 1e-3 * y_exact.norm()  # the chain approximates
    assert (gw_reuse - gw_exact).norm() > 1e-3 * gw_exact.norm()
    y, gw, gx = _value_and_grads(_edited(gm, accuracy_gap._mix, "reuse"), x, g)
    torch.testing.assert_close(y, y_reuse)
    torch.testing.assert_close(gw, gw_exact)
    torch.testing.assert_close(gx, gx_exact)
    y, gw, gx = _value_and_grads(_edited(gm, accuracy_gap._mix, "exact"), x, g)
    torch.testing.assert_close(y, y_exact)
    torch.testing.assert_close(gw, gw_reuse)
    torch.testing.assert_close(gx, gx_reuse)


def test_sum_scale_preserves_each_output_channels_sum():
    model, gm, x = _one_conv()
    for m in (model, gm):
        m.get_submodule("0").bias.data.zero_()
    with pytest.raises(ValueError, match="per-pixel chain"):  # L = C: the rewrite's per-pixel chain
        _edited(gm, accuracy_gap._scale_sums)
    gm = accuracy_gap.generic_copy(gm)  # as accuracy_gap.build does for this variant
    scaled = _edited(gm, accuracy_gap._scale_sums)
    # a cluster's scaled outputs sum to n times its mean's output, the sum of its members'
    # exact outputs; so with a zero bias every channel's sum over the batch is exact
    y, y_norm, y_exact = scaled(x), gm(x), model(x)
    torch.testing.assert_close(y.sum(dim=(0, 2, 3)), y_exact.sum(dim=(0, 2, 3)))
    assert not torch.allclose(y_norm.sum(dim=(0, 2, 3)), y_exact.sum(dim=(0, 2, 3)))


def test_unit_norm_constant_changes_only_the_input_gradient():
    _, gm, x = _one_conv()
    st = copy.deepcopy(gm)
    next(n for n in st.graph.nodes if n.name == "_0_unit_centroids").target = accuracy_gap._unit_norm_constant
    st.recompile()
    g = torch.randn(2, 6, 10, 10, dtype=torch.float64)
    y0, gw0, gx0 = _value_and_grads(gm, x, g)
    y1, gw1, gx1 = _value_and_grads(st, x, g)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gw1, gw0)
    assert (gx1 - gx0).norm() > 1e-3 * gx0.norm()


def test_variant_names_are_checked_before_training():
    """A malformed variant is refused by name before any training starts."""
    for bad in (
        "refresh:0",
        "refresh:x",
        "warmup:0",
        "warmup:",
        "tail:0",
        "tail:",
        "stage:64",
        "dither:x",
        "dither:nan",
        "nope",
    ):
        with pytest.raises(SystemExit):
            accuracy_gap.main(["--seeds", "0", "--variants", "stock", bad])


def test_refresh_variant_sets_the_refit_interval():
    """``refresh:N`` is the main job's reuse with the hash planes refitted every N steps."""
    args = argparse.Namespace(layer="conv2", centroid="norm", norm_grad="off", exclude=[])
    torch.manual_seed(0)
    base = cifarnet(in_channels=1, image_size=12, width=0.125)
    x = torch.rand(4, 1, 12, 12)
    assert accuracy_gap.build("refresh:7", base, x, args, 0).reuse_config.hash_refresh == 7
    assert accuracy_gap.build("reuse", base, x, args, 0).reuse_config.hash_refresh == 20


_ARGS = dict(centroid="norm", norm_grad="off", exclude=[])  # accuracy_gap.build's arguments


def test_stage_variant_reuses_the_layer_even_where_the_measured_policy_keeps_it_exact():
    """``stage:L:H`` runs ``--layer`` at (L, H), also a layer the measured policy keeps exact
    (session 20: conv1); the other layers keep the stages of the ``reuse`` variant."""
    torch.manual_seed(0)
    base = cifarnet(in_channels=1, image_size=12, width=0.125)
    x = torch.rand(4, 1, 12, 12)

    def stages(gm):
        return {r.name: None if r.exact else (r.L, r.H) for r in gm.reuse_plan}

    reuse = stages(accuracy_gap.build("reuse", base, x, argparse.Namespace(**_ARGS, layer="conv2"), 0))
    for layer, (L, H) in (("conv1", (25, 10)), ("conv2", (8, 5))):
        args = argparse.Namespace(**_ARGS, layer=layer)
        got = stages(accuracy_gap.build(f"stage:{L}:{H}", base, x, args, 0))
        assert got == {**reuse, layer: (L, H)}


def test_vector_quantised_ids_are_nearest_codewords_and_zero_keeps_id_0():
    """``vq``: a fit returns H orthonormal directions and a codebook of 2^H - 1 centroids; a
    non-zero sub-vector's id is 1 + its nearest codeword (in the projection of its unit
    vector), a zero one's 0; leaving the context restores the sign hash."""
    from reuse_compiler.runtime import kernels, planes

    fit0, hash0 = planes.fit_planes, kernels._hash_rows
    g = torch.Generator().manual_seed(0)
    rows = torch.relu(torch.randn(600, 16, generator=g))
    rows[:50] = 0
    with accuracy_gap.vector_quantised() as vq:
        P = planes.fit_planes(rows, 3, torch.randn(16, 3, generator=g))
        torch.testing.assert_close(P.T @ P, torch.eye(3), atol=1e-5, rtol=0)
        ids = kernels._hash_rows(rows, P)
        assert vq["calls"] == 1
    assert (planes.fit_planes, kernels._hash_rows) == (fit0, hash0)
    assert ids.dtype == torch.int64 and (ids[:50] == 0).all() and (ids[50:] >= 1).all() and (ids < 8).all()
    # each non-zero row's codeword is nearer than every other row's codeword
    z = rows[50:] / rows[50:].norm(dim=1, keepdim=True) @ P
    used = ids[50:].unique()
    cw = torch.stack([z[ids[50:] == i].mean(0) for i in used])  # Lloyd's last step: means of the members
    d = torch.cdist(z, cw)
    own = d[torch.arange(len(z)), torch.searchsorted(used, ids[50:])]
    assert (own <= d.min(1).values + 0.05).float().mean() > 0.95  # members sit with their nearest mean


def test_vq_hashes_the_chunk_path_of_a_compiled_model():
    """Inside the context a compiled layer on the chunk path (L divides its input channels)
    trains with codebook ids: the hash is called and a training step runs forward and
    backward."""
    torch.manual_seed(0)
    base = cifarnet(in_channels=1, image_size=12, width=0.125)  # conv2: 8 -> 8 channels
    x = torch.rand(4, 1, 12, 12)
    config = ReuseConfig(L={"conv2": 8}, H={"conv2": 3}, hashing="pca", centroid="norm", norm_grad=False)
    with accuracy_gap.vector_quantised() as vq:
        gm = reuse_compile(copy.deepcopy(base), x, config=config)
        row = gm.reuse_plan["conv2"]
        assert (row.L, row.H, row.exact) == (8, 3, False)
        gm.train()
        y = gm(x)
        y.sum().backward()
    assert vq["calls"] >= 1
    assert torch.isfinite(y).all()
    grad = dict(gm.named_parameters())["conv2.weight"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_dither_turns_the_training_planes_within_their_span():
    """``dither:E``: each training forward of a fitted hash returns its planes turned by a new
    rotation of their own span (same subspace, orthonormal, other cells); eval forwards and
    the module's own planes are untouched, and leaving the context restores the hash."""
    from reuse_compiler.runtime import planes

    torch.manual_seed(0)
    base = cifarnet(in_channels=1, image_size=12, width=0.125)
    x = torch.rand(4, 1, 12, 12)
    config = ReuseConfig(L={"conv2": 8}, H={"conv2": 3}, hashing="pca", centroid="norm", norm_grad=False)
    gm = reuse_compile(copy.deepcopy(base), x, config=config)
    lh = next(m for m in gm.modules() if isinstance(m, planes.LayerHash) and m.hashing == "pca")
    xp = torch.relu(torch.randn(4, 10, 10, 8))
    forward0 = planes.LayerHash.forward
    lh.train()
    fitted = lh(xp, (5, 5), (1, 1), (1, 1)).clone()
    for eps in (0.0, 0.3):
        with accuracy_gap.dithered(eps, seed=0):
            a, b = (lh(xp, (5, 5), (1, 1), (1, 1)).clone() for _ in range(2))
            lh.eval()
            torch.testing.assert_close(lh(xp, (5, 5), (1, 1), (1, 1)), fitted)
            lh.train()
        for p in (a, b):
            torch.testing.assert_close(p.T @ p, torch.eye(3), atol=1e-5, rtol=0)
            proj = fitted @ (fitted.T @ p)  # the same span: projecting onto the fit changes nothing
            torch.testing.assert_close(proj, p, atol=1e-5, rtol=0)
        assert not torch.allclose(a, b) and not torch.allclose(a, fitted)
        torch.testing.assert_close(lh.planes, fitted)
    assert planes.LayerHash.forward is forward0


def test_peak_memory_leaves_out_what_existed_before_the_call():
    """``memory_peaks``: a call that only reads an 8 MiB tensor grows memory by ~0 (the old
    figure, with the pre-existing tensors, by 8 MiB); one that allocates a fresh 8 MiB
    tensor by 8 MiB; two live at once count twice."""
    from benchmarks.layers import memory_peaks, peak_bytes

    MiB = 2**20
    x = torch.ones(2 * MiB)  # 8 MiB

    def two():
        a = torch.ones(2 * MiB)
        b = a + 1
        return b

    growth, with_pre = memory_peaks(lambda: x.sum(), "cpu")
    assert growth < 0.01 * MiB and abs(with_pre - 8 * MiB) < 0.01 * MiB
    assert abs(peak_bytes(lambda: torch.empty(2 * MiB), "cpu") - 8 * MiB) < 0.01 * MiB
    assert abs(peak_bytes(two, "cpu") - 16 * MiB) < 0.01 * MiB


def test_timeline_peaks_from_raw_events():
    """The raw timeline's pre-existing tensors (action 1) are left out of the growth; the
    events of one timestamp count together."""
    from benchmarks.layers import PREEXISTING, timeline_peaks

    assert PREEXISTING == 1
    # 100 pre-existing; +10 at t=1; at t=2 +30 and -10 (peak 30, not 40); -30 at t=3
    events = [(-1, 1, 100, 0), (1, 2, 10, 0), (2, 2, 30, 0), (2, 4, -10, 0), (3, 4, -30, 0)]
    assert timeline_peaks(events) == (30, 130)
    assert timeline_peaks([(-1, 1, 100, 0)]) == (0, 100)


def test_ops_times_every_function_in_each_round():
    """``ops.time_round_robin``: one warm-up call each, then rounds calling each once."""
    from benchmarks import ops

    calls = []
    times = ops.time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4 and all(len(t) == 3 for t in times.values())
    assert ops.SHAPE == (128, 64, 14, 14)


def _gap_results(seeds, accs, losses):
    """accuracy_gap's results for stock and reuse: per seed, accs[v](seed, epoch) and losses."""
    return {
        f"{v}/{s}": {
            "test_acc": [accs[v](s, e) for e in range(1, 25)],
            "train_loss": [losses[v] / e for e in range(1, 25)],
            "stages": {},
        }
        for s in seeds
        for v in ("stock", "reuse")
    }


def test_accuracy_gap_long_report_windows_and_report_only(tmp_path, capsys):
    """24 epochs: windows 6-12, 13-18, 19-24 against stock, seeds below it, median training
    loss at each window's end, the epoch reaching stock's epoch-12 accuracy; --report-only
    prints it from the saved JSON (its own seeds, variants and epochs)."""
    assert accuracy_gap.windows(24) == [(6, 12), (13, 18), (19, 24)]
    assert accuracy_gap.windows(20) == [(6, 12), (13, 18), (19, 20)]
    # stock: 0.9 + e/1000; reuse 0.002 below on seed 0 and 0.001 above on seed 1 (epochs > 12)
    results = _gap_results(
        [0, 1],
        {
            "stock": lambda s, e: 0.9 + e / 1000,
            "reuse": lambda s, e: 0.9 + e / 1000 + (-0.002 if s == 0 else (0.001 if e > 12 else -0.001)),
        },
        {"stock": 0.12, "reuse": 0.24},
    )
    text = accuracy_gap.long_report(results, [0, 1], ["stock", "reuse"], 24)
    assert "| 6-12 | 0.9090 | 0.9075 | -0.15 pts | 2 of 2 |" in text
    assert "| 13-18 | 0.9155 | 0.9150 | -0.05 pts | 1 of 2 |" in text
    assert "| 24 | 0.005 | 0.01 |" in text  # median losses 0.12 / 24 and 0.24 / 24
    # stock's epoch-12 accuracy 0.912: seed 0's reuse reaches it at epoch 14, seed 1's at 13
    assert "| 0 | 0.9120 | 12 | 14 |" in text and "| 1 | 0.9120 | 12 | 13 |" in text
    out = tmp_path / "gap.json"
    saved_args = {"model": "cifarnet", "seeds": [0, 1], "variants": ["stock", "reuse"], "epochs": 24}
    out.write_text(json.dumps({"args": {**saved_args, "layer": "conv2"}, "results": results}))
    accuracy_gap.main(["--out", str(out), "--report-only", "--epochs", "12", "--seeds", "7"])
    printed = capsys.readouterr().out
    assert "--seeds 0 1 --variants stock reuse --epochs 24" in printed and "| 19-24 |" in printed


def test_accuracy_gap_time_to_target_estimate_from_epoch_counts(tmp_path, capsys):
    """--epoch-ratios: reuse and tail:E runs' time to stock's epoch-12 accuracy over stock's
    own, from the epochs each needs (a reuse epoch R, an exact one X of a stock epoch),
    misses counted as infinitely late in the median."""
    # stock reaches its epoch-12 accuracy (0.912) at epoch 12 on both seeds; reuse at 14
    # on seed 0 and never on seed 1; tail:10 at epoch 13 on both
    results = _gap_results(
        [0, 1],
        {
            "stock": lambda s, e: 0.9 + e / 1000,
            "reuse": lambda s, e: 0.9 + (e - 2) / 1000 if s == 0 else 0.9,
        },
        {"stock": 0.12, "reuse": 0.24},
    )
    for s in (0, 1):
        results[f"tail:10/{s}"] = {
            "test_acc": [0.9] * 12 + [0.95] * 12,
            "train_loss": [0.1] * 24,
            "stages": {},
        }
    text = accuracy_gap.time_to_target(results, [0, 1], ["reuse", "tail:10"], 0.5, 0.9)
    # reuse, seed 0: 14 reuse epochs = 7.0 stock epochs, over stock's 12
    assert f"| reuse | {7.0 / 12:.2f} | - | 1 of 2 | - |" in text
    # tail:10: 10 reuse epochs and 3 exact ones = 5.0 + 2.7 = 7.7 over 12, both seeds
    assert f"| tail:10 | {7.7 / 12:.2f} | {7.7 / 12:.2f} | 2 of 2 | {7.7 / 12:.2f}x |" in text
    # the report prints it only when asked, and --report-only reads the flag
    out = tmp_path / "gap.json"
    saved_args = {"model": "cifarnet", "seeds": [0, 1], "variants": ["stock", "reuse", "tail:10"], "epochs": 24}
    out.write_text(json.dumps({"args": saved_args, "results": results}))
    accuracy_gap.main(["--out", str(out), "--report-only"])
    assert "estimated from the epoch counts" not in capsys.readouterr().out
    accuracy_gap.main(["--out", str(out), "--report-only", "--epoch-ratios", "0.5", "0.9"])
    assert "a reuse epoch 0.5, an exact one 0.9 of a stock epoch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        accuracy_gap.main(["--out", str(out), "--report-only", "--epoch-ratios", "0", "0.9"])


def test_end_to_end_labels_runs_with_their_saved_arguments(tmp_path, capsys):
    """--report-only: the header and summary.json's "args" are the runs' saved training flags
    (those not at examples/train.py's defaults), not the command line's; the per-seed table
    gives the epoch at which stock and reuse first reach the target."""
    from benchmarks import end_to_end
    from examples.train import build_parser

    saved = {**vars(build_parser().parse_args([])), "reuse_epochs": 4, "max_error": 0.32, "norm_grad": "off"}
    assert end_to_end.saved_flags(saved) == ["--reuse-epochs", "4"]
    assert end_to_end.saved_flags({**saved, "no_progress": True, "seed": 3, "gone": 1}) == [
        "--reuse-epochs",
        "4",
        "gone=1",
    ]
    stock = {"train_time": 9.0, "epochs": [{"time": t, "test_acc": a} for t, a in [(3, 0.90), (6, 0.98), (9, 0.97)]]}
    reuse = {
        "train_time": 8.0,
        "switches": [],
        "epochs": [{"time": t, "test_acc": a} for t, a in [(2, 0.9), (4, 0.96), (6, 0.965), (8, 0.975)]],
    }
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "results.json").write_text(json.dumps({"args": saved, "stock": stock, "reuse": reuse}))
    end_to_end.main(["--seeds", "0", "--out", str(tmp_path), "--report-only", "--", "--epochs", "99"])
    printed = capsys.readouterr().out
    assert "end-to-end: examples/train.py --reuse-epochs 4\n" in printed and "--epochs 99\n" not in printed
    assert "| 0 | 0.9700 | 2 | 4 |" in printed  # stock reaches 0.97 at epoch 2, reuse at 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["args"] == ["--reuse-epochs", "4"] and summary["rows"][0]["stock_epoch_to_target"] == 2


def test_gpu_profile_times_stock_and_each_stage_per_batch(capsys):
    """gpu_profile.py's table (run on the CPU here; the profiler columns are GPU-only): one row
    per batch and variant, stock's ratio 1, the reuse stages timed on the same input."""
    from benchmarks import gpu_profile

    gpu_profile.main(["--device", "cpu", "--batches", "2,3", "--stages", "64,8;1600,8", "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in r] for r in rows if r[0].strip().isdigit()]
    assert [(r[0], r[1]) for r in rows] == [
        (b, v) for b in ("2", "3") for v in ("stock fp32", "reuse L=64,H=8", "reuse L=1600,H=8")
    ]
    assert all(float(r[3]) == 1.0 for r in rows if r[1] == "stock fp32")
    assert all(float(r[2]) > 0 for r in rows)


def test_timeline_segments_add_up_to_the_step(capsys):
    """timeline.py: every segment of both steps is timed, and with one timed step the segments
    add up to the step (the marks are contiguous); one table row per segment."""
    from benchmarks import timeline

    ms = timeline.main(["--repeats", "1", "--steps", "1", "--warmup", "1", "--batch-size", "8"])
    for name in ("stock", "reuse"):
        seg = [ms[name][m] for m, _ in timeline.SEGMENTS]
        assert all(t > 0 for t in seg)
        assert sum(seg) == pytest.approx(ms[name]["step"], rel=1e-6)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(timeline.SEGMENTS) + 1  # header, segments, step


def test_chain_ops_times_the_chain_ops_and_kernels(capsys):
    """chain_ops.py: the op table has the chain's custom ops, each called once per step (the
    backward's through the tensor hooks), and none of the stock layers' ops (no convolution,
    no pooling); with the C++ kernels on, the kernel table has the reconstruction both ways."""
    from benchmarks import chain_ops
    from reuse_compiler.runtime import extension

    out = chain_ops.main(["--steps", "2", "--warmup", "1", "--batch-size", "32", "--limit", "0"])
    ops = {name: calls for name, _, calls in out["ops"]}
    # one chain per call, or one per channel slice (the calibration's pick at this batch, e.g.
    # L=32 H=8: two per-pixel chains); the generic chain clusters with `cluster`
    n = ops["reuse.reconstruct.default"]
    cluster = "cluster_pixels" if "reuse.cluster_pixels.default" in ops else "cluster"
    assert n in (1, 2)
    for op in ("reconstruct_grad", cluster, "lsh_hash", "im2col", "centroid_gemm"):
        assert ops[f"reuse.{op}.default"] == n
    assert not any("convolution" in name or "max_pool" in name or "addmm" in name for name in ops)
    if extension.get() is not None:
        kernels = {name: calls for name, _, calls in out["kernels"]}
        prefix = "pixel_" if cluster == "cluster_pixels" else ""
        assert kernels[f"{prefix}reconstruct"] == n and kernels[f"{prefix}reconstruct_backward"] == n
    assert out["step_ms"] > 0
    assert "| call | ms per step | calls per step |" in capsys.readouterr().out


def test_pixel_ab_stage_takes_L_comma_H(capsys):
    """pixel_ab.py --stage L,H: a malformed stage is a usage error before anything is built."""
    from benchmarks import pixel_ab

    for bad in ("32", "32,x", "32,8,1"):
        with pytest.raises(SystemExit):
            pixel_ab.main(["--stage", bad])
        assert "--stage: expected L,H" in capsys.readouterr().err


def test_step_force_takes_stages_as_L_comma_H(capsys):
    """step.py --force L,H: a malformed stage is a usage error before anything is built."""
    from benchmarks import step

    for bad in ("32", "32,x", "32,8,1"):
        with pytest.raises(SystemExit):
            step.main(["--force", bad])
        assert "--force: expected L,H" in capsys.readouterr().err
