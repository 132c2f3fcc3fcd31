"""The C++ gather-sum kernels (reconstruct and its gradients) against the equations written
out in plain PyTorch, on the shapes that take each code path: full 64-byte column strips and
a narrower last strip (M), one block or several per thread, and block groups (tables larger
than the L2 budget, so that one thread's blocks are processed in several groups); and the
centroid sums of one block over many rows (split among threads into private sums)."""

import pytest
import torch

from reuse_compiler.runtime import extension, kernels

pytestmark = pytest.mark.skipif(not extension.enabled(), reason="C++ kernels disabled")


@pytest.fixture(autouse=True)
def _require_extension():
    """A failed build must fail these tests, not fall back to the kernels they are checked against."""
    if extension.get() is None:
        pytest.fail("the C++ kernels did not build")
    kernels.REQUIRE_EXTENSION = True
    yield
    kernels.REQUIRE_EXTENSION = False


def _case(nb, cmax, N, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    yc = torch.randn(nb, cmax, M, generator=g, dtype=dtype)
    inv = torch.randint(0, cmax, (nb, N), generator=g, dtype=torch.int32)
    inv[:, : N // 3] = 0  # a hot slot, as real clusterings have
    scales = torch.rand(nb, N, generator=g, dtype=dtype)
    bias = torch.randn(M, generator=g, dtype=dtype)
    dy = torch.randn(N, M, generator=g, dtype=dtype)
    return yc, inv, scales, bias, dy


def _ref_forward(yc, inv, bias, scales):
    nb = yc.shape[0]
    terms = yc[torch.arange(nb)[:, None], inv.long()]  # (nb, N, M)
    if scales is not None:
        terms = terms * scales[..., None]
    y = terms.sum(0)
    return y if bias is None else y + bias


def _ref_backward(dy, inv, cmax, scales, yc=None):
    nb = inv.shape[0]
    dyc = torch.zeros(nb, cmax, dy.shape[1], dtype=dy.dtype)
    for b in range(nb):
        src = dy if scales is None else dy * scales[b, :, None]
        dyc[b].index_add_(0, inv[b].long(), src)
    d_scales = None if yc is None else (dy[None] * yc[torch.arange(nb)[:, None], inv.long()]).sum(-1)
    return dyc, d_scales


SHAPES = [
    (1, 7, 50, 5),  # one block (fewer than threads), few rows: one range; a narrow strip only
    (1, 40, 5000, 64),  # one block, rows split among threads into private sums
    (1, 13, 3001, 70),  # the same with a narrow last strip and uneven ranges
    (3, 11, 97, 64),  # full strips (64 floats / 2 x 32 doubles)
    (12, 300, 130, 80),  # a full strip and a narrow one; 12 x 96-192 KB tables (> 1 MB): block groups
    (40, 9, 260, 16),  # many blocks, narrow strip, rows across two row tiles
]


@pytest.mark.parametrize("nb,cmax,N,M", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_scales", [False, True])
def test_reconstruct_matches_equation(nb, cmax, N, M, dtype, with_scales):
    yc, inv, scales, bias, _ = _case(nb, cmax, N, M, dtype)
    s = scales if with_scales else None
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.reconstruct_rows(yc, inv, bias, s), _ref_forward(yc, inv, bias, s), **tol)
    torch.testing.assert_close(kernels.reconstruct_rows(yc, inv, None, s), _ref_forward(yc, inv, None, s), **tol)


@pytest.mark.parametrize("nb,cmax,N,M", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reconstruct_gradients_match_equation(nb, cmax, N, M, dtype):
    yc, inv, scales, _, dy = _case(nb, cmax, N, M, dtype, seed=1)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for s in (None, scales):
        got = kernels.reconstruct_rows_backward(dy, inv, cmax, s)
        torch.testing.assert_close(got, _ref_backward(dy, inv, cmax, s)[0], **tol)
    dyc, d_scales = kernels.reconstruct_scaled_backward(dy, yc, inv, scales)
    ref_dyc, ref_ds = _ref_backward(dy, inv, cmax, scales, yc)
    torch.testing.assert_close(dyc, ref_dyc, **tol)
    torch.testing.assert_close(d_scales.reshape(nb, N), ref_ds, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# one block (L = K), or five (one kernel row each): rows split into private sums
@pytest.mark.parametrize("C,L", [(1, 25), (3, 75), (1, 5), (3, 15)])
def test_centroid_means_few_blocks_many_rows_match_torch(C, L, dtype):
    from reuse_compiler.runtime import ops
    from reuse_compiler.runtime.geometry import Geometry
    from reuse_compiler.runtime.reference import lsh_planes

    g0 = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(24, C, 12, 12, generator=g0, dtype=dtype))
    x[:, :, :4] = 0  # many all-zero windows: one hot slot, as on the digits
    k, s, p, d = [5, 5], [1, 1], [2, 2, 2, 2], [1, 1]
    xp = ops.im2col(x, k, s, p, d)
    ids = ops.lsh_hash(xp, lsh_planes(L, 6, seed=1, dtype=dtype), k, s, d)
    inv, cnt = kernels.compact(ids, 6, "batch")
    g = Geometry.of(xp.shape, k, s, d, L)
    assert cnt.shape[0] in (1, 5) and g.N >= 2048  # more than one row range per thread
    got = kernels.centroid_means(xp, inv, cnt, g)
    with extension.disabled():
        want = kernels.centroid_means(xp, inv, cnt, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H", [1, 8, 13, 40, 63])
def test_pack_signs_matches_pack_bits_in_every_layout(H, dtype):
    from reuse_compiler.runtime.reference import pack_bits

    g = torch.Generator().manual_seed(H)
    nchw = torch.randn(3, H, 5, 7, generator=g, dtype=dtype)
    nchw[0, :, 0] = 0.0  # zero is not > 0
    nchw[1, :, 1] = -0.0
    views = {
        "rows with a padded stride": torch.randn(50, H + 3, generator=g, dtype=dtype)[:, :H],
        "contiguous": nchw.permute(0, 2, 3, 1).contiguous(),
        "permuted NCHW": nchw.permute(0, 2, 3, 1),
        "channels-last NCHW, permuted": nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1),
        "other strides (fallback)": nchw.permute(0, 3, 2, 1),
    }
    for name, proj in views.items():
        assert torch.equal(kernels._pack_last(proj), pack_bits(proj)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L,H", [(64, 8), (64, 1), (5, 9), (32, 16), (16, 17), (64, 40), (7, 63)])
def test_hash_rows_matches_pack_bits_of_the_projections(L, H, dtype):
    """The fused hash kernel (tiles of 8 rows, planes in 8- or 16-column blocks) gives every
    row the id of Eq. 4 computed from the projections, zero rows 0; any H up to 63 and any
    number of rows (a partial last tile)."""
    from reuse_compiler.runtime.reference import lsh_planes, pack_bits

    g = torch.Generator().manual_seed(L * 100 + H)
    rows = torch.randn(1003, L, generator=g, dtype=dtype)
    rows[::7] = 0.0
    planes = lsh_planes(L, H, seed=3, dtype=dtype)
    got = kernels._hash_rows(rows, planes)
    proj = rows @ planes
    want = pack_bits(proj)
    # the kernel sums in another order: compare the bits whose projection is not within
    # rounding of the hyperplane (float64: every bit)
    sure = proj.abs() > (1e-4 if dtype == torch.float32 else 0) * rows.norm(dim=1, keepdim=True)
    sure |= proj == 0
    weights = 2 ** torch.arange(H, dtype=torch.int64)
    keep = (sure.long() * weights).sum(1)
    assert torch.equal(got & keep, want & keep)
    assert torch.equal(got[::7], torch.zeros_like(got[::7]))
