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
            assert c["predicted"] == pytest.approx(c["H"] / row.M + c["r_c"] + 1 / c["L"])
        faster = sorted((c for c in calib["candidates"] if c["ratio"] < 1), key=lambda c: c["ms"])
        if faster:
            assert row.candidates == [(c["L"], c["H"]) for c in faster]
            assert (row.L, row.H) == row.candidates[0] and row.time_ratio == faster[0]["ratio"] < 1
        else:
            assert row.exact and "no candidate is faster" in row.reason
    gm(x)
    assert "time" in str(gm.reuse_plan)


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


def test_calibration_is_redone_when_the_kernels_change(cache, monkeypatch):
    from reuse_compiler.runtime import extension

    x = torch.randn(4, 1, 28, 28)
    cfg = ReuseConfig(policy="measured", calibration_repeats=1)
    reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg)
    timed = []
    stage_fn = cal._stage_fn
    monkeypatch.setattr(cal, "_stage_fn", lambda *a, **k: timed.append(a) or stage_fn(*a, **k))
    monkeypatch.setattr(extension, "fingerprint", lambda: "other kernels")
    reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg)
    assert timed  # the cached timings belong to other kernels: measured again


def test_bad_policy():
    with pytest.raises(ValueError, match="ReuseConfig.policy"):
        ReuseConfig(policy="fastest")
