"""Zero-skipping exact layers (``reuse.zero_skip_conv2d``): the forward is F.conv2d's bit for
bit, the weight and bias gradients equal the plain im2col sums (``reference_weight_grad``) and
stock's up to rounding, on every path of the C++ kernel (register-blocked rows of 64 output
channels, the channels past them, strides, dilations, kernels wider than 7), with and without
a skipped common value; and the measured policy's choice reaches the rewritten graph."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from reuse_compiler import ReuseConfig, reuse_compile
from reuse_compiler import calibration as cal
from reuse_compiler.models import cifarnet
from reuse_compiler.passes.conv_rewrite import rewritten_graph
from reuse_compiler.plan import LayerPlan
from reuse_compiler.runtime import extension
from reuse_compiler.runtime.ops import exact_conv2d, zero_skip_conv2d
from reuse_compiler.runtime.reference import reference_weight_grad

from conftest import adam_steps, digits_like, fake_calibrate, kernel_backend


@pytest.fixture(autouse=True, params=["cpp", "torch"])
def backend(request):
    """Every kernel test runs on the C++ kernel and on the fallback (ATen's own gradients)."""
    with kernel_backend(request.param):
        yield request.param


# (C, M, kernel, stride, padding (top, left), dilation)
SHAPES = [
    (1, 64, (5, 5), (1, 1), (2, 2), (1, 1)),  # CifarNet conv1: one register-blocked 64-channel block
    (1, 70, (5, 5), (1, 1), (2, 2), (1, 1)),  # a block and 6 channels past it
    (3, 128, (3, 3), (1, 1), (1, 1), (1, 1)),  # two blocks, several channels
    (2, 64, (3, 3), (1, 1), (2, 2), (2, 2)),  # dilation, padding wider than the kernel's reach
    (3, 6, (3, 3), (2, 1), (1, 0), (1, 1)),  # stride: the generic path
    (2, 64, (3, 9), (1, 1), (1, 4), (1, 1)),  # a kernel row of 9 taps: the generic path
    (4, 65, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1
]


def _sparse_input(C, dtype, skip=None, Nb=3, H=11, W=9):
    """Mostly ``skip`` (zero by default), as a digit's background or a ReLU's output."""
    x = torch.randn(Nb, C, H, W, dtype=dtype)
    x = torch.where(torch.rand_like(x) < 0.7, torch.zeros_like(x), x)
    if skip is not None:
        x = x + torch.tensor(skip, dtype=dtype).view(1, C, 1, 1)
    return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_equal_the_reference(shape, shifted, dtype):
    C, M, k, s, p, d = shape
    skip = [0.5 - 0.75 * c for c in range(C)] if shifted else None
    x = _sparse_input(C, dtype, skip)
    w = torch.randn(M, C, *k, dtype=dtype, requires_grad=True)
    b = torch.randn(M, dtype=dtype, requires_grad=True)
    y = zero_skip_conv2d(x, w, b, list(s), list(p), list(d), skip)
    assert torch.equal(y, F.conv2d(x, w, b, s, p, d))  # ATen's forward, bit for bit
    dy = torch.randn_like(y)
    gw, gb = torch.autograd.grad(y, (w, b), dy)
    rw, rb = reference_weight_grad(x, dy, k, s, p, d)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw, rw, **tol)
    torch.testing.assert_close(gb, rb, **tol)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channels_last_and_a_wrong_skip_value_change_nothing(memory_format):
    """Any layout of x and dy, and a skip value the input does not hold (nothing is skipped):
    the same gradients."""
    x = _sparse_input(3, torch.float64).contiguous(memory_format=memory_format)
    w = torch.randn(64, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 64, 11, 9, dtype=torch.float64).contiguous(memory_format=memory_format)
    for skip in (None, [0.0, 0.0, 0.0], [0.3, -2.0, 7.0]):
        y = zero_skip_conv2d(x, w, None, [1, 1], [1, 1], [1, 1], skip)
        (gw,) = torch.autograd.grad(y, (w,), dy)
        torch.testing.assert_close(gw, reference_weight_grad(x, dy, (3, 3), padding=(1, 1))[0], rtol=1e-10, atol=1e-10)


def test_gradcheck_and_opcheck():
    skip = [0.0, 0.25]
    x = _sparse_input(2, torch.float64, skip, Nb=2, H=6, W=5).requires_grad_()
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: zero_skip_conv2d(x, w, b, [1, 1], [1, 1], [1, 1], skip), (x, w, b))
    args = (x.detach().float().requires_grad_(), w.detach().float().requires_grad_(), b.detach().float(), [1, 1])
    opcheck(zero_skip_conv2d, args + ([1, 1], [1, 1], skip))
    opcheck(zero_skip_conv2d, args + ([1, 1], [1, 1], None))


def test_a_nan_in_dy_reaches_dw_as_in_stock():
    """A NaN in dy where it meets only skipped inputs still makes dW NaN, as stock's does (the
    kernel's non-finite bias sum hands the gradients to ATen)."""
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, 3, 3] = 1.0
    w = torch.randn(64, 1, 3, 3, requires_grad=True)
    dy = torch.zeros(2, 64, 8, 8)
    dy[0, :, 7, 7] = float("nan")  # reaches no non-zero input
    (gw,) = torch.autograd.grad(zero_skip_conv2d(x, w, None, [1, 1], [1, 1], [1, 1]), (w,), dy)
    (ref,) = torch.autograd.grad(F.conv2d(x, w, None, 1, 1), (w,), dy)
    assert torch.equal(gw.isnan(), ref.isnan()) and gw.isnan().any()


def test_input_gradient_is_atens():
    x = _sparse_input(2, torch.float64).requires_grad_()
    w = torch.randn(64, 2, 3, 3, dtype=torch.float64)
    dy = torch.randn(3, 64, 11, 9, dtype=torch.float64)
    (gx,) = torch.autograd.grad(zero_skip_conv2d(x, w, None, [1, 1], [1, 1], [1, 1]), (x,), dy)
    (ref,) = torch.autograd.grad(F.conv2d(x, w, None, 1, 1), (x,), dy)
    assert torch.equal(gx, ref)


def test_exact_conv2d_is_stock_where_the_op_does_not_run():
    """Under autocast (and for other dtypes) exact_conv2d is F.conv2d itself."""
    x = _sparse_input(1, torch.float32)
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = exact_conv2d(x, w, b, [1, 1], [1, 1], [1, 1], [0.0])
        ref = F.conv2d(x, w, b, 1, 1)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    xh, wh, bh = x.bfloat16(), w.bfloat16(), b.bfloat16()
    assert torch.equal(exact_conv2d(xh, wh, bh, [1, 1], [1, 1], [1, 1], [0.0]), F.conv2d(xh, wh, bh, 1, 1))


def test_common_values_and_when_they_are_timed():
    row = LayerPlan("c", 2, 8, (3, 3), (1, 1), (1, 1, 1, 1), K=18, N=0)
    x = torch.full((4, 2, 6, 6), -0.5)
    x[:, 1] = 0.0
    x[:, :, :2] = torch.randn(4, 2, 2, 6)  # a third of the pixels differ
    values, share = cal.common_values(x)
    assert values == [-0.5, 0.0] and share == pytest.approx(2 / 3)
    expected = values if extension.get() is not None else None  # timed only with the C++ kernel
    assert cal.zero_skip_values(row, x) == expected
    assert cal.zero_skip_values(row, torch.randn(4, 2, 6, 6)) is None  # no common value
    for other in (dict(groups=2), dict(padding=(1, 0, 1, 1))):
        assert (
            cal.zero_skip_values(
                LayerPlan("c", 2, 8, (3, 3), (1, 1), **{"padding": (1, 1, 1, 1), **other}, K=9, N=0), x
            )
            is None
        )


def test_the_measured_policy_picks_it_and_the_rewrite_emits_it(monkeypatch):
    if extension.get() is None:
        pytest.skip("timed only with the C++ kernels")
    monkeypatch.setattr(cal, "calibrate", fake_calibrate(0.6))
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=28, width=0.25)
    x = digits_like()
    gm = reuse_compile(model, x, config=ReuseConfig(policy="measured", fuse_pool=False))
    row = gm.reuse_plan["conv1"]
    assert row.exact and row.exact_kernel == "zero-skip" and row.time_ratio == 0.6
    assert "exact, zero-skip" in str(gm.reuse_plan)
    # conv2 too (every candidate is "slower" here): its input, from conv1 on a blank background, is
    # mostly one value per channel as well
    picked = [r.name for r in gm.reuse_plan if r.exact_kernel == "zero-skip"]
    assert picked == ["conv1", "conv2"] and gm.code.count("exact_conv2d(") == 2
    assert "exact_conv2d" not in rewritten_graph(gm, record=False).python_code("self").src
    assert torch.equal(gm(x), model(x))  # the forward is stock's, bit for bit
    grads = []
    for m in (model, gm):
        m.zero_grad()
        F.cross_entropy(m(x), torch.arange(8) % 10).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    gm2 = pickle.loads(pickle.dumps(gm))  # re-traces its code: exact_conv2d records itself
    assert "exact_conv2d" in gm2.code and torch.equal(gm2(x), gm(x))
    assert "exact_conv2d" in copy.deepcopy(gm).code


@pytest.mark.parametrize(("ratio", "zero_skip", "expected"), [(0.99, True, "stock"), (0.6, False, "stock")])
def test_it_is_not_picked_when_slow_or_off(monkeypatch, ratio, zero_skip, expected):
    monkeypatch.setattr(cal, "calibrate", fake_calibrate(ratio))
    gm = reuse_compile(
        cifarnet(in_channels=1, image_size=28, width=0.25),
        digits_like(),
        config=ReuseConfig(policy="measured", zero_skip=zero_skip, fuse_pool=False),
    )
    assert gm.reuse_plan["conv1"].exact_kernel == expected and "exact_conv2d" not in gm.code


def test_config_checks_zero_skip():
    with pytest.raises(ValueError, match="ReuseConfig.zero_skip must be True or False"):
        ReuseConfig(zero_skip="yes")


def test_torch_compile_runs_it(monkeypatch, backend):
    """torch.compile (aot_eager) over a module with a zero-skipping layer: the op's fake and
    autograd formulas trace, and two Adam steps give eager's parameters."""
    if backend != "cpp":
        pytest.skip("one backend is enough")
    monkeypatch.setattr(cal, "calibrate", fake_calibrate(0.6))
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = digits_like(), torch.arange(8) % 10
    gm = reuse_compile(
        cifarnet(in_channels=1, image_size=28, width=0.25), x, config=ReuseConfig(policy="measured", fuse_pool=False)
    )
    for a, b in zip(adam_steps(gm, x, y), adam_steps(gm, x, y, compile=True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
