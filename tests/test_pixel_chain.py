"""The per-pixel chain (``lsh_hash(per_pixel=True)``, ``cluster_pixels``, ``member_norms(per_pixel=True)``,
``reconstruct`` with a slot map): where every sub-vector is one whole pixel (L = C, stride 1,
"batch" scope) it keeps per pixel what the generic chain keeps per (sub-matrix, row). It must
give the generic chain's values bit for bit (the C++ kernels sum in the same order; the
plain-PyTorch fallbacks form the generic tensors), forward and backward, in every geometry,
layout and chunk-path mode, and the rewrite must emit it exactly where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reuse_compiler import ReuseConfig, reuse_compile, set_stage
from reuse_compiler.passes import rebuild
from reuse_compiler.runtime import extension, kernels, ops
from reuse_compiler.runtime.geometry import Geometry
from reuse_compiler.runtime.reference import lsh_planes

# (C, kernel, padding (t, b, l, r), dilation, input hw)
SHAPES = [
    (16, (5, 5), (2, 2, 2, 2), (1, 1), (12, 12)),  # CifarNet conv2-like
    (8, (3, 3), (1, 0, 2, 1), (2, 1), (11, 9)),  # asymmetric padding, dilation
    (8, (3, 3), (0, 0, 0, 0), (1, 1), (9, 10)),  # no padding
    (4, (2, 3), (0, 0, 0, 0), (3, 1), (9, 6)),  # dilation leaves pixels no tap reads
    (4, (3, 3), (1, 1, 1, 1), (1, 1), (2, 2)),  # image smaller than the kernel's span
]


@pytest.fixture(autouse=True)
def _restore():
    old = kernels.CHUNK_PATH, kernels.PIXEL_CHAIN
    yield
    kernels.CHUNK_PATH, kernels.PIXEL_CHAIN = old


def _data(C, hw, layout, dtype=torch.float32, Nb=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(Nb, C, *hw, generator=g, dtype=dtype))
    x[:, :, : hw[0] // 3] = 0  # a background, as the digits have
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _case(C, k, hw, layout):
    """A layer's input, weight (6 outputs), bias and hash planes (H = 6) for the chain tests."""
    return _data(C, hw, layout), torch.randn(6, C, *k), torch.randn(6), lsh_planes(C, 6, seed=3)


def _chain(per_pixel, x, w, b, planes, k, p, d, centroid, gy_seed=1, norm_grad=False):
    """Forward and backward of the chain (reuse_conv2d, norms constant unless ``norm_grad``);
    outputs, gradients, parts."""
    xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y, parts = ops.reuse_conv2d(
        xx, ww, bb, planes, k, [1, 1], p, d, centroid=centroid, norm_grad=norm_grad, per_pixel=per_pixel
    )
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=y.dtype)
    y.backward(gy)
    return y.detach(), xx.grad, ww.grad, bb.grad, parts


def _assert_same(a, b):
    names = ("y", "x.grad", "w.grad", "b.grad")
    for name, u, v in zip(names, a[:4], b[:4]):
        assert torch.equal(u, v), name
    for name in ("counts", "inverse", "ids", "centroids", "yc"):
        assert torch.equal(a[4][name], b[4][name]), name


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
@pytest.mark.parametrize("centroid", ["norm", "mean"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("C,k,p,d,hw", SHAPES)
def test_pixel_chain_gives_the_generic_chains_bits(C, k, p, d, hw, layout, centroid, mode):
    """Same y, input, weight and bias gradients, counts, inverse, ids, centroids, bit for bit."""
    if extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    kernels.CHUNK_PATH = mode
    x, w, b, planes = _case(C, k, hw, layout)
    generic = _chain(False, x, w, b, planes, list(k), list(p), list(d), centroid)
    pixel = _chain(True, x, w, b, planes, list(k), list(p), list(d), centroid)
    _assert_same(generic, pixel)


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("C,k,p,d,hw", SHAPES)
def test_pixel_chain_with_the_norms_gradient(C, k, p, d, hw, layout, mode):
    """With the norms' gradient (norm_grad=True, the library's default) the per-pixel chain
    takes cluster_pixels_norms where the generic chain takes cluster_norms: the same y,
    clusters and centroids, bit for bit; the gradients equal up to
    rounding (the norms' share of the input gradient summed per pixel before the division
    instead of per (tap, row) after it; y_c's gradient and the scales' summed in other orders
    than the generic chain's one-pass reconstruct_grad_scaled)."""
    if extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    kernels.CHUNK_PATH = mode
    x, w, b, planes = _case(C, k, hw, layout)
    args = (x, w, b, planes, list(k), list(p), list(d), "norm")
    generic = _chain(False, *args, norm_grad=True)
    pixel = _chain(True, *args, norm_grad=True)
    assert torch.equal(generic[0], pixel[0])
    for u, v in zip(generic[1:4], pixel[1:4]):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6 * float(u.abs().max()))
    assert pixel[1].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    for name in ("counts", "inverse", "ids", "centroids", "yc"):
        assert torch.equal(generic[4][name], pixel[4][name]), name
    # the norms' share is there: without it the input gradient differs by far more than rounding
    const = _chain(True, *args, norm_grad=False)
    assert (const[1] - pixel[1]).abs().max() > 1e-3 * pixel[1].abs().max()


@pytest.mark.parametrize("norm_grad", [False, True])
def test_pixel_chain_bfloat16_as_generic(norm_grad):
    """bfloat16 (plain-PyTorch kernels, float32 sums): the per-pixel chain's output, gradients
    and dtypes match the generic chain's, with and without the norms' gradient."""
    C, k, p, d, hw = SHAPES[0]
    k, p, d = list(k), list(p), list(d)
    x, w, b, planes = _case(C, k, hw, "channels_last")
    x, w, b = (t.to(torch.bfloat16) for t in (x, w, b))
    generic = _chain(False, x, w, b, planes, k, p, d, "norm", norm_grad=norm_grad)
    pixel = _chain(True, x, w, b, planes, k, p, d, "norm", norm_grad=norm_grad)
    for u, v in zip(generic[:4], pixel[:4]):
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(v.float(), u.float(), rtol=2e-2, atol=2e-2 * float(u.float().abs().max()))
    assert torch.equal(generic[4]["counts"], pixel[4]["counts"])


@pytest.mark.parametrize("M", [5, 16, 37, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C,k,p,d,hw", SHAPES)
def test_pixel_scales_backward_is_the_folded_generic_kernel(C, k, p, d, hw, dtype, M):
    """The per-pixel scales' gradient (C++: each pixel's taps walked, lane sums per pixel) equals
    the generic kernel's (tap, row) dots on the formed inverse, summed into the pixels (the
    plain-PyTorch fallback), up to rounding, for output widths on and off the 16-lane chunks."""
    if extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    k, p, d = list(k), list(p), list(d)
    x = _data(C, hw, "channels_last", dtype)
    xp = ops.im2col(x, k, [1, 1], p, d)
    ids = ops.lsh_hash(xp, lsh_planes(C, 6, seed=3, dtype=dtype), k, [1, 1], d, True, x, p)
    cent, ranks, slot_map, _ = ops.cluster_pixels(xp, ids, k, [1, 1], d, C, 6, x, p)
    g = ops._padded_geometry(xp.shape, k, [1, 1], d, C)
    gen = torch.Generator().manual_seed(5)
    yc = torch.randn(cent.shape[0], cent.shape[1], M, generator=gen, dtype=dtype)
    dy = torch.randn(g.N, M, generator=gen, dtype=dtype)
    fast = kernels.pixel_scales_backward(dy, yc, ranks, slot_map, g)
    with extension.disabled():
        slow = kernels.pixel_scales_backward(dy, yc, ranks, slot_map, g)
    assert fast.shape == slow.shape == ranks.shape
    eps = torch.finfo(dtype).eps * 64  # sums of up to 25 x 64 products, some cancelling
    torch.testing.assert_close(fast, slow, rtol=eps, atol=eps * float(slow.abs().max()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same bits on one thread: the order does not depend on the split
    try:
        assert torch.equal(kernels.pixel_scales_backward(dy, yc, ranks, slot_map, g), fast)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("norm_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pixel_chain_plain_pytorch_fallbacks(dtype, norm_grad):
    """Without the C++ kernels (as on a GPU) the per-pixel ops form the generic tensors and call
    the generic functions: the plain-PyTorch generic chain's bits (with the norms' gradient its
    values, up to rounding), and the C++ chain's values."""
    C, k, p, d, hw = SHAPES[1]
    k, p, d = list(k), list(p), list(d)
    x = _data(C, hw, "channels_last", dtype)
    w = torch.randn(6, C, *k, dtype=dtype)
    b = torch.randn(6, dtype=dtype)
    planes = lsh_planes(C, 6, seed=3, dtype=dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    with extension.disabled():
        generic = _chain(False, x, w, b, planes, k, p, d, "norm", norm_grad=norm_grad)
        pixel = _chain(True, x, w, b, planes, k, p, d, "norm", norm_grad=norm_grad)
    if norm_grad:
        assert torch.equal(generic[0], pixel[0])
        for u, v in zip(generic[1:4], pixel[1:4]):
            torch.testing.assert_close(v, u, **tol)
    else:
        _assert_same(generic, pixel)
    if extension.get() is not None:
        fast = _chain(True, x, w, b, planes, k, p, d, "norm", norm_grad=norm_grad)
        for u, v in zip(fast[:4], pixel[:4]):
            torch.testing.assert_close(u, v, **tol)
        assert torch.equal(fast[4]["counts"], pixel[4]["counts"])
        assert torch.equal(fast[4]["inverse"], pixel[4]["inverse"])


def test_pixel_maps_factorise_the_inverse():
    """ranks and slot_map: slot_map[b, ranks[pixel of (b, n)]] is cluster's inverse; the ranks
    order the ids ascending; a pixel no tap reads has rank -1; the C++ and PyTorch maps agree."""
    C, k, p, d, hw = SHAPES[3]  # dilation 3 leaves rows no tap reads
    k, d = list(k), list(d)
    x = _data(C, hw, "channels_last")
    xp = ops.im2col(x, k, [1, 1], list(p), d)
    planes = lsh_planes(C, 5, seed=1)
    g = Geometry.of(xp.shape, k, [1, 1], d, C)
    ids = ops.lsh_hash(xp, planes, k, [1, 1], d, True)
    assert torch.equal(kernels.pixel_rows(ids, g), ops.lsh_hash(xp, planes, k, [1, 1], d))
    ranks, slot_map, counts = kernels.pixel_compact(ids, g)
    inverse, counts_generic = kernels.compact(ops.lsh_hash(xp, planes, k, [1, 1], d), 5, "batch")
    assert torch.equal(counts, counts_generic)
    assert torch.equal(kernels.pixel_inverse(ranks, slot_map, g), inverse)
    covered = kernels._covered(g, ids.device)
    assert bool((ranks[:, ~covered] == -1).all()) and bool((ranks[:, covered] >= 0).all())
    uniq = torch.unique(ids[:, covered])
    assert torch.equal(uniq[ranks[:, covered].long()], ids[:, covered])  # ranks order the ids
    with extension.disabled():
        torch_maps = kernels.pixel_compact(ids, g)
        assert torch.equal(kernels.pixel_inverse(*torch_maps[:2], g), inverse)
    for u, v in zip(torch_maps, (ranks, slot_map, counts)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("centroid,norm_grad", [("mean", True), ("norm", False), ("norm", True)])
def test_pixel_chain_nonfinite_input_as_generic(centroid, norm_grad):
    """A pixel with a NaN or Inf gets a cluster of its own, as in cluster: the same outputs
    (non-finite only where a NaN pixel is read), the same counts; with the norm centroid and
    the norms' gradient too (cluster_pixels_norms against cluster_norms)."""
    C, k, p, d, hw = SHAPES[0]
    k, p, d = list(k), list(p), list(d)
    x = _data(C, hw, "channels_last")
    x[1, 3, 6, 7] = float("nan")
    x[2, 0, 8, 8] = float("inf")
    w, b = torch.randn(6, C, *k), torch.randn(6)
    planes = lsh_planes(C, 6, seed=3)
    ys = []
    for per_pixel in (False, True):
        y, parts = ops.reuse_conv2d(
            x, w, b, planes, k, [1, 1], p, d, centroid=centroid, norm_grad=norm_grad, per_pixel=per_pixel
        )
        ys.append((y, parts["counts"]))
    assert torch.equal(ys[0][1], ys[1][1])
    torch.testing.assert_close(ys[0][0], ys[1][0], rtol=0, atol=0, equal_nan=True)
    assert bool(torch.isfinite(ys[1][0][0]).all()) and not bool(torch.isfinite(ys[1][0][1]).all())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("centroid", ["mean", "norm", "norm, fused"])
def test_gradcheck_pixel_chain_float64(centroid, layout):
    """float64 gradcheck of the per-pixel chain w.r.t. input, weight and bias. With the norm
    centroid the member norms take a gradient too: "norm" through member_norms(per_pixel=True)'s
    backward, "norm, fused" through cluster_pixels_norms (as the rewrite emits it with the norms'
    gradient), whose backward adds the norms' share into the centroids' input gradient in place;
    both via reconstruct's scales gradient through the slot map. Channels-last: the hash and the
    norms read x itself, and the gradients go to x directly (else to xp)."""
    C, k, p, d = 3, [3, 3], [1, 1, 1, 0], [1, 2]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, C, 5, 6, generator=g, dtype=torch.float64) + 0.1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(4, C, *k, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    planes = lsh_planes(C, 5, seed=4, dtype=torch.float64)

    def f(x, w, b):
        xp = ops.im2col(x, k, [1, 1], p, d)
        ids = ops.lsh_hash(xp, planes, k, [1, 1], d, True, x, p)
        scales = None
        if centroid == "norm, fused":
            cent, ranks, slot_map, _, scales = ops.cluster_pixels_norms(xp, ids, k, [1, 1], d, C, 5, x, p)
        else:
            cent, ranks, slot_map, _ = ops.cluster_pixels(xp, ids, k, [1, 1], d, C, 5, x, p)
            if centroid == "norm":
                scales = ops.member_norms(xp, k, [1, 1], d, C, x, p, True)
        if scales is not None:
            cent = ops.unit_rows(cent)
        yc = ops.centroid_gemm(cent, w)
        return ops.reconstruct(yc, ranks, b, scales, slot_map, [k[0], k[1], d[0], d[1]])

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_pixel_ops(dtype):
    C, k, p, d, hw = SHAPES[1]
    k, p, d = list(k), list(p), list(d)
    x = _data(C, hw, "channels_last", dtype, Nb=3) + 0.01
    xp = ops.im2col(x, k, [1, 1], p, d)
    planes = lsh_planes(C, 5, seed=2, dtype=dtype)
    leaf = xp.detach().clone().requires_grad_()
    x_leaf = x.detach().clone().requires_grad_()
    r = torch.ops.reuse
    torch.library.opcheck(r.lsh_hash.default, (xp, planes, k, [1, 1], d, True))
    torch.library.opcheck(r.lsh_hash.default, (xp, planes, k, [1, 1], d, True, x, p))
    ids = ops.lsh_hash(xp, planes, k, [1, 1], d, True)
    assert torch.equal(ids, ops.lsh_hash(xp, planes, k, [1, 1], d, True, x, p))  # x read in place of xp
    torch.library.opcheck(r.cluster_pixels.default, (leaf, ids, k, [1, 1], d, C, 5))
    torch.library.opcheck(r.cluster_pixels.default, (xp, ids, k, [1, 1], d, C, 5, x_leaf, p))
    cent, ranks, slot_map, counts = ops.cluster_pixels(xp, ids, k, [1, 1], d, C, 5)
    torch.library.opcheck(r.cluster_pixels_norms.default, (leaf, ids, k, [1, 1], d, C, 5))
    torch.library.opcheck(r.cluster_pixels_norms.default, (xp, ids, k, [1, 1], d, C, 5, x_leaf, p))
    both = ops.cluster_pixels_norms(xp, ids, k, [1, 1], d, C, 5, x, p)
    apart = (*ops.cluster_pixels(xp, ids, k, [1, 1], d, C, 5, x, p), ops.member_norms(xp, k, [1, 1], d, C, x, p, True))
    for u, v in zip(both, apart):
        assert torch.equal(u, v)
    torch.library.opcheck(r.member_norms.default, (leaf, k, [1, 1], d, C, None, None, True))
    torch.library.opcheck(r.member_norms.default, (xp, k, [1, 1], d, C, x_leaf, p, True))
    assert torch.equal(
        ops.member_norms(xp, k, [1, 1], d, C, None, None, True), ops.member_norms(xp, k, [1, 1], d, C, x, p, True)
    )
    g_c = torch.randn_like(cent)
    torch.library.opcheck(r.cluster_pixels_grad.default, (g_c, ranks, slot_map, counts, list(xp.shape), k, [1, 1], d))
    torch.library.opcheck(
        r.cluster_pixels_grad.default, (g_c, ranks, slot_map, counts, list(xp.shape), k, [1, 1], d, p)
    )
    norms = ops.member_norms(xp, k, [1, 1], d, C, None, None, True)
    yc = torch.randn(cent.shape[0], cent.shape[1], 5, dtype=dtype, requires_grad=True)
    window = [k[0], k[1], d[0], d[1]]
    bias = torch.randn(5, dtype=dtype, requires_grad=True)
    torch.library.opcheck(r.reconstruct.default, (yc, ranks, bias, norms.clone().requires_grad_(), slot_map, window))
    torch.library.opcheck(r.reconstruct.default, (yc, ranks, None, None, slot_map, window))
    y = ops.reconstruct(yc.detach(), ranks, None, None, slot_map, window)
    torch.library.opcheck(
        r.reconstruct_scales_grad.default, (torch.randn_like(y), yc.detach(), ranks, slot_map, window)
    )
    torch.library.opcheck(
        r.reconstruct_grad.default, (torch.randn_like(y), ranks, yc.shape[1], norms, slot_map, window)
    )


def test_pixel_ops_reject_other_geometries():
    """per_pixel needs L = C and stride 1; the error names the op and the way on."""
    x = torch.randn(2, 8, 6, 6)
    xp = ops.im2col(x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"lsh_hash\(per_pixel=True\).*L = C = 8, got L = 4.*generic chain"):
        ops.lsh_hash(xp, lsh_planes(4, 3, seed=0), [3, 3], [1, 1], [1, 1], True)
    with pytest.raises(ValueError, match=r"cluster_pixels.*stride 1"):
        ops.cluster_pixels(xp, torch.zeros(2, 8, 8, dtype=torch.int64), [3, 3], [2, 2], [1, 1], 8, 3)
    with pytest.raises(ValueError, match=r"cluster_pixels: ids must be the per-pixel ids"):
        ops.cluster_pixels(xp, torch.zeros(9, 2, 6, 6, dtype=torch.int64), [3, 3], [1, 1], [1, 1], 8, 3)
    with pytest.raises(ValueError, match=r"cluster_pixels_norms.*stride 1"):
        ops.cluster_pixels_norms(xp, torch.zeros(2, 8, 8, dtype=torch.int64), [3, 3], [2, 2], [1, 1], 8, 3)
    with pytest.raises(ValueError, match=r"cluster_pixels_norms: ids must be the per-pixel ids"):
        ops.cluster_pixels_norms(xp, torch.zeros(9, 2, 6, 6, dtype=torch.int64), [3, 3], [1, 1], [1, 1], 8, 3)
    with pytest.raises(ValueError, match=r"reconstruct: with slot_map .* give window"):
        ops.reconstruct(
            torch.randn(9, 3, 4),
            torch.zeros(2, 8, 8, dtype=torch.int32),
            None,
            None,
            torch.zeros(9, 2, dtype=torch.int32),
        )


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _compiled(norm_grad=False):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    model = _Net().to(memory_format=torch.channels_last)
    cfg = ReuseConfig(policy="paper", centroid="norm", norm_grad=norm_grad)
    gm = reuse_compile(model, x, config=cfg)
    set_stage(gm, "conv2", L=8, H=4)
    set_stage(gm, "conv1", exact=True)
    return gm, x


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_rewrite_emits_the_pixel_chain_where_it_applies():
    """The rewrite emits cluster_pixels for L = C with the norms constant (member_norms of the
    detached input), cluster_pixels_norms with their gradient (as the generic chain's fused
    cluster_norms); the generic chain with PIXEL_CHAIN off and in the exported graph
    (record=False, whose ONNX translation knows the generic ops)."""
    if extension.get() is None:
        pytest.skip("the rewrite emits the per-pixel chain only with the C++ kernels")
    from reuse_compiler.passes.conv_rewrite import rewritten_graph

    gm, _ = _compiled()
    t = _targets(gm)
    assert "reuse.cluster_pixels.default" in t and "reuse.cluster.default" not in t
    assert "reuse.lsh_hash.default" in t and "reuse.reconstruct.default" in t  # SPEC's stage names
    assert "reuse.cluster_pixels" in gm.print_readable(print_output=False)
    norms = next(n for n in gm.graph.nodes if n.target is torch.ops.reuse.member_norms.default)
    assert all(a.op == "call_method" and a.target == "detach" for a in (norms.args[0], norms.args[5]))
    fused, _ = _compiled(norm_grad=True)
    t = _targets(fused)
    assert "reuse.cluster_pixels_norms.default" in t and "reuse.cluster_norms.default" not in t
    assert "reuse.member_norms.default" not in t and "reuse.cluster_pixels.default" not in t
    kernels.PIXEL_CHAIN = False
    rebuild(fused)
    assert "reuse.cluster_norms.default" in _targets(fused) and "reuse.cluster_pixels.default" not in _targets(fused)
    kernels.PIXEL_CHAIN = True
    export_targets = [str(n.target) for n in rewritten_graph(gm, record=False).nodes if n.op == "call_function"]
    assert "reuse.cluster.default" in export_targets and "reuse.cluster_pixels.default" not in export_targets
    kernels.PIXEL_CHAIN = False
    rebuild(gm)
    assert "reuse.cluster.default" in _targets(gm) and "reuse.cluster_pixels.default" not in _targets(gm)


def test_compiled_training_step_same_bits_either_chain():
    """Three Adam steps of a compiled model: the same loss, gradients and parameters with the
    per-pixel chain as with the generic one (what benchmarks/pixel_ab.py checks on the main job)."""
    if extension.get() is None:
        pytest.skip("the rewrite emits the per-pixel chain only with the C++ kernels")
    from benchmarks.pixel_ab import chain_ops, generic_copy, same_step

    gm, x = _compiled()
    generic = generic_copy(gm)
    assert "reuse.cluster_pixels.default" in chain_ops(gm) - chain_ops(generic)
    y = torch.randint(0, 10, (x.shape[0],))
    a, b = copy.deepcopy(generic), copy.deepcopy(gm)
    for _ in range(3):
        assert same_step(a, b, x, y) == []


def test_compiled_training_step_with_the_norms_gradient_either_chain():
    """With the norms' gradient: one step from the same weights gives the same loss, and the
    gradients equal up to rounding."""
    if extension.get() is None:
        pytest.skip("the rewrite emits the per-pixel chain only with the C++ kernels")
    from benchmarks.pixel_ab import chain_ops, generic_copy, same_step

    gm, x = _compiled(norm_grad=True)
    generic = generic_copy(gm)
    assert "reuse.cluster_norms.default" in chain_ops(generic) - chain_ops(gm)
    y = torch.randint(0, 10, (x.shape[0],))
    rel = {}
    diffs = same_step(copy.deepcopy(generic), copy.deepcopy(gm), x, y, rel)
    assert "loss" not in diffs
    assert all(r < 1e-5 for n, r in rel.items() if n.startswith("grad")), rel


@pytest.mark.parametrize("L", [4, 2])
def test_grouped_conv_pixel_chain_same_bits(L):
    """A grouped convolution gets one chain per group (its input narrowed, not channels-last
    contiguous, so the gradient goes through im2col's padded copy): the per-pixel chains give
    the generic chains' output and gradients; at L = 2 two per group, on the group's channel
    slices (the output up to rounding)."""
    if extension.get() is None:
        pytest.skip("the rewrite emits the per-pixel chain only with the C++ kernels")
    from benchmarks.pixel_ab import chain_ops, generic_copy

    torch.manual_seed(0)
    x = torch.rand(6, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    model = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 49, 3))
    gm = reuse_compile(model.to(memory_format=torch.channels_last), x, config=ReuseConfig(norm_grad=False))
    set_stage(gm, "0", L=L, H=4)
    generic = generic_copy(gm)
    assert "reuse.cluster_pixels.default" in chain_ops(gm) - chain_ops(generic)
    assert _targets(gm).count("reuse.cluster_pixels.default") == 2 * (4 // L)
    outs = []
    for m in (generic, gm):
        xx = x.detach().clone().requires_grad_()
        y = m(xx)
        y.square().sum().backward()
        outs.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    for u, v in zip(*outs):
        if L == 4:
            assert torch.equal(u, v)
        else:
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6 * float(u.abs().max()))


@pytest.mark.parametrize("case", ["rank_table", "rank_table_in_place", "slot_lookups", "fewer_taps_than_threads"])
def test_reconstruct_backward_paths_same_bits(case):
    """The per-pixel reconstruction's backward has three C++ paths: a table by key rank (few
    ranks absent from a tap; above 4 MB compacted into its slots in place), slot lookups
    through the pixels (many absent: here each tap of a dilated kernel reads its own few
    pixels), and, with fewer taps than threads, the generic kernel on the formed inverse. Each
    gives the generic chain's bits."""
    if extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    C, k, p = 4, [3, 3], [0, 0, 0, 0]
    d, hw = ([4, 4], (10, 10)) if case == "slot_lookups" else ([1, 1], (9, 9))
    M, H = 5, 12 if case == "slot_lookups" else 3
    if case == "rank_table_in_place":  # 9 taps x ~600 ranks x 256 channels x 4 bytes > 4 MB
        C, hw, M, H = 12, (40, 40), 256, 10
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, C, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(M, C, *k, generator=g), torch.randn(M, generator=g)
    planes = lsh_planes(C, H, seed=1)
    H = planes.shape[1]
    xp = ops.im2col(x, k, [1, 1], p, d)
    geo = Geometry.of(xp.shape, k, [1, 1], d, C)
    _, slot_map, counts = kernels.pixel_compact(ops.lsh_hash(xp, planes, k, [1, 1], d, True), geo)
    G, cmax = slot_map.shape[1], counts.shape[1]
    assert (G > cmax + cmax // 4) == (case == "slot_lookups"), (G, cmax, H)
    assert (9 * G * M * 4 > 4 << 20) == (case == "rank_table_in_place"), (G, M)
    threads = torch.get_num_threads()
    if case == "fewer_taps_than_threads":
        torch.set_num_threads(16)  # 9 taps
    try:
        generic = _chain(False, x, w, b, planes, k, p, d, "norm")
        pixel = _chain(True, x, w, b, planes, k, p, d, "norm")
    finally:
        torch.set_num_threads(threads)
    _assert_same(generic, pixel)


def test_one_by_one_kernel_keeps_the_generic_chain():
    """A 1 x 1 kernel's L = C sub-vector is its whole window (the "window" kind, not one tap of
    several): the rewrite keeps the generic chain there (it emitted the per-pixel one, which
    then refused the geometry, until the review of session 22), and the per-pixel ops say why."""
    if extension.get() is None:
        pytest.skip("the rewrite emits the per-pixel chain only with the C++ kernels")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(216, 3))
    x = torch.rand(4, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    gm = reuse_compile(model.to(memory_format=torch.channels_last), x, config=ReuseConfig(norm_grad=False))
    set_stage(gm, "0", L=4, H=3)
    set_stage(gm, "2", L=8, H=3)
    assert sorted(t for t in _targets(gm) if "cluster" in t) == [
        "reuse.cluster.default",
        "reuse.cluster_pixels.default",
    ]
    gm(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gm.parameters())
    xp = ops.im2col(torch.randn(2, 8, 5, 5), [1, 1], [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"lsh_hash\(per_pixel=True\).*more than one tap \(got \(1, 1\)\)"):
        ops.lsh_hash(xp, lsh_planes(8, 3, seed=0), [1, 1], [1, 1], [1, 1], True)


# (C, L, kernel, padding, dilation, input hw): L dividing C, one per-pixel chain per channel slice
SLICED = [
    (8, 4, (3, 3), (1, 1, 1, 1), (1, 1), (9, 9)),
    (12, 4, (3, 3), (1, 0, 2, 1), (2, 1), (11, 9)),  # three slices, asymmetric padding, dilation
    (16, 8, (5, 5), (2, 2, 2, 2), (1, 1), (12, 12)),  # CifarNet conv2-like
    (8, 2, (2, 3), (0, 0, 0, 0), (3, 1), (9, 6)),  # four slices; pixels no tap reads
]


def test_pixel_slices():
    """How many per-pixel chains a stage runs as: one at L = C, C / L where L divides C (up to
    MAX_PIXEL_SLICES), none elsewhere (L not dividing C, stride 2, a 1 x 1 kernel)."""
    assert kernels.pixel_slices(64, 64, [1, 1], [5, 5]) == 1
    assert kernels.pixel_slices(64, 32, [1, 1], [5, 5]) == 2
    assert kernels.pixel_slices(64, 8, [1, 1], [3, 3]) == kernels.MAX_PIXEL_SLICES == 8
    assert kernels.pixel_slices(64, 4, [1, 1], [3, 3]) == 0  # 16 slices
    assert kernels.pixel_slices(64, 48, [1, 1], [3, 3]) == 0
    assert kernels.pixel_slices(64, 128, [1, 1], [3, 3]) == 0  # sub-vectors of two pixels
    assert kernels.pixel_slices(64, 32, [2, 2], [3, 3]) == 0
    assert kernels.pixel_slices(64, 32, [1, 1], [1, 1]) == 0


@pytest.mark.parametrize("norm_grad", [False, True])
@pytest.mark.parametrize("centroid", ["norm", "mean"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("C,L,k,p,d,hw", SLICED)
def test_sliced_pixel_chain_as_generic(C, L, k, p, d, hw, layout, centroid, norm_grad):
    """Where L divides C the per-pixel chain runs once per channel slice of L: the same clusters
    as the generic chain's, block for block (counts, inverse, ids, centroids and their outputs
    joined in the generic chain's block order, bit for bit), and the same output and gradients
    up to rounding (the slices' outputs added after their own sums)."""
    if extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    x, w, b = _data(C, hw, layout), torch.randn(6, C, *k), torch.randn(6)
    planes = lsh_planes(L, 6, seed=3)
    args = (x, w, b, planes, list(k), list(p), list(d), centroid)
    generic = _chain(False, *args, norm_grad=norm_grad)
    pixel = _chain(True, *args, norm_grad=norm_grad)
    assert len(pixel[4]["slices"]) == C // L and "ranks" in pixel[4]["slices"][0]
    for name in ("counts", "inverse", "ids", "centroids", "yc"):
        assert torch.equal(generic[4][name], pixel[4][name]), name
    for u, v in zip(generic[:4], pixel[:4]):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6 * float(u.abs().max()))
    assert pixel[1].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("centroid", ["mean", "norm, fused"])
def test_gradcheck_sliced_pixel_chain_float64(centroid):
    """float64 gradcheck of the per-pixel chains on channel slices (reuse_conv2d, L = C / 2)
    w.r.t. input, weight and bias; with the norm centroid, with the norms' gradient (with the
    norms constant the backward leaves their share out by design)."""
    if extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    C, L, k, p, d = 4, 2, [3, 3], [1, 1, 1, 0], [1, 2]
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, C, 5, 6, generator=g, dtype=torch.float64) + 0.1).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, C, *k, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    planes = lsh_planes(L, 4, seed=4, dtype=torch.float64)
    kind = "mean" if centroid == "mean" else "norm"

    def f(x, w, b):
        y, parts = ops.reuse_conv2d(
            x, w, b, planes, k, [1, 1], p, d, centroid=kind, norm_grad=centroid == "norm, fused", per_pixel=True
        )
        assert len(parts["slices"]) == 2
        return y

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (x, w, b)))


def test_rewrite_emits_sliced_pixel_chains_and_trains_as_generic():
    """At L = C / 2 the rewrite emits two per-pixel chains on the input's channel slices,
    their outputs added; with fitted planes (refitted to the slices' padded inputs together,
    i.e. the layer's) three Adam steps give the generic chain's loss, gradients and
    parameters up to rounding, the same planes and the same r_c."""
    if extension.get() is None:
        pytest.skip("the rewrite emits the per-pixel chain only with the C++ kernels")
    from benchmarks.pixel_ab import chain_ops, generic_copy, same_step

    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    model = _Net().to(memory_format=torch.channels_last)
    cfg = ReuseConfig(policy="paper", centroid="norm", norm_grad=False, hashing="pca", hash_refresh=2)
    gm = reuse_compile(model, x, config=cfg)
    set_stage(gm, "conv1", exact=True)
    set_stage(gm, "conv2", L=4, H=4)
    t = _targets(gm)
    assert t.count("reuse.cluster_pixels.default") == 2 and "reuse.cluster.default" not in t
    assert any("split_channels" in n for n in t) and any("add_outputs" in n for n in t)
    generic = generic_copy(gm)
    assert "reuse.cluster.default" in chain_ops(generic)
    y = torch.randint(0, 10, (x.shape[0],))
    a, b = copy.deepcopy(generic), copy.deepcopy(gm)
    for _ in range(3):
        rel = {}
        diffs = same_step(a, b, x, y, rel)
        assert all(r < 1e-5 for r in rel.values()), rel
        assert diffs == [] or "loss" not in diffs or rel["loss"] < 1e-6
        ha, hb = (m.get_submodule("reuse_state.conv2.hasher") for m in (a, b))
        torch.testing.assert_close(hb.planes, ha.planes, rtol=1e-5, atol=1e-6)
        assert a.reuse_plan["conv2"].r_c == b.reuse_plan["conv2"].r_c
    assert ha.fits >= 2  # refitted during the steps, to the same input
    torch.save(b, io := __import__("io").BytesIO())  # the graph pickles (its helpers importable)
    io.seek(0)
    loaded = torch.load(io, weights_only=False)
    torch.testing.assert_close(loaded(x), b(x), rtol=0, atol=0)
