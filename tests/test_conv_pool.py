"""The first block in one op (``reuse.conv_pool``): conv -> max_pool2d (-> ReLU) for an input
that needs no gradient. Its output equals the stock layers' (``reference_conv_pool``) up to
float rounding, its window positions are max_pool2d's (ties and NaNs included), its weight and
bias gradients equal stock's, float64 gradcheck and ``opcheck`` pass, on the C++ kernels and
on the plain-PyTorch fallback; the measured policy's choice reaches the rewritten graph, which
trains as the unfused model, pickles, deep-copies and runs under torch.compile."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from reuse_compiler import ReuseConfig, reuse_compile
from reuse_compiler import calibration as cal
from reuse_compiler.models import cifarnet
from reuse_compiler.passes.analysis import pool_block, trace
from reuse_compiler.passes.conv_rewrite import rewritten_graph
from reuse_compiler.runtime.ops import conv_pool, conv_pool_block
from reuse_compiler.runtime.reference import reference_conv_pool

from conftest import adam_steps, digits_like, fake_calibrate, kernel_backend


@pytest.fixture(autouse=True, params=["cpp", "torch"])
def backend(request):
    """Every kernel test runs on the C++ kernel and on the fallback (the reference's stock ops)."""
    with kernel_backend(request.param):
        yield request.param


# (C, M, kernel, padding, pool [k, s, p], relu)
BLOCKS = [
    (1, 64, 5, 2, [3, 2, 1], True),  # CifarNet's conv1 + pool1 + ReLU: one 64-channel block
    (3, 70, 3, 1, [2, 2, 0], False),  # a block and 6 channels past it, no ReLU
    (2, 16, 5, 0, [3, 1, 1], True),  # overlapping windows at stride 1, no conv padding
    (1, 8, 3, 1, [1, 1, 0], True),  # a 1x1 pool: max and ReLU only
]


def _input(C, dtype, skip=0.5, Nb=3, H=12, W=11):
    """A third of each image one value per channel (``skip``), as a digit's blank background."""
    x = torch.randn(Nb, C, H, W, dtype=dtype)
    x[:, :, : H // 3] = skip
    return x


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_and_gradients_equal_the_stock_layers(block, dtype, layout):
    C, M, k, p, pool, relu = block
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = _input(C, dtype).contiguous(memory_format=fmt)
    w = torch.randn(M, C, k, k, dtype=dtype).contiguous(memory_format=fmt)
    b = torch.randn(M, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for skip in ([0.5] * C, None):
        out, idx = conv_pool(x, w, b, [p, p], pool, relu, skip)
        ref, ref_idx = reference_conv_pool(x, w, b, [p, p], pool, relu)
        torch.testing.assert_close(out, ref, **tol)
        _check_positions(x, w, b, p, pool, relu, out, idx, tol)
        # the output's memory format is the one stock's layers give
        stock = F.max_pool2d(F.conv2d(x, w, b, 1, p), *pool)
        assert out.is_contiguous(memory_format=torch.channels_last) == stock.is_contiguous(
            memory_format=torch.channels_last
        )
        assert out.is_contiguous() == stock.is_contiguous()
        g = torch.randn_like(ref)
        grads = []
        for f in (
            lambda w, b, skip=skip: conv_pool(x, w, b, [p, p], pool, relu, skip)[0],
            lambda w, b: _stock(x, w, b, p, pool, relu),
        ):
            ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
            grads.append(torch.autograd.grad(f(ww, bb), (ww, bb), g))
        for a, c in zip(*grads):
            torch.testing.assert_close(a, c, **tol)


def _check_positions(x, w, b, p, pool, relu, out, idx, tol):
    """Each position in ``idx`` holds its window's maximum of stock's convolution output (where
    a blank background makes windows tie, float rounding may pick another of the tied positions
    than stock does: their inputs, and so their gradients, are the same), and 255 exactly where
    the ReLU cuts the gradient."""
    y = F.conv2d(x, w, b, 1, p)
    k, s, pp = pool
    Nb, M, Ph, Pw = out.shape
    live = idx.permute(0, 3, 1, 2).long()
    dead = live == 255
    local = torch.where(dead, 0, live)
    ih = (torch.arange(Ph) * s - pp).view(Ph, 1) + local // k
    iw = (torch.arange(Pw) * s - pp).view(1, Pw) + local % k
    assert bool(((ih >= 0) & (ih < y.shape[2]) & (iw >= 0) & (iw < y.shape[3]))[~dead].all())
    at = y.flatten(2).gather(2, (ih.clamp(0, y.shape[2] - 1) * y.shape[3] + iw.clamp(0, y.shape[3] - 1)).flatten(2))
    pooled = F.max_pool2d(y, k, s, pp)
    torch.testing.assert_close(at.view_as(pooled)[~dead], pooled[~dead], **tol)
    assert torch.equal(dead, ~(pooled > 0)) if relu else not bool(dead.any())


def _stock(x, w, b, p, pool, relu):
    y = F.max_pool2d(F.conv2d(x, w, b, 1, p), *pool)
    return F.relu(y) if relu else y


@pytest.mark.parametrize("block", BLOCKS)
def test_positions_are_max_pool2ds_without_ties(block):
    """Blank pixels scattered (no two windows alike): the positions are max_pool2d's own."""
    C, M, k, p, pool, relu = block
    torch.manual_seed(4)
    x = torch.randn(3, C, 12, 11, dtype=torch.float64)
    x = torch.where(torch.rand_like(x) < 0.4, torch.full_like(x, 0.5), x)
    w, b = torch.randn(M, C, k, k, dtype=torch.float64), torch.randn(M, dtype=torch.float64)
    out, idx = conv_pool(x, w, b, [p, p], pool, relu, [0.5] * C)
    ref, ref_idx = reference_conv_pool(x, w, b, [p, p], pool, relu)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("block", BLOCKS)
def test_weight_and_bias_gradients_equal_stocks(block):
    C, M, k, p, pool, relu = block
    torch.manual_seed(1)
    x = _input(C, torch.float64)
    w, b = torch.randn(M, C, k, k, dtype=torch.float64), torch.randn(M, dtype=torch.float64)
    g = torch.randn_like(_stock(x, w, b, p, pool, relu))
    grads = []
    for f in (
        lambda w, b: conv_pool(x, w, b, [p, p], pool, relu, [0.5] * C)[0],
        lambda w, b: _stock(x, w, b, p, pool, relu),
    ):
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        grads.append(torch.autograd.grad(f(ww, bb), (ww, bb), g))
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_ties_and_nans_pick_max_pool2ds_positions():
    """A constant image (every window a tie), and NaNs: the positions max_pool2d's backward
    routes to, and its NaN output with no gradient behind the ReLU."""
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    x = torch.full((2, 1, 9, 9), 0.25, dtype=torch.float64)
    x[1, 0, 4, 4] = float("nan")
    for relu in (True, False):
        out, idx = conv_pool(x, w, b, [1, 1], [3, 2, 1], relu, [0.25])
        ref, ref_idx = reference_conv_pool(x, w, b, [1, 1], [3, 2, 1], relu)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert torch.equal(idx, ref_idx)
        assert out[1].isnan().any()


def test_gradcheck_and_opcheck():
    torch.manual_seed(2)
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    for relu in (True, False):
        assert torch.autograd.gradcheck(lambda w, b, r=relu: conv_pool(x, w, b, [1, 1], [3, 2, 1], r, None)[0], (w, b))
    opcheck(conv_pool, (x, w, b, [1, 1], [3, 2, 1], True, [0.0, 0.0]))
    opcheck(conv_pool, (x.float(), w.detach().float(), None, [1, 1], [2, 2, 0], False, None))


def test_the_block_helper_runs_the_layers_for_an_input_that_requires_grad():
    """conv_pool computes no input gradient: the helper runs the stock layers for such an input,
    and the op itself says so if asked."""
    torch.manual_seed(3)
    x = _input(1, torch.float32).requires_grad_()
    w, b = torch.randn(8, 1, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    y = conv_pool_block(x, w, b, [1, 1], [3, 2, 1], True, [0.5])
    torch.testing.assert_close(y, _stock(x, w, b, 1, [3, 2, 1], True))
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no input gradient"):
        conv_pool(x, w, b, [1, 1], [3, 2, 1], True, [0.5])[0].sum().backward()
    with pytest.raises(ValueError, match="2 skip values for an input of 1 channels"):
        conv_pool(x.detach(), w, b, [1, 1], [3, 2, 1], True, [0.5, 0.5])


def test_pool_block_finds_the_pattern():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Conv2d(1, 4, 3, padding=1) for _ in range(3))
            self.pool = torch.nn.MaxPool2d(2)
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            y = self.relu(self.pool(self.a(x)))  # module pool, module ReLU
            z = F.max_pool2d(self.b(x), 3, 2, 1).relu()  # functional pool, method ReLU
            u = self.c(x)
            return y.sum() + z.sum() + F.max_pool2d(u, 2, ceil_mode=True).sum() + u.sum()

    gm = trace(Net(), (torch.randn(1, 1, 8, 8),))
    assert pool_block(gm, "a") == {"pool": "pool", "relu": "relu", "kernel": 2, "stride": 2, "padding": 0}
    assert pool_block(gm, "b") == {"pool": "max_pool2d", "relu": "relu_1", "kernel": 3, "stride": 2, "padding": 1}
    assert pool_block(gm, "c") is None  # two users (and a ceil-mode pool)


def _fake_block(ms):
    """calibrate_block with the one op at ``ms`` against stock's 20 ms and zero-skip's 15 ms."""

    def fake(row, x, weight, bias, block, skip, repeats=3):
        return {
            "ms": ms,
            "ms_stock": 20.0,
            "ms_zero_skip": None if skip is None else 15.0,
            "ratio": ms / 20.0,
            "ratio_min": ms / 20.0,
            "rounds": 3,
            "skip": skip,
            "pool": block,
        }

    return fake


def test_the_measured_policy_picks_it_and_the_rewrite_emits_it(monkeypatch, backend):
    if backend != "cpp":
        pytest.skip("the measured policy times it only with the C++ kernels")
    monkeypatch.setattr(cal, "calibrate", fake_calibrate(0.6))
    monkeypatch.setattr(cal, "calibrate_block", _fake_block(8.0))
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=28, width=0.25)
    x = digits_like()
    gm = reuse_compile(model, x, config=ReuseConfig(policy="measured"))
    row = gm.reuse_plan["conv1"]
    assert row.exact and row.fused_block and row.time_ratio == 0.4
    assert "exact, fused with pool1" in str(gm.reuse_plan)
    # conv2's input needs a gradient: it is not fused
    assert gm.reuse_plan["conv2"].exact_kernel == "zero-skip"
    assert gm.code.count("conv_pool_block(") == 1 and "pool1" not in gm.code
    assert "conv_pool_block" not in rewritten_graph(gm, record=False).python_code("self").src
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    # two Adam steps: the parameters of the unfused model
    y = torch.arange(8) % 10
    for a, b in zip(
        adam_steps(model, x, y), adam_steps(gm, x, y)
    ):  # (Adam's first steps magnify rounding: ~1e-5 in a weight of ~0.02)
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    gm2 = pickle.loads(pickle.dumps(gm))  # re-traces its code: conv_pool_block records itself
    assert "conv_pool_block" in gm2.code
    torch.testing.assert_close(gm2(x), gm(x), rtol=0, atol=0)
    assert "conv_pool_block" in copy.deepcopy(gm).code


@pytest.mark.parametrize(("ms", "fuse_pool"), [(16.0, True), (8.0, False)])
def test_it_is_not_picked_when_slow_or_off(monkeypatch, backend, ms, fuse_pool):
    """Slower than the zero-skipping layers (16 against 15 ms), or ``fuse_pool=False``."""
    if backend != "cpp":
        pytest.skip("one backend is enough")
    monkeypatch.setattr(cal, "calibrate", fake_calibrate(0.6))
    monkeypatch.setattr(cal, "calibrate_block", _fake_block(ms))
    gm = reuse_compile(
        cifarnet(in_channels=1, image_size=28, width=0.25),
        digits_like(),
        config=ReuseConfig(policy="measured", fuse_pool=fuse_pool),
    )
    assert gm.reuse_plan["conv1"].exact_kernel == "zero-skip" and "conv_pool_block" not in gm.code


def test_config_checks_fuse_pool():
    with pytest.raises(ValueError, match="ReuseConfig.fuse_pool must be True or False"):
        ReuseConfig(fuse_pool=1)


def test_calibrate_block_times_the_three_ways(tmp_path, monkeypatch, backend):
    if backend != "cpp":
        pytest.skip("timed only with the C++ kernels")
    monkeypatch.setenv("REUSE_COMPILER_CACHE", str(tmp_path))
    model = cifarnet(in_channels=1, image_size=28, width=0.25)
    x = digits_like()
    gm = trace(model, (x,))
    row = next(r for r in reuse_compile(model, x, config=ReuseConfig(policy="paper")).reuse_plan if r.name == "conv1")
    block = pool_block(gm, "conv1")
    assert cal.block_fits(row, x, model.conv1.weight, input_grad=False)
    assert not cal.block_fits(row, x, model.conv1.weight, input_grad=True)
    out = cal.calibrate_block(row, x, model.conv1.weight, model.conv1.bias, block, [-0.42], repeats=2)
    assert out["ms"] > 0 and out["ms_stock"] > 0 and out["ms_zero_skip"] > 0
    assert out["ratio"] == pytest.approx(out["ms"] / out["ms_stock"]) and out["pool"] == block
    again = cal.calibrate_block(row, x, model.conv1.weight, model.conv1.bias, block, [-0.42], repeats=2)
    assert again == out  # from the cache


def test_torch_compile_runs_it(monkeypatch, backend):
    """torch.compile (aot_eager) over a module with the fused block: the op's fake and autograd
    formulas trace, and two Adam steps give eager's parameters."""
    if backend != "cpp":
        pytest.skip("one backend is enough")
    monkeypatch.setattr(cal, "calibrate", fake_calibrate(0.6))
    monkeypatch.setattr(cal, "calibrate_block", _fake_block(8.0))
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = digits_like(), torch.arange(8) % 10
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=ReuseConfig(policy="measured"))
    assert gm.reuse_plan["conv1"].fused_block
    for a, b in zip(adam_steps(gm, x, y), adam_steps(gm, x, y, compile=True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
