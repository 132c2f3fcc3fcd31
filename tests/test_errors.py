"""SPEC section 6: bad input works or fails with a message naming the thing and the way on;
nothing hangs and no parameter changes on a forward."""

import os

import pytest
import torch
from torch import nn

from reuse_compiler import ReuseConfig, ReuseTraceError, reuse_compile, set_stage
from reuse_compiler.models import cifarnet


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.head(self.gate(self.stem(x)))


class RootBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.conv(x) if x.mean() > 0 else x


def test_untraceable_submodule_names_place_and_way_on():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ReuseTraceError) as e:
        reuse_compile(Untraceable(), x)
    msg = str(e.value)
    assert "'gate'" in msg and "Gate" in msg and "test_errors.py" in msg and "x.sum() > 0" in msg
    assert "exclude=['gate']" in msg
    gm = reuse_compile(Untraceable(), x, config=ReuseConfig(exclude=["gate"]))  # the way on works
    plan = gm.reuse_plan
    assert not plan["stem"].exact and not plan["head"].exact
    assert plan["gate.conv"].exact and "excluded" in plan["gate.conv"].reason
    assert gm(x).shape == (2, 2, 6, 6)


def test_untraceable_root_forward():
    with pytest.raises(ReuseTraceError, match="forward of RootBranch.*exclude"):
        reuse_compile(RootBranch(), torch.randn(1, 3, 5, 5))


@pytest.fixture
def compiled():
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=28)
    gm = reuse_compile(model, torch.randn(16, 1, 28, 28))
    return model, gm


def _params(gm):
    return {k: v.detach().clone() for k, v in gm.named_parameters()}


def _assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scope", ["batch", "input"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_input_propagates_like_stock(bad, scope):
    """The bad image's logits are non-finite, as with stock; no other image's are (its
    sub-vectors get clusters of their own, so batch-scope clusters do not spread it)."""
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=28)
    gm = reuse_compile(model, torch.randn(16, 1, 28, 28), config=ReuseConfig(scope=scope))
    x = torch.randn(16, 1, 28, 28)
    x[3, 0, 5, 5] = bad
    before = _params(gm)
    for mode in (gm.train, gm.eval):
        mode()
        y, ys = gm(x), model(x)
        assert y.shape == (16, 10)
        bad_images = (~torch.isfinite(y)).any(1).nonzero().flatten().tolist()
        assert bad_images == (~torch.isfinite(ys)).any(1).nonzero().flatten().tolist() == [3]
    _assert_same(before, _params(gm))


def test_across_batch_store_keeps_nan_out():
    """One NaN batch in training does not reach later batches through the cluster store."""
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=28)
    gm = reuse_compile(model, torch.randn(8, 1, 28, 28), config=ReuseConfig(scope="across-batch"))
    x = torch.randn(8, 1, 28, 28)
    x[0, 0, 3, 3] = float("nan")
    gm(x)
    for _ in range(3):
        assert torch.isfinite(gm(torch.randn(8, 1, 28, 28))).all()
    gm.eval()
    assert torch.isfinite(gm(torch.randn(8, 1, 28, 28))).all()


def test_all_zero_images(compiled):
    model, gm = compiled
    x = torch.zeros(16, 1, 28, 28)
    y = gm(x)
    assert torch.isfinite(y).all()
    # conv1 sees only zero sub-vectors: one cluster, centroid 0, output = bias (exact)
    assert gm.reuse_plan["conv1"].r_c == pytest.approx(1 / (16 * 28 * 28))


@pytest.mark.parametrize("batch", [1, 3, 16, 40])
def test_batch_sizes_other_than_the_example(compiled, batch):
    model, gm = compiled
    y = gm(torch.randn(batch, 1, 28, 28))
    assert y.shape == (batch, 10)
    loss = y.logsumexp(1).mean()
    loss.backward()


def test_empty_batch(compiled):
    _, gm = compiled
    assert gm(torch.randn(0, 1, 28, 28)).shape == (0, 10)


def test_channels_last_input_gives_the_same_result(compiled):
    _, gm = compiled
    x = torch.randn(16, 1, 28, 28)
    x4 = torch.randn(16, 3, 32, 32)
    gm3 = reuse_compile(cifarnet(), x4)
    torch.testing.assert_close(gm(x.to(memory_format=torch.channels_last)), gm(x))
    torch.testing.assert_close(gm3(x4.to(memory_format=torch.channels_last)), gm3(x4))


def test_float64_and_bfloat16_models():
    x = torch.randn(8, 1, 28, 28)
    model = cifarnet(in_channels=1, image_size=28)
    gm = reuse_compile(model, x)
    y64 = gm.double()(x.double())
    assert y64.dtype == torch.float64 and torch.isfinite(y64).all()
    y16 = gm.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
    y16.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in gm.parameters())


@pytest.mark.parametrize("centroid", ["norm", "mean"])
def test_float16_model_stays_finite(centroid):
    """float16 (where F.normalize's eps = 1e-12 is 0 and zero centroids gave NaN): outputs
    and gradients finite."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    model = cifarnet(in_channels=1, image_size=28)
    gm = reuse_compile(model, x, config=ReuseConfig(centroid=centroid)).half()
    y = gm(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters())


def test_dtype_mismatch_is_a_clear_error(compiled):
    _, gm = compiled
    with pytest.raises(TypeError, match="dtype.*model.to"):
        gm(torch.randn(2, 1, 28, 28, dtype=torch.float64))


def test_forward_never_changes_parameters_bn_stats_move_in_train_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(4, 3, 10, 10)
    gm = reuse_compile(model, x)
    assert torch.equal(gm.get_submodule("1").running_mean, torch.zeros(8))  # compiling ran nothing in train mode
    before = _params(gm)
    gm.train()
    gm(x)
    _assert_same(before, _params(gm))
    assert not torch.equal(gm.get_submodule("1").running_mean, torch.zeros(8))
    gm.eval()
    stats = gm.get_submodule("1").running_mean.clone()
    gm(x)
    assert torch.equal(stats, gm.get_submodule("1").running_mean)


def test_too_small_input_names_the_layer_extent():
    gm = reuse_compile(nn.Sequential(nn.Conv2d(2, 2, 5)), torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="smaller than the dilated kernel extent 5"):
        gm(torch.randn(1, 2, 3, 3))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"L": 0}, "L"),
        ({"L": "5"}, "L"),
        ({"H": 63}, "H"),
        ({"H": {"conv1": 0}}, "H"),
        ({"scope": "global"}, "scope"),
        ({"seed": 1.5}, "seed"),
        ({"exclude": "conv1"}, "exclude"),
        ({"cache_size": 0}, "cache_size"),
        ({"refresh": -1}, "refresh"),
        ({"l_values": "odd"}, "l_values"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"ReuseConfig\.{field}"):
        ReuseConfig(**kwargs)


def test_bad_arguments():
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match="nn.Module"):
        reuse_compile(lambda x: x, x)
    with pytest.raises(TypeError, match="example_input"):
        reuse_compile(cifarnet(), None)
    with pytest.raises(TypeError, match="ReuseConfig"):
        reuse_compile(cifarnet(), x, config={"L": 5})
    with pytest.raises(ValueError, match=r"example_input \(shapes \[\(2, 1, 32, 32\)\]\)"):
        reuse_compile(cifarnet(), torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"L for layer 'conv1' must be an int in \[1, K=75\]"):
        reuse_compile(cifarnet(), x, config=ReuseConfig(L=100))
    gm = reuse_compile(cifarnet(), x)
    with pytest.raises(ValueError, match="H for layer 'conv2'"):
        set_stage(gm, "conv2", H=70)
    with pytest.raises(KeyError, match="conv7.*conv1"):
        set_stage(gm, "conv7", L=5)
    with pytest.raises(TypeError, match="reuse_compile"):
        set_stage(cifarnet(), L=5)


def test_other_spatial_size_on_a_fully_convolutional_model():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2))
    gm = reuse_compile(model, torch.randn(2, 3, 8, 8))
    for hw in (12, 5):
        x = torch.randn(3, 3, hw, hw)
        assert gm(x).shape == model(x).shape


def test_extension_build_uses_the_ninja_next_to_python(tmp_path, monkeypatch):
    """Processes with and without the venv activated must build with the same ninja: two
    ninja versions rewrote the build's logs in turn and every switch rebuilt the kernels."""
    import sys

    from torch.utils import cpp_extension

    from reuse_compiler.runtime import extension

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ninja").write_text("#!/bin/sh\n")
    (fake_bin / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_bin / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a system ninja may come first here
    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.setdefault("path", os.environ["PATH"]))
    extension._build()
    assert seen["path"].split(os.pathsep)[0] == str(fake_bin)
    extension._build()  # not prepended twice
    assert os.environ["PATH"].split(os.pathsep).count(str(fake_bin)) == 1


@pytest.mark.parametrize(
    "conv,config",
    [
        (nn.Conv2d(4, 8, 3, groups=2), ReuseConfig()),  # each group reads a slice of C / groups channels
        (nn.Conv2d(3, 8, 3), ReuseConfig(L=27)),  # one sub-vector per window
        (nn.Conv2d(3, 8, 3), ReuseConfig()),
    ],
)
@pytest.mark.parametrize("channels", [1, 5, 8])
def test_wrong_channel_count_is_an_error_as_in_stock(conv, config, channels):
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    gm = reuse_compile(model, torch.randn(4, conv.in_channels, 8, 8), config=config)
    assert not gm.reuse_plan["0"].exact
    x = torch.randn(4, channels, 8, 8)
    with pytest.raises(RuntimeError, match="channels"):
        model(x)
    with pytest.raises(
        ValueError, match=rf"layer '0' expected input\[4, {channels}, 8, 8\] to have {conv.in_channels} channels"
    ):
        gm(x)
    with pytest.raises(ValueError, match=r"4-D .*x\.unsqueeze"):
        gm(torch.randn(conv.in_channels, 8, 8))
    with pytest.raises(TypeError, match=r"layer '0' expected a floating-point input, got torch.int64.*x\.float\(\)"):
        gm(torch.randint(0, 5, (4, conv.in_channels, 8, 8)))  # stock: a RuntimeError on the dtype as well


def test_across_batch_store_follows_the_module_to_another_dtype():
    """The store's lists are no buffers: gm.double() after they filled must not break the next
    forwards (the store moves to the inputs' device and dtype, as gm.cuda() needs)."""
    torch.manual_seed(0)
    gm = reuse_compile(
        cifarnet(in_channels=1, image_size=28), torch.randn(8, 1, 28, 28), config=ReuseConfig(scope="across-batch")
    )
    gm(torch.randn(8, 1, 28, 28))
    gm.double()
    y = gm(torch.randn(8, 1, 28, 28, dtype=torch.float64))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    store = gm.get_submodule("reuse_state.conv2.store").stores[0]
    assert store.cents[0].dtype == torch.float64 and store.outs[0].dtype == torch.float64
    gm.eval()
    assert torch.isfinite(gm(torch.randn(8, 1, 28, 28, dtype=torch.float64))).all()


@pytest.mark.parametrize("centroid", ["mean", "norm"])
def test_huge_finite_entries_are_not_taken_for_non_finite_ones(centroid):
    """With a NaN in the batch, sub-vectors whose squared norm overflows (entries ~1e20) are
    still finite: they keep their clusters, and their images' outputs are what they are
    without the NaN (with the norm centroid too: its lengths are then taken in float64)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    gm = reuse_compile(nn.Sequential(conv), torch.randn(4, 3, 8, 8), config=ReuseConfig(centroid=centroid))
    x = torch.randn(4, 3, 8, 8) * 1e20
    bad = x.clone()
    bad[3, 0, 5, 5] = float("nan")
    with torch.no_grad():
        y, y_bad = gm(x), gm(bad)
    assert torch.isfinite(y).all()
    assert (~torch.isfinite(y_bad)).flatten(1).any(1).tolist() == [False, False, False, True]
    rel = (y_bad[:3].double() - y[:3].double()).norm() / y[:3].double().norm()
    assert rel < 0.05  # the same clusters but for the NaN sub-vectors (0.009 here), none lumped with them


SCALE = 2.0**66  # about 7.4e19: float32 squares overflow (x * x > 3.4e38), the entries do not


def _scaled_chain(chain, norm_grad):
    """The chain (norm centroid) on a ReLU input and on the input times SCALE: (y, x.grad,
    w.grad) of each, and F.conv2d's output on the scaled input."""
    from reuse_compiler.runtime import ops
    from reuse_compiler.runtime.reference import lsh_planes

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(3, 8, 7, 7, generator=g)).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 8, 3, 3, generator=g)
    gy = torch.randn(3, 5, 7, 7, generator=g)
    planes = lsh_planes(4 if chain == "generic L=4" else 8, 5, seed=1)

    def run(inp):
        xx, ww = inp.clone().requires_grad_(), w.clone().requires_grad_()
        y, _ = ops.reuse_conv2d(
            xx, ww, None, planes, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], centroid="norm",
            norm_grad=norm_grad, per_pixel=chain == "per-pixel",
        )  # fmt: skip
        y.backward(gy)
        return y.detach(), xx.grad, ww.grad

    return run(x), run(x * SCALE), torch.nn.functional.conv2d(x * SCALE, w, padding=1)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("norm_grad", [False, True])
@pytest.mark.parametrize("chain", ["per-pixel", "generic L=4", "generic L=C"])
def test_norm_centroid_entries_whose_squares_overflow(chain, norm_grad, kernels_on):
    """Entries above about 1e19 overflow float32's sums of squares. The norm centroid's
    lengths (member norms, per-pixel norms, the centroids' unit rows) are then taken again in
    float64, so the chain stays finite where F.conv2d does, and scaling the input by a power of
    two scales the output and the weight gradient by it (the hash ids, clusters and unit
    centroids are scale-free; the lengths are linear), up to the rounding of the float64 norms.
    With and without the C++ kernels (the per-pixel ops then form the generic tensors)."""
    from reuse_compiler.runtime import extension

    if kernels_on and extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    if kernels_on:
        small, big, stock = _scaled_chain(chain, norm_grad)
    else:
        with extension.disabled():
            small, big, stock = _scaled_chain(chain, norm_grad)
    assert torch.isfinite(stock).all()
    for t in big:
        assert torch.isfinite(t).all()
    torch.testing.assert_close(big[0], small[0] * SCALE, rtol=1e-5, atol=1e-6 * float(stock.abs().max()))
    torch.testing.assert_close(big[2], small[2] * SCALE, rtol=1e-4, atol=1e-5 * float(big[2].abs().max()))


def test_norm_centroid_reference_chain_with_overflowing_squares():
    """The reference chain (the oracle) takes the norm centroid's lengths overflow-safe too."""
    from reuse_compiler.runtime.reference import lsh_planes, reference_reuse_conv2d

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(2, 8, 6, 6, generator=g))
    w = torch.randn(4, 8, 3, 3, generator=g)
    kw = dict(padding=(1, 1, 1, 1), L=8, planes=lsh_planes(8, 5, seed=1), centroid="norm")
    y, _ = reference_reuse_conv2d(x, w, None, **kw)
    y_big, _ = reference_reuse_conv2d(x * SCALE, w, None, **kw)
    assert torch.isfinite(y_big).all()
    torch.testing.assert_close(y_big, y * SCALE, rtol=1e-5, atol=1e-6 * float(y_big.abs().max()))
