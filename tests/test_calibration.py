"""The measured policy: candidates filtered to faster-than-exact and ordered by time; cached."""

import pytest
import torch

from reuse_compiler import ReuseConfig, reuse_compile
from reuse_compiler import calibration as cal
from reuse_compiler.models import cifarnet


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REUSE_COMPILER_CACHE", str(tmp_path))
    return tmp_path / "calibration.json"


def test_measured_policy_orders_and_filters(cache):
    x = torch.randn(8, 1, 28, 28)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.5), x, config=ReuseConfig(policy="measured"))
    assert cache.exists()
    for row in gm.reuse_plan:
        calib = row.calibration
        assert calib is not None and calib["exact_ms"] > 0
        assert len(calib["candidates"]) >= 1
        for c in calib["candidates"]:
            assert c["ms"] > 0 and 0 < c["r_c"] <= 1 and c["ratio"] == pytest.approx(c["ms"] / calib["exact_ms"])
            assert c["ratio_min"] > 0
            assert c["predicted"] == pytest.approx(c["H"] / row.M + c["r_c"] + 1 / c["L"])
            assert 0 <= c["error"] < 2
        faster = sorted(
            (c for c in calib["candidates"] if c["ratio"] <= 0.95 and c["ratio_min"] <= 0.95), key=lambda c: c["ms"]
        )
        if faster:
            assert row.candidates == [(c["L"], c["H"]) for c in faster]
            assert (row.L, row.H) == row.candidates[0] and row.time_ratio == faster[0]["ratio"] <= 0.95
        else:
            assert row.exact and "no candidate is faster" in row.reason
    # the batch needs no gradient, so conv1 is timed as training runs it: no input gradient
    assert [r.calibration["input_grad"] for r in gm.reuse_plan] == [False, True]
    gm(x)
    assert "time" in str(gm.reuse_plan) and "err" in str(gm.reuse_plan)
    for row in gm.reuse_plan:
        if not row.exact:
            assert row.output_error == next(
                c["error"] for c in row.calibration["candidates"] if (c["L"], c["H"]) == (row.L, row.H)
            )


@pytest.mark.parametrize("hashing", ["random", "pca"])
def test_calibration_error_is_the_relative_output_error(cache, hashing):
    """The recorded error is ||y - y_exact|| / ||y_exact|| of the stage on the calibration
    input, with the planes training would use: the layer's random family, or (pca) planes
    fitted to that input."""
    import torch.nn.functional as F

    from reuse_compiler.runtime.ops import im2col, reuse_conv2d
    from reuse_compiler.runtime.planes import fit_to_input
    from reuse_compiler.runtime.state import layer_planes

    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    cfg = ReuseConfig(policy="measured", hashing=hashing)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg)
    row = gm.reuse_plan["conv1"]
    w, b = gm.conv1.weight.detach(), gm.conv1.bias.detach()
    y_exact = F.conv2d(x, w, b, padding=2)
    xp = im2col(x, [5, 5], [1, 1], [2, 2, 2, 2], [1, 1])
    for c in row.calibration["candidates"]:
        planes = layer_planes(0, "conv1", c["L"], c["H"])  # the layer's own family
        if hashing == "pca":
            planes = fit_to_input(xp, [5, 5], [1, 1], [1, 1], planes)
        y, _ = reuse_conv2d(x, w, b, planes, [5, 5], [1, 1], [2, 2, 2, 2], [1, 1])
        assert c["error"] == pytest.approx(float((y - y_exact).norm() / y_exact.norm()), rel=1e-4)


def test_max_error_filters_candidates(cache, monkeypatch):
    """Faster-than-exact candidates with error > max_error are dropped (timings and errors
    injected, so the test does not depend on this machine's speed)."""

    def fake(
        row, x, weight, bias, repeats, centroid, input_grad, seed, hashing="random", norm_grad=True, zero_skip=False
    ):
        n = len(row.candidates)
        return {
            "exact_ms": 10.0,
            "input_grad": input_grad,
            "candidates": [
                {
                    "L": L,
                    "H": H,
                    "ms": 5.0 + i,
                    "ratio": (5.0 + i) / 10,
                    "ratio_min": (5.0 + i) / 10,
                    "r_c": 0.1,
                    "predicted": 0.5,
                    "error": 0.9 - 0.8 * i / max(n - 1, 1),
                }
                for i, (L, H) in enumerate(row.candidates)
            ],
        }

    monkeypatch.setattr(cal, "calibrate", fake)
    x = torch.randn(8, 1, 28, 28)
    model = cifarnet(in_channels=1, image_size=28, width=0.5)
    free = reuse_compile(model, x, config=ReuseConfig(policy="measured"))
    gm = reuse_compile(model, x, config=ReuseConfig(policy="measured", max_error=0.5))
    for row, ref in zip(gm.reuse_plan, free.reuse_plan):
        kept = [(c["L"], c["H"]) for c in ref.calibration["candidates"] if c["ratio"] <= 0.95 and c["error"] <= 0.5]
        assert kept and row.candidates == kept and len(kept) < len(free.reuse_plan[row.name].candidates)
        assert (row.L, row.H) == kept[0] and row.output_error <= 0.5
    tight = reuse_compile(model, x, config=ReuseConfig(policy="measured", max_error=0.01))
    for row in tight.reuse_plan:
        assert row.exact and "max_error=0.01" in row.reason


def test_calibration_times_the_input_in_its_memory_format(cache, monkeypatch):
    """A channels-last model is timed channels-last (stock's fastest layout for it)."""
    seen = []
    exact_fn = cal._exact_fn
    monkeypatch.setattr(cal, "_exact_fn", lambda x, *a: seen.append(x) or exact_fn(x, *a))
    model = cifarnet(in_channels=1, image_size=28, width=0.25).to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    reuse_compile(model, x, config=ReuseConfig(policy="measured", calibration_repeats=1))
    assert len(seen) == 2 and seen[1].is_contiguous(memory_format=torch.channels_last)
    assert not seen[1].is_contiguous()


def test_calibration_is_cached(cache, monkeypatch):
    x = torch.randn(4, 1, 28, 28)
    cfg = ReuseConfig(policy="measured", calibration_repeats=1)
    first = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg)

    def boom(*a, **k):
        raise AssertionError("re-timed a cached layer")

    monkeypatch.setattr(cal, "_stage_fn", boom)
    monkeypatch.setattr(cal, "_exact_fn", boom)
    second = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg)
    assert [r.calibration for r in first.reuse_plan] == [r.calibration for r in second.reuse_plan]


def _cached_then_spied(monkeypatch):
    """Compile a small CifarNet with the measured policy once (its timings cached), then record
    every stage timed from then on: returns ``(compile, timed, x)``, ``compile()`` compiling it
    again on ``x`` and ``timed`` the stages timed since the first compile."""
    x = torch.randn(4, 1, 28, 28)
    cfg = ReuseConfig(policy="measured", calibration_repeats=1)

    def compile_():
        return reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg)

    compile_()
    timed = []
    stage_fn = cal._stage_fn
    monkeypatch.setattr(cal, "_stage_fn", lambda *a, **k: timed.append(a) or stage_fn(*a, **k))
    return compile_, timed, x


def test_calibration_is_redone_under_other_process_settings(cache, monkeypatch):
    """Timings taken with glibc malloc tuned (examples/train.py's tune_malloc) are not reused by
    a process without it, nor the other way round: the settings are part of the cache key."""
    monkeypatch.setattr(cal, "CACHE_TAGS", set())
    compile_, timed, _ = _cached_then_spied(monkeypatch)
    cal.CACHE_TAGS.add("glibc malloc tuned (test)")
    compile_()
    assert timed
    timed.clear()
    compile_()
    assert not timed  # the same settings: cached


def test_tune_malloc_tags_the_calibration(monkeypatch):
    from examples.train import tune_malloc

    monkeypatch.setattr(cal, "CACHE_TAGS", set())
    if tune_malloc():
        assert any("malloc tuned" in t for t in cal.CACHE_TAGS)
    else:
        assert not cal.CACHE_TAGS


def test_calibration_is_redone_when_the_kernels_change(cache, monkeypatch):
    from reuse_compiler.runtime import extension

    compile_, timed, _ = _cached_then_spied(monkeypatch)
    monkeypatch.setattr(extension, "fingerprint", lambda: "other kernels")
    compile_()
    assert timed  # the cached timings belong to other kernels: measured again


def test_bad_policy():
    with pytest.raises(ValueError, match="ReuseConfig.policy"):
        ReuseConfig(policy="fastest")


def test_max_time_ratio_is_the_margin(cache, monkeypatch):
    """Candidates measured slower than max_time_ratio x exact are dropped (injected timings)."""

    def fake(
        row, x, weight, bias, repeats, centroid, input_grad, seed, hashing="random", norm_grad=True, zero_skip=False
    ):
        ratios = [0.5, 0.9, 0.97, 1.2] + [1.5] * (len(row.candidates) - 4)
        cands = [
            {"L": L, "H": H, "ms": 10 * r, "ratio": r, "ratio_min": r, "r_c": 0.1, "predicted": 0.5, "error": 0.3}
            for (L, H), r in zip(row.candidates, ratios)
        ]
        return {"exact_ms": 10.0, "input_grad": input_grad, "candidates": cands}

    monkeypatch.setattr(cal, "calibrate", fake)
    x = torch.randn(4, 1, 28, 28)
    model = cifarnet(in_channels=1, image_size=28, width=0.25)
    for margin, n in ((0.95, 2), (1.0, 3), (0.6, 1)):
        gm = reuse_compile(model, x, config=ReuseConfig(policy="measured", max_time_ratio=margin))
        assert all(len(r.candidates) == n for r in gm.reuse_plan)
    gm = reuse_compile(model, x, config=ReuseConfig(policy="measured", max_time_ratio=0.4))
    assert all(r.exact and "max_time_ratio 0.4" in r.reason for r in gm.reuse_plan)


def test_a_slow_phase_of_the_exact_runs_keeps_nothing(cache, monkeypatch):
    """A candidate is kept only if both the medians' ratio and the fastest runs' ratio are within
    the margin: an inflated exact median (a slow phase of the machine) makes a candidate look
    fast by the medians only (injected timings)."""

    def fake(
        row, x, weight, bias, repeats, centroid, input_grad, seed, hashing="random", norm_grad=True, zero_skip=False
    ):
        pairs = [(0.8, 1.25), (0.9, 0.9)] + [(1.5, 1.5)] * (len(row.candidates) - 2)
        cands = [
            {"L": L, "H": H, "ms": 10 * r, "ratio": r, "ratio_min": rm, "r_c": 0.1, "predicted": 0.5, "error": 0.3}
            for (L, H), (r, rm) in zip(row.candidates, pairs)
        ]
        return {"exact_ms": 10.0, "input_grad": input_grad, "candidates": cands}

    monkeypatch.setattr(cal, "calibrate", fake)
    gm = reuse_compile(
        cifarnet(in_channels=1, image_size=28, width=0.25),
        torch.randn(4, 1, 28, 28),
        config=ReuseConfig(policy="measured"),
    )
    for row in gm.reuse_plan:
        assert row.candidates == [(c["L"], c["H"]) for c in row.calibration["candidates"][1:2]]


@pytest.mark.parametrize("bad", [0, 1.5, "0.9", True])
def test_bad_max_time_ratio(bad):
    with pytest.raises(ValueError, match="ReuseConfig.max_time_ratio"):
        ReuseConfig(policy="measured", max_time_ratio=bad)


@pytest.mark.parametrize("bad", [0, -0.1, "0.3", True])
def test_bad_max_error(bad):
    with pytest.raises(ValueError, match="ReuseConfig.max_error"):
        ReuseConfig(policy="measured", max_error=bad)


def test_max_error_needs_the_measured_policy():
    with pytest.raises(ValueError, match="policy='measured'"):
        ReuseConfig(max_error=0.3)


def test_calibration_times_both_chains_where_the_per_pixel_chain_fits(cache):
    """Where the per-pixel chain fits (L = C, or L dividing C: one chain per channel slice)
    both chains are timed and the entry says which one the stage runs (the generic chain only
    if clearly faster: GENERIC_MARGIN); elsewhere only the generic chain exists."""
    from reuse_compiler.runtime import extension, kernels

    x = torch.randn(8, 1, 28, 28)
    config = ReuseConfig(policy="measured", l_values="extended")
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=config)
    row = gm.reuse_plan["conv2"]  # 16 -> 16 channels, 5x5
    cands = {(c["L"], c["H"]): c for c in row.calibration["candidates"]}

    def fits(L):
        return kernels.pixel_slices(row.in_channels, L, row.stride, row.kernel_size) > 0

    assert any(L == row.in_channels for L, _ in cands) and any(L < row.in_channels and fits(L) for L, _ in cands)
    for (L, _), c in cands.items():
        if fits(L) and extension.get() is not None:
            assert c["ms_pixel"] > 0 and c["ms_generic"] > 0
            want = "generic" if c["ms_generic"] <= cal.GENERIC_MARGIN * c["ms_pixel"] else "pixel"
            assert c["chain"] == want and c["ms"] == pytest.approx(c[f"ms_{want}"])
        else:
            assert c["chain"] == "generic" and "ms_pixel" not in c


def test_the_rewrite_runs_the_chain_the_calibration_chose(cache, monkeypatch):
    """A stage whose calibration entry says "generic" is rewritten with the generic chain even
    where the per-pixel chain fits, with the same output; "pixel" (or no entry) keeps the
    per-pixel chain (injected timings)."""
    from reuse_compiler.passes import rebuild
    from reuse_compiler.runtime import extension

    if extension.get() is None:
        pytest.skip("the rewrite emits the per-pixel chain only with the C++ kernels")

    def fake(
        row, x, weight, bias, repeats, centroid, input_grad, seed, hashing="random", norm_grad=True, zero_skip=False
    ):
        cands = [
            {"L": L, "H": H, "ms": 1.0, "ratio": 0.5, "ratio_min": 0.5, "r_c": 0.1, "predicted": 0.5, "error": 0.3}
            | {"chain": "generic" if L == row.in_channels // row.groups else "pixel"}
            for L, H in row.candidates
        ]
        return {"exact_ms": 2.0, "input_grad": input_grad, "candidates": cands}

    monkeypatch.setattr(cal, "calibrate", fake)
    x = torch.rand(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    model = cifarnet(in_channels=1, image_size=28, width=0.25).to(memory_format=torch.channels_last)
    gm = reuse_compile(model, x, config=ReuseConfig(policy="measured", l_values="extended"))
    row = gm.reuse_plan["conv2"]
    stage = next((L, H) for L, H in row.candidates if L == row.in_channels)

    def targets():
        return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    from reuse_compiler import set_stage

    set_stage(gm, "conv2", L=stage[0], H=stage[1])
    assert row.generic_chain
    assert "reuse.cluster_norms.default" in targets() and "reuse.cluster_pixels_norms.default" not in targets()
    y_generic = gm(x)
    for c in row.calibration["candidates"]:
        c["chain"] = "pixel"
    rebuild(gm)
    assert not row.generic_chain and "reuse.cluster_pixels_norms.default" in targets()
    torch.testing.assert_close(gm(x), y_generic, rtol=0, atol=0)


def test_calibration_under_autocast_has_its_own_cache_entries(cache, monkeypatch):
    """Compiled under torch.autocast, the measured policy times the exact convolution in the
    lower precision (as training under autocast runs it): those timings are cached apart from
    the float32 ones, both ways, and the float32 key is as before."""
    compile_, timed, x = _cached_then_spied(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = compile_()
    assert timed  # not the float32 entries
    assert torch.isfinite(gm(x)).all()
    timed.clear()
    compile_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compile_()
    assert not timed  # each cached under its own key
    assert cal._autocast_tag(x) == []
