"""The reuse ops against the naive reference and against F.conv2d, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reuse_compiler.runtime import kernels
from reuse_compiler.runtime.geometry import Geometry, block_kind
from reuse_compiler.runtime.kernels import slot_keys
from reuse_compiler.runtime.reference import lsh_planes, reference_reuse_conv2d

from conftest import kernel_backend, run_chain

# (C, M, kernel, stride, padding (t, b, l, r), dilation, L)
SHAPES = [
    (4, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 36),  # window: L = K
    (4, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),  # chunk: L | C
    (4, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),  # chunk: L = C
    (4, 5, (3, 3), (2, 2), (1, 0, 1, 0), (1, 1), 12),  # row: 3 pixels
    (8, 6, (3, 2), (2, 1), (1, 2, 0, 1), (1, 2), 16),  # row: 2 pixels, dilation
    (4, 5, (3, 3), (1, 2), (0, 0, 0, 0), (2, 1), 7),  # general, L does not divide K
    (3, 6, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 10),  # general, RGB-like
    (2, 3, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # 1x1 conv, L = 1
    (6, 4, (2, 3), (3, 2), (2, 0, 1, 1), (1, 1), 5),  # general, asymmetric everything
]
KINDS = {block_kind(k[0], k[1], C, L) for C, _, k, _, _, _, L in SHAPES}
# The exact limit needs every distinct sub-vector in its own cluster. Sign hashing splits
# R^L into few regions when L is small (2H sectors for L = 2), and zero padding makes
# collinear sub-vectors when a sub-vector keeps a single real entry, so this grid uses
# L >= 8 and pads only where padded parts are whole pixels of several channels.
EXACT_SHAPES = [
    (4, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 36),  # window
    (16, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8),  # chunk, L | C
    (16, 5, (3, 3), (2, 1), (1, 1, 1, 1), (1, 1), 16),  # chunk, L = C
    (4, 5, (3, 3), (2, 2), (1, 0, 1, 0), (1, 1), 12),  # row
    (8, 6, (3, 2), (2, 1), (1, 2, 0, 1), (1, 2), 16),  # row, dilation
    (4, 5, (3, 3), (1, 2), (0, 0, 0, 0), (2, 1), 10),  # general, L does not divide K
    (3, 6, (5, 5), (1, 1), (0, 0, 0, 0), (1, 1), 10),  # general
    (6, 4, (2, 3), (3, 2), (0, 0, 0, 0), (1, 1), 9),  # general, asymmetric
]


@pytest.fixture(autouse=True, params=["cpp", "torch"])
def backend(request):
    """Every test here runs on the C++ kernels and on the plain-PyTorch kernels."""
    with kernel_backend(request.param):
        yield request.param


def _inputs(C, M, k, dtype=torch.float64, Nb=3, H=9, W=8):
    x = torch.randn(Nb, C, H, W, dtype=dtype, requires_grad=True)
    w = torch.randn(M, C, *k, dtype=dtype, requires_grad=True)
    b = torch.randn(M, dtype=dtype, requires_grad=True)
    return x, w, b


def test_grid_covers_every_fast_path():
    assert KINDS == {"window", "chunk", "row", "general"}


@pytest.mark.parametrize("centroid", ["mean", "norm"])
@pytest.mark.parametrize("scope", ["batch", "input"])
@pytest.mark.parametrize("C,M,k,s,p,d,L", SHAPES)
def test_ops_match_reference(C, M, k, s, p, d, L, scope, centroid):
    """Same ids as the reference; on those ids, the same clusters, output and gradients."""
    x, w, b = _inputs(C, M, k)
    planes = lsh_planes(L, 5, seed=1, dtype=torch.float64)
    y, st = run_chain(x, w, b, k=k, s=s, p=p, d=d, planes=planes, scope=scope, centroid=centroid)
    _, ref_ids = reference_reuse_conv2d(x, w, b, stride=s, padding=p, dilation=d, L=L, planes=planes, scope=scope)
    assert torch.equal(st["ids"], ref_ids["ids"])
    y_ref, ref = reference_reuse_conv2d(
        x, w, b, stride=s, padding=p, dilation=d, L=L, planes=planes, scope=scope, ids=st["ids"], centroid=centroid
    )
    keys = slot_keys(st["ids"], st["inverse"], st["counts"])
    for blk in range(st["ids"].shape[0]):
        n = len(ref["counts"][blk])
        assert torch.equal(st["counts"][blk, :n], ref["counts"][blk])
        assert (st["counts"][blk, n:] == 0).all()
        assert torch.equal(keys[blk, :n], ref["keys"][blk])
        assert st["inverse"].dtype == torch.int32
        assert torch.equal(st["inverse"][blk].reshape(-1).long(), ref["inverse"][blk])
        torch.testing.assert_close(st["centroids"][blk, :n], ref["centroids"][blk], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), gy)
    want = torch.autograd.grad(y_ref, (x, w, b), gy)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scope", ["batch", "input"])
@pytest.mark.parametrize("C,M,k,s,p,d,L", EXACT_SHAPES)
def test_exact_when_every_cluster_is_one_vector(C, M, k, s, p, d, L, scope):
    """Gaussian input, H = 62: each cluster holds one distinct sub-vector (zero-padding
    sub-vectors only share clusters with identical ones), so reuse equals F.conv2d."""
    x, w, b = _inputs(C, M, k)
    planes = lsh_planes(L, 62, seed=2, dtype=torch.float64)
    y, st = run_chain(x, w, b, k=k, s=s, p=p, d=d, planes=planes, scope=scope)
    g = Geometry.of(st["xp"].shape, k, s, d, L)
    for blk in range(g.nb):  # the premise: members of a cluster are identical
        sub = g.gather_block(st["xp"].detach(), blk)
        torch.testing.assert_close(sub, st["centroids"][blk][st["inverse"][blk].reshape(-1).long()], rtol=0, atol=0)
    if p == (0, 0, 0, 0):
        assert (st["counts"] <= 1).all()  # r_c = 1 in the strict sense
    xpad = F.pad(x, (p[2], p[3], p[0], p[1]))
    y_ref = F.conv2d(xpad, w, b, stride=s, dilation=d)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for g1, g2 in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(y_ref, (x, w, b), gy)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


def test_norm_centroid_is_exact_for_collinear_sub_vectors():
    """Sign hashing cannot tell x from 2x: with the mean centroid they share an output; the
    norm-preserving centroid gives each its own length back, so the conv is exact."""
    base = torch.randn(1, 8, 1, 1, dtype=torch.float64)
    scale = torch.rand(2, 1, 6, 6, dtype=torch.float64) + 0.5  # every pixel a multiple of one vector
    x = base * scale
    w = torch.randn(5, 8, 3, 3, dtype=torch.float64)
    planes = lsh_planes(8, 20, seed=0, dtype=torch.float64)
    kw = dict(k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), planes=planes)
    y_ref = F.conv2d(x, w, padding=1)
    y_norm, st = run_chain(x, w, None, centroid="norm", **kw)
    y_mean, _ = run_chain(x, w, None, centroid="mean", **kw)
    assert st["counts"].shape[1] <= 2  # one cluster for the vectors (and one for padding zeros)
    torch.testing.assert_close(y_norm, y_ref, rtol=1e-12, atol=1e-12)
    assert (y_mean - y_ref).abs().max() > 0.1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_exact_limit_in_lower_precision(dtype, tol):
    x, w, b = _inputs(16, 6, (3, 3), dtype=dtype)
    planes = lsh_planes(16, 62, seed=3)
    y, _ = run_chain(x, w, b, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), planes=planes)
    assert y.dtype == dtype
    y_ref = F.conv2d(x.float(), w.float(), b.float(), padding=1)
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())


def test_equal_sub_vectors_hash_equally_wherever_they_occur():
    """One hash family per layer: a pixel chunk gets the same id in every row and block."""
    x = torch.randn(2, 8, 5, 5)
    v = x[0, :, 0, 0].clone()
    x[:, :, 1, 1] = v
    x[:, :, 3, 2] = v
    planes = lsh_planes(4, 12, seed=0)
    _, st = run_chain(x, torch.randn(3, 8, 3, 3), None, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), planes=planes)
    g = Geometry.of(st["xp"].shape, (3, 3), (1, 1), (1, 1), 4)
    ids = st["ids"].reshape(g.nb, -1)
    seen = {}
    for blk in range(g.nb):
        sub = g.gather_block(st["xp"], blk)
        for n in range(g.N):
            key = tuple(sub[n].tolist())
            assert seen.setdefault(key, ids[blk, n].item()) == ids[blk, n].item()


def test_zero_vector_hashes_to_zero():
    x = torch.zeros(1, 4, 4, 4)
    _, st = run_chain(
        x, torch.randn(2, 4, 3, 3), None, k=(3, 3), s=(1, 1), p=(1, 1, 1, 1), d=(1, 1), planes=lsh_planes(6, 62, seed=0)
    )
    assert (st["ids"] == 0).all() and st["counts"].shape[1] == 1


@pytest.mark.parametrize("L", [9, 3, 4])
def test_backward_matmul_flops_scale_with_clusters_not_rows(L):
    """Backward GEMMs run over |C| rows: duplicating the batch doubles N but, with batch scope,
    adds no cluster, so the backward's matmul FLOPs stay the same, and they equal
    2 GEMMs x 2 x nb x Cmax x L x M."""
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    planes = lsh_planes(L, 6, seed=0)
    x = torch.randn(4, 3, 10, 10)
    flops, cmaxes = [], []
    for xb in (x, torch.cat([x, x])):
        xb = xb.clone().requires_grad_()
        y, st = run_chain(xb, w, None, k=(3, 3), s=(1, 1), p=(0, 0, 0, 0), d=(1, 1), planes=planes)
        with FlopCounterMode(display=False) as fc:
            y.backward(torch.randn_like(y))
        nb, cmax, _ = st["centroids"].shape
        assert fc.get_total_flops() == 2 * 2 * nb * cmax * L * 8
        assert cmax < y.shape[0] * y.shape[2] * y.shape[3]  # per sub-matrix, fewer rows than N
        flops.append(fc.get_total_flops())
        cmaxes.append(cmax)
    assert cmaxes[0] == cmaxes[1] and flops[0] == flops[1]


def _op_args(dtype):
    ops = torch.ops.reuse
    x, w, b = _inputs(4, 5, (3, 3), dtype=dtype, Nb=2, H=6, W=5)
    k, s, p, d = [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]
    planes = lsh_planes(8, 4, seed=0, dtype=dtype)
    xp = ops.im2col(x, k, s, p, d)
    ids = ops.lsh_hash(xp, planes, k, s, d)
    cent, inv, cnt = ops.cluster(xp, ids, k, s, d, 8, 4, "batch")
    yc = ops.centroid_gemm(cent, w)
    y = ops.reconstruct(yc, inv, b)
    leaf = lambda t: t.detach().requires_grad_()
    norms = ops.member_norms(xp, k, s, d, 8)
    cluster_args = (leaf(xp), ids, k, s, d, 8, 4, "batch")
    x_cl = leaf(x.contiguous(memory_format=torch.channels_last))
    cluster_of_input = (xp.detach(), ids, k, s, d, 8, 4, "batch", x_cl, p)  # the backward goes to x
    return {
        "member_norms": (leaf(xp), k, s, d, 8),
        "member_norms_of_input": (
            xp.detach(),
            k,
            s,
            d,
            8,
            leaf(x.contiguous(memory_format=torch.channels_last)),  # channels-last: the backward goes to x
            p,
        ),
        "member_norms_input_grad": (torch.randn_like(norms), norms.detach(), x.detach(), k, s, p, d, 8),
        # backward ops have no autograd of their own (no double backward): plain inputs
        "member_norms_grad": (torch.randn_like(norms), norms.detach(), xp.detach(), k, s, d, 8),
        "reconstruct_scaled": (leaf(yc), inv, b, leaf(norms)),
        "reconstruct_scales_grad": (torch.randn_like(y), yc.detach(), inv),
        "reconstruct_grad_scaled": (torch.randn_like(y), inv, cnt.shape[1], norms.detach()),
        "reconstruct_grad_scaled_fused": (torch.randn_like(y), yc.detach(), inv, norms.detach()),
        "cluster_grad": (torch.randn_like(cent), inv, cnt, list(xp.shape), k, s, d),
        "reconstruct_grad": (torch.randn_like(y), inv, cnt.shape[1]),
        "im2col": (x, k, s, p, d),
        "lsh_hash": (xp.detach(), planes, k, s, d),
        "cluster": cluster_args,
        "cluster_input_scope": (leaf(xp), ids, k, s, d, 8, 4, "input"),
        "cluster_of_input": cluster_of_input,
        "cluster_input_grad": (torch.randn_like(cent), inv, cnt, list(xp.shape), k, s, p, d),
        "cluster_norms": cluster_args,  # the same arguments as cluster
        "cluster_norms_of_input": cluster_of_input,
        "member_norms_grad_into": (
            torch.randn_like(xp),
            torch.randn_like(norms),
            norms.detach(),
            xp.detach(),
            k,
            s,
            d,
            8,
        ),
        "member_norms_grad_into_input": (
            torch.randn_like(x.contiguous(memory_format=torch.channels_last)),
            torch.randn_like(norms),
            norms.detach(),
            x.detach(),
            k,
            s,
            d,
            8,
            p,
        ),
        "centroid_gemm": (leaf(cent), w),
        "reconstruct": (leaf(yc), inv, b),
        "reconstruct_no_bias": (leaf(yc), inv, None),
        "unit_rows": (leaf(torch.cat([cent, torch.zeros_like(cent[:, :1])], 1)),),  # a zero row too
        "unit_rows_grad": _unit_rows_grad_args(torch.cat([cent, torch.zeros_like(cent[:, :1])], 1)),
        "check_input": (x, x.shape[1], "conv"),
    }


def _unit_rows_grad_args(c):
    c = c.detach()
    return (torch.ops.reuse.unit_rows(c), c.norm(dim=-1, keepdim=True), torch.randn_like(c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "name",
    [
        "im2col",
        "lsh_hash",
        "cluster",
        "cluster_input_scope",
        "centroid_gemm",
        "reconstruct",
        "reconstruct_no_bias",
        "cluster_grad",
        "reconstruct_grad",
        "member_norms",
        "member_norms_grad",
        "member_norms_of_input",
        "member_norms_input_grad",
        "cluster_of_input",
        "cluster_input_grad",
        "reconstruct_scaled",
        "reconstruct_scales_grad",
        "reconstruct_grad_scaled",
        "reconstruct_grad_scaled_fused",
        "cluster_norms",
        "cluster_norms_of_input",
        "member_norms_grad_into",
        "member_norms_grad_into_input",
        "unit_rows",
        "unit_rows_grad",
        "check_input",
    ],
)
def test_opcheck(name, dtype):
    op_name = {
        "cluster_input_scope": "cluster",
        "reconstruct_no_bias": "reconstruct",
        "reconstruct_scaled": "reconstruct",
        "reconstruct_grad_scaled": "reconstruct_grad",
        "reconstruct_grad_scaled_fused": "reconstruct_grad_scaled",
        "member_norms_of_input": "member_norms",
        "cluster_of_input": "cluster",
        "cluster_norms_of_input": "cluster_norms",
        "member_norms_grad_into_input": "member_norms_grad_into",
    }.get(name, name)
    torch.library.opcheck(getattr(torch.ops.reuse, op_name).default, _op_args(dtype)[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_scaled_backward_equals_the_two_ops(dtype):
    """reconstruct_grad_scaled == (reconstruct_grad with scales, reconstruct_scales_grad)."""
    args = _op_args(dtype)
    g_y, yc, inv, norms = args["reconstruct_grad_scaled_fused"]
    d_yc, d_s = torch.ops.reuse.reconstruct_grad_scaled(g_y, yc, inv, norms)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_yc, torch.ops.reuse.reconstruct_grad(g_y, inv, yc.shape[1], norms), **tol)
    torch.testing.assert_close(d_s, torch.ops.reuse.reconstruct_scales_grad(g_y, yc, inv), **tol)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("L", [8, 16, 48])
def test_cluster_norms_equals_cluster_and_member_norms(channels_last, L):
    """The fused op returns what cluster and member_norms return, and its backward (both
    input gradients in one buffer) equals the sum autograd forms from the two ops."""
    ops = torch.ops.reuse
    x, w, _ = _inputs(16, 5, (3, 3), dtype=torch.float64, Nb=2, H=7, W=6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    k, s, p, d = [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]
    planes = lsh_planes(L, 5, seed=0, dtype=torch.float64)
    grads, outs = [], []
    for fused in (True, False):
        xx = x.detach().clone().requires_grad_()
        xp = ops.im2col(xx, k, s, p, d)
        ids = ops.lsh_hash(xp, planes, k, s, d)
        if fused:
            cent, inv, cnt, norms = ops.cluster_norms(xp, ids, k, s, d, L, 5, "batch", xx, p)
        else:
            cent, inv, cnt = ops.cluster(xp, ids, k, s, d, L, 5, "batch", xx, p)
            norms = ops.member_norms(xp, k, s, d, L, xx, p)
        gen = torch.Generator().manual_seed(1)
        loss = (cent * torch.randn(cent.shape, generator=gen, dtype=cent.dtype)).sum()
        loss = loss + (norms * torch.randn(norms.shape, generator=gen, dtype=norms.dtype)).sum()
        loss.backward()
        outs.append((cent, inv, cnt, norms))
        grads.append(xx.grad)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_rows_equals_normalize(dtype):
    """unit_rows is F.normalize(c, dim=-1), forward and backward, zero rows included
    (whose denominator is the constant eps); float64 gradcheck."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 7, 37, generator=g, dtype=dtype)
    c[0, 2] = 0
    c[1, 4] = 1e-14  # below eps
    gy = torch.randn(c.shape, generator=g, dtype=dtype)
    got, want = c.clone().requires_grad_(), c.clone().requires_grad_()
    torch.ops.reuse.unit_rows(got).backward(gy)
    F.normalize(want, dim=-1).backward(gy)
    tol = dict(rtol=1e-15, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.ops.reuse.unit_rows(c), F.normalize(c, dim=-1), **tol)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.grad, want.grad, **tol)
    if dtype != torch.float64:
        return
    assert torch.autograd.gradcheck(
        torch.ops.reuse.unit_rows, (torch.randn(4, 3, 6, dtype=torch.float64).requires_grad_(),)
    )


def test_norm_centroid_backward_holds_one_input_gradient():
    """cluster_norms writes the input's two gradients into one buffer: its backward peaks
    at least ~one input-sized tensor below cluster + member_norms (which autograd holds as
    two tensors before adding them)."""
    if not kernels.REQUIRE_EXTENSION:
        pytest.skip("the shared buffer is the C++ kernels' (the torch fallback adds a full temporary)")
    import gc

    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    ops = torch.ops.reuse
    gen = torch.Generator().manual_seed(0)
    # few clusters (small centroids), so the peak is where the input gradients are formed
    x = F.relu(torch.randn(32, 32, 14, 14, generator=gen)).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 32, 5, 5, generator=gen) * 0.05
    k, s, p, d, L, H = [5, 5], [1, 1], [2, 2, 2, 2], [1, 1], 800, 4
    planes = lsh_planes(L, H, seed=0)

    def chain(fused):
        xx = x.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        xp = ops.im2col(xx, k, s, p, d)
        ids = ops.lsh_hash(xp, planes, k, s, d)
        if fused:
            cent, inv, _, norms = ops.cluster_norms(xp, ids, k, s, d, L, H, "batch", xx, p)
        else:
            cent, inv, _ = ops.cluster(xp, ids, k, s, d, L, H, "batch", xx, p)
            norms = ops.member_norms(xp, k, s, d, L, xx, p)
        del xp, ids
        y = ops.reconstruct(ops.centroid_gemm(ops.unit_rows(cent), ww), inv, None, norms)
        del cent, inv, norms
        y.backward(torch.ones_like(y))

    def peak(fused):
        """Most bytes alive at once among the tensors the chain allocates (the profiler's
        memory timeline, allocations made before it started left out)."""
        chain(fused)  # warm-up
        gc.collect()
        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            chain(fused)
        live, now, top = {}, 0, 0
        for _, action, (key, _), nbytes in prof._memory_profile().timeline:
            if action == Action.CREATE:
                live[key] = nbytes
                now += nbytes
            elif action == Action.DESTROY and key in live:
                now -= live.pop(key)
            top = max(top, now)
        return top

    assert peak(False) - peak(True) > 0.75 * x.numel() * x.element_size()


def test_reconstruct_keeps_centroid_outputs_only_for_the_scales_gradient():
    """A first layer's norms (of the model's input) need no gradient: reconstruct then does
    not keep y_c for its backward (it would only raise the peak), and d y_c is unchanged."""
    g_y, yc, inv, norms = _op_args(torch.float64)["reconstruct_grad_scaled_fused"]
    grads = []
    for norms_grad in (True, False):
        yc_ = yc.detach().clone().requires_grad_()
        s_ = norms.detach().clone().requires_grad_(norms_grad)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            y = torch.ops.reuse.reconstruct(yc_, inv, None, s_)
        kept_yc = any(t.shape == yc.shape and t.dtype == yc.dtype for t in saved)
        assert kept_yc == norms_grad
        y.backward(g_y)
        grads.append(yc_.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("centroid", ["mean", "norm"])
def test_gradcheck_chain_float64(centroid):
    """float64 gradcheck of the op chain w.r.t. input, weight and bias (input without zeros)."""
    planes = lsh_planes(6, 5, seed=4, dtype=torch.float64)
    x, w, b = _inputs(3, 4, (3, 2), Nb=2, H=5, W=5)

    def f(x, w, b):
        return run_chain(x, w, b, k=(3, 2), s=(2, 1), p=(1, 1, 0, 1), d=(1, 1), planes=planes, centroid=centroid)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("C,M,k,s,p,d,L", SHAPES)
def test_norms_backward_into_the_input_equals_the_padded_one(C, M, k, s, p, d, L):
    """member_norms given x: its gradient for x equals the padded input's gradient (what
    member_norms_grad gives) with the padding cut off."""
    ops = torch.ops.reuse
    x = torch.randn(2, C, 7, 6, dtype=torch.float64)
    k, s, p, d = list(k), list(s), list(p), list(d)
    xp = ops.im2col(x, k, s, p, d)
    norms = ops.member_norms(xp, k, s, d, L)
    gn = torch.randn_like(norms)
    padded = ops.member_norms_grad(gn, norms, xp, k, s, d, L)  # (Nb, Hp, Wp, C)
    want = padded[:, p[0] : p[0] + 7, p[2] : p[2] + 6].permute(0, 3, 1, 2)
    got = ops.member_norms_input_grad(gn, norms, x, k, s, p, d, L)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("centroid", ["mean", "norm"])
@pytest.mark.parametrize("C,M,k,s,p,d,L", SHAPES)
def test_chain_on_channels_last_input_matches_reference(C, M, k, s, p, d, L, centroid):
    """With a channels-last input the cluster's and the norms' backwards write x's gradient
    directly (no padded gradient): same output and gradients as the reference."""
    x, w, b = _inputs(C, M, k)
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    planes = lsh_planes(L, 5, seed=1, dtype=torch.float64)
    y, st = run_chain(x, w, b, k=k, s=s, p=p, d=d, planes=planes, centroid=centroid)
    y_ref, _ = reference_reuse_conv2d(
        x, w, b, stride=s, padding=p, dilation=d, L=L, planes=planes, ids=st["ids"], centroid=centroid
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for g1, g2 in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(y_ref, (x, w, b), gy)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("C,M,k,s,p,d,L", SHAPES)
def test_cluster_backward_into_the_input_equals_the_padded_one(C, M, k, s, p, d, L):
    """cluster_input_grad == cluster_grad with the padding cut off."""
    ops = torch.ops.reuse
    x = torch.randn(2, C, 7, 6, dtype=torch.float64)
    k, s, p, d = list(k), list(s), list(p), list(d)
    xp = ops.im2col(x, k, s, p, d)
    ids = ops.lsh_hash(xp, lsh_planes(L, 4, seed=2, dtype=torch.float64), k, s, d)
    cent, inv, cnt = ops.cluster(xp, ids, k, s, d, L, 4, "batch")
    gc = torch.randn_like(cent)
    padded = ops.cluster_grad(gc, inv, cnt, list(xp.shape), k, s, d)
    want = padded[:, p[0] : p[0] + 7, p[2] : p[2] + 6].permute(0, 3, 1, 2)
    got = ops.cluster_input_grad(gc, inv, cnt, list(xp.shape), k, s, p, d)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding", [(2, 2, 2, 2), (2, 0, 1, 3), (0, 0, 0, 0)])
def test_im2col_is_the_zero_padded_input(padding, dtype):
    """im2col's padded copy (one C++ pass for a channels-last input, else PyTorch's) equals
    F.pad of the input, channels-last, in both layouts."""
    x = torch.randn(3, 5, 6, 7, dtype=dtype)
    t, b, left, r = padding
    want = F.pad(x, (left, r, t, b)).permute(0, 2, 3, 1)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = torch.ops.reuse.im2col(x.contiguous(memory_format=layout), [3, 3], [1, 1], list(padding), [1, 1])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.is_contiguous()


@pytest.mark.parametrize("L", [36, 4, 2, 12])
def test_non_finite_sub_vectors_get_a_cluster_of_their_own(L):
    """reuse.cluster with one NaN pixel (batch scope): per block, exactly the sub-vectors that
    contain it share one non-finite centroid, and every other centroid is the mean of its
    members (a NaN sub-vector hashes to id 0 with the zero vectors; without this the zero
    cluster, so every image, would turn NaN)."""
    ops = torch.ops.reuse
    torch.manual_seed(0)
    k, s, p, d = [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]
    x = torch.randn(2, 4, 6, 6)
    x[1, :, 2, 1] = float("nan")
    xp = ops.im2col(x, k, s, p, d)
    ids = ops.lsh_hash(xp, lsh_planes(L, 5, seed=0), k, s, d)
    cent, inv, counts = ops.cluster(xp, ids, k, s, d, L, 5, "batch", x, p)
    nb = 36 // L
    # the sub-vectors, (N, nb, L), in the reference's (kh, kw, c) column order
    rows = F.unfold(F.pad(x, (1, 1, 1, 1)), 3).view(2, 4, 9, 36).permute(0, 3, 2, 1).reshape(-1, 36)
    sub = rows.view(-1, nb, L)
    inv = inv.reshape(nb, -1).long()
    nonfinite = ~torch.isfinite(cent).all(-1)
    for b in range(nb):
        has_nan = sub[:, b].isnan().any(-1)
        assert int(nonfinite[b].sum()) == int(has_nan.any())
        assert torch.equal(nonfinite[b][inv[b]], has_nan)
        sums = torch.zeros(cent.shape[1], L).index_add_(0, inv[b], torch.nan_to_num(sub[:, b], nan=0.0))
        ref = sums / counts[b].clamp(min=1)[:, None]
        torch.testing.assert_close(cent[b][~nonfinite[b]], ref[~nonfinite[b]], rtol=1e-5, atol=1e-6)


def test_cluster_rejects_ids_wider_than_h():
    """Ids past 2^H (planes of another H) are an error, not a count outside the table."""
    ops = torch.ops.reuse
    k, s, p, d = [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]
    xp = ops.im2col(torch.randn(2, 4, 6, 6), k, s, p, d)
    ids = ops.lsh_hash(xp, lsh_planes(9, 12, seed=0), k, s, d)
    assert int(ids.max()) >= 16
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 2\^H\) with H = 4"):
        ops.cluster(xp, ids, k, s, d, 9, 4, "batch")


@pytest.mark.parametrize("L", [2, 4])
def test_hash_of_a_non_contiguous_padded_input(L):
    """lsh_hash and cluster read a strided xp (a channel slice) as its contiguous copy."""
    ops = torch.ops.reuse
    k, s, d = [3, 3], [1, 1], [1, 1]
    xp = torch.randn(2, 7, 7, 8)[..., :4]
    planes = lsh_planes(L, 6, seed=0)
    ids = ops.lsh_hash(xp, planes, k, s, d)
    assert torch.equal(ids, ops.lsh_hash(xp.contiguous(), planes, k, s, d))
    got = ops.cluster(xp, ids, k, s, d, L, 6, "batch")[0]
    torch.testing.assert_close(got, ops.cluster(xp.contiguous(), ids, k, s, d, L, 6, "batch")[0])
