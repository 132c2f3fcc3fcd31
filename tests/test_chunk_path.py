"""The C++ chunk path (L divides C, stride 1, "batch" scope): the centroid sums and their
backward through per-pixel region tables, the member norms per pixel chunk. It must give
what the per-row kernels and the plain-PyTorch kernels give, and the reference's gradients."""

import pytest
import torch

from reuse_compiler.runtime import extension, kernels
from reuse_compiler.runtime.geometry import Geometry
from reuse_compiler.runtime.reference import lsh_planes, reference_reuse_conv2d

from conftest import run_chain

ops = torch.ops.reuse

# (C, kernel, padding (t, b, l, r), dilation, L, image (H, W))
CHUNK_SHAPES = [
    (4, (3, 3), (1, 1, 1, 1), (1, 1), 2, (9, 8)),  # two chunks per pixel
    (4, (3, 3), (1, 1, 1, 1), (1, 1), 4, (9, 8)),  # L = C
    (8, (5, 5), (2, 2, 2, 2), (1, 1), 2, (7, 10)),  # CifarNet-like, four chunks
    (6, (3, 2), (2, 0, 1, 3), (2, 3), 3, (8, 9)),  # asymmetric padding, dilation
    (4, (2, 3), (0, 0, 0, 0), (3, 1), 4, (9, 6)),  # dilation leaves uncovered rows
    (4, (3, 3), (1, 1, 1, 1), (1, 1), 2, (2, 2)),  # image smaller than the kernel's span
]


@pytest.fixture(autouse=True)
def _cpp_only():
    if extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    old_mode = kernels.CHUNK_PATH
    kernels.REQUIRE_EXTENSION = True
    yield
    kernels.REQUIRE_EXTENSION = False
    kernels.CHUNK_PATH = old_mode


def _stage(C, k, p, d, L, hw, dtype, H=4, Nb=3):
    x = torch.relu(torch.randn(Nb, C, *hw, dtype=dtype)) + 0.01 * torch.randn(Nb, C, *hw, dtype=dtype)
    k, s, d = list(k), [1, 1], list(d)
    xp = ops.im2col(x, k, s, list(p), d)
    ids = ops.lsh_hash(xp, lsh_planes(L, H, seed=3, dtype=dtype), k, s, d)
    inv, cnt = kernels.compact(ids, H, "batch")
    g = Geometry.of(xp.shape, k, s, d, L)
    return xp, ids, inv, cnt, g


def _with(mode, fn):
    kernels.CHUNK_PATH = mode
    return fn()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C,k,p,d,L,hw", CHUNK_SHAPES)
def test_chunk_path_matches_row_kernels_and_torch(C, k, p, d, L, hw, dtype):
    xp, ids, inv, cnt, g = _stage(C, k, p, d, L, hw, dtype)
    assert g.kind == "chunk"
    keys = kernels.slot_keys(ids, inv, cnt)
    inv2, cnt2, keys2 = kernels.compact(ids, 4, "batch", with_keys=True)
    assert torch.equal(inv2, inv) and torch.equal(cnt2, cnt) and torch.equal(keys2, keys)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)

    fast = _with("always", lambda: kernels.centroid_means(xp, inv, cnt, g, keys))
    rows = _with("never", lambda: kernels.centroid_means(xp, inv, cnt, g, keys))
    with extension.disabled():
        plain = kernels.centroid_means(xp, inv, cnt, g)
    torch.testing.assert_close(fast, rows, **tol)
    torch.testing.assert_close(fast, plain, **tol)
    # told where the input sits in its zero padding, the chunk path skips the padding
    interior = (p[0], p[2], *hw)
    torch.testing.assert_close(
        _with("always", lambda: kernels.centroid_means(xp, inv, cnt, g, keys, interior)), plain, **tol
    )

    gc = torch.randn_like(fast)
    fast = _with("always", lambda: kernels.centroid_means_backward(gc, inv, cnt, g, dtype, keys))
    rows = _with("never", lambda: kernels.centroid_means_backward(gc, inv, cnt, g, dtype, keys))
    with extension.disabled():
        plain = kernels.centroid_means_backward(gc, inv, cnt, g, dtype)
    torch.testing.assert_close(fast, rows, **tol)
    torch.testing.assert_close(fast, plain, **tol)
    fast = _with("always", lambda: kernels.centroid_means_backward(gc, inv, cnt, g, dtype, keys, interior))
    with extension.disabled():
        plain = kernels.centroid_means_backward(gc, inv, cnt, g, dtype, interior=interior)
    torch.testing.assert_close(fast, plain, **tol)

    norms = kernels.member_norms(xp, g)  # chunk_pieces: per pixel chunk, gathered
    gn = torch.randn_like(norms)
    dn = kernels.member_norms_backward(gn, norms, xp, g)
    with extension.disabled():
        torch.testing.assert_close(norms, kernels.member_norms(xp, g), **tol)
        torch.testing.assert_close(dn, kernels.member_norms_backward(gn, norms, xp, g), **tol)


def test_member_norms_chunk_with_stride():
    """The per-pixel-chunk norms do not need stride 1 (only the centroid tables do)."""
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    k, s, p, d = [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]
    xp = ops.im2col(x, k, s, p, d)
    g = Geometry.of(xp.shape, k, s, d, 2)
    norms = kernels.member_norms(xp, g)
    gn = torch.randn_like(norms)
    dn = kernels.member_norms_backward(gn, norms, xp, g)
    with extension.disabled():
        torch.testing.assert_close(norms, kernels.member_norms(xp, g), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dn, kernels.member_norms_backward(gn, norms, xp, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("centroid", ["mean", "norm"])
@pytest.mark.parametrize("C,k,p,d,L,hw", CHUNK_SHAPES[:4])
def test_chain_on_chunk_path_matches_reference(C, k, p, d, L, hw, centroid, layout):
    """The whole chain with the chunk path forced: the reference's output and gradients
    (channels-last: the chunk backward writes x's gradient, no padded one)."""
    kernels.CHUNK_PATH = "always"
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[layout]
    x = torch.randn(3, C, *hw, dtype=torch.float64).contiguous(memory_format=fmt)
    x.requires_grad_()
    w = torch.randn(5, C, *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    planes = lsh_planes(L, 4, seed=1, dtype=torch.float64)
    y, st = run_chain(x, w, b, k=k, s=(1, 1), p=p, d=d, planes=planes, centroid=centroid)
    y_ref, _ = reference_reuse_conv2d(
        x, w, b, stride=(1, 1), padding=p, dilation=d, L=L, planes=planes, ids=st["ids"], centroid=centroid
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    for g1, g2 in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(y_ref, (x, w, b), gy)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_on_chunk_geometry(dtype):
    """cluster (whose autograd saves the slot keys) and cluster_grad with keys."""
    kernels.CHUNK_PATH = "always"
    xp, ids, inv, cnt, g = _stage(4, (3, 3), (1, 1, 1, 1), (1, 1), 2, (6, 5), dtype, Nb=2)
    k, s, d = [3, 3], [1, 1], [1, 1]
    leaf = xp.detach().requires_grad_()
    torch.library.opcheck(ops.cluster.default, (leaf, ids, k, s, d, 2, 4, "batch"))
    cent, inv, cnt = ops.cluster(xp, ids, k, s, d, 2, 4, "batch")
    keys = kernels.slot_keys(ids, inv, cnt)
    torch.library.opcheck(ops.cluster_grad.default, (torch.randn_like(cent), inv, cnt, list(xp.shape), k, s, d, keys))


def test_cluster_hands_its_keys_to_the_backward(monkeypatch):
    """compact's slot keys reach cluster's autograd without a second pass over the ids, and
    forwards whose keys no backward collects leave nothing behind."""
    import gc

    from reuse_compiler.runtime import ops as rops

    kernels.CHUNK_PATH = "always"
    C, k, p, d, L, hw = CHUNK_SHAPES[2]
    x = torch.randn(3, C, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, C, *k, dtype=torch.float64, requires_grad=True)
    planes = lsh_planes(L, 4, seed=1, dtype=torch.float64)
    y_expected, _ = run_chain(x, w, None, k=k, s=(1, 1), p=p, d=d, planes=planes, centroid="mean")
    g_expected = torch.autograd.grad(y_expected.sum(), (x, w))

    def no_scan(*a, **kw):
        raise AssertionError("cluster's setup_context scanned the ids for the slot keys")

    monkeypatch.setattr(kernels, "chunk_keys", no_scan)
    y, _ = run_chain(x, w, None, k=k, s=(1, 1), p=p, d=d, planes=planes, centroid="mean")
    for g1, g2 in zip(torch.autograd.grad(y.sum(), (x, w)), g_expected):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for _ in range(3):
            run_chain(x, w, None, k=k, s=(1, 1), p=p, d=d, planes=planes, centroid="mean")
    gc.collect()
    assert not rops._KEYS


@pytest.mark.parametrize("threads", [1, 3])
def test_chunk_path_independent_of_thread_count(threads):
    """The row cuts that share the table sums out among the threads depend on their number;
    the sums must not (a CifarNet-like stage, with and without the interior)."""
    C, k, p, d, L, hw = CHUNK_SHAPES[2]
    xp, ids, inv, cnt, g = _stage(C, k, p, d, L, (11, 10), torch.float64, Nb=5)
    keys = kernels.slot_keys(ids, inv, cnt)
    interior = (p[0], p[2], 11, 10)
    gc = torch.randn(*cnt.shape, L, dtype=torch.float64)
    with extension.disabled():
        want = kernels.centroid_means(xp, inv, cnt, g)
        want_b = kernels.centroid_means_backward(gc, inv, cnt, g, torch.float64, interior=interior)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for inner in (None, interior):
            got = _with("always", lambda inner=inner: kernels.centroid_means(xp, inv, cnt, g, keys, inner))
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        got_b = _with("always", lambda: kernels.centroid_means_backward(gc, inv, cnt, g, torch.float64, keys, interior))
        torch.testing.assert_close(got_b, want_b, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(old)
