"""Implementations behind the ``reuse`` custom ops, in plain PyTorch.

Every function here works on the lazy im2col view (see :mod:`.geometry`) and never builds
the N x K matrix. The naive oracle is :mod:`.reference`; tests compare the two.

Cluster table layout, shared by all ops: each sub-matrix b owns ``Cmax`` slots and
``inverse[b, n]`` is row n's slot in sub-matrix b. Slots rank the clusters' hash ids among
the ids present in sub-matrix b (in the "input" scope, (image, id) pairs), so the order
equals ``torch.unique``'s. Slots past a block's cluster count are empty (count 0).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import extension
from .geometry import Geometry, conv_out_size
from .reference import pack_bits

__all__ = [
    "compute_dtype",
    "hash_ids",
    "compact",
    "slot_keys",
    "centroid_means",
    "centroid_means_backward",
    "pack_ids",
    "reconstruct_rows",
    "reconstruct_rows_backward",
    "reconstruct_scales_backward",
    "reconstruct_scaled_backward",
    "member_norms",
    "member_norms_backward",
    "unit_rows",
    "unit_rows_torch",
    "unit_rows_backward",
    "unit_rows_backward_torch",
    "pad_channels_last",
    "pad_nhwc_torch",
    "zero_skip_weight_grad",
    "conv_pool_forward",
    "conv_pool_weight_grad",
    "conv_pool_sizes",
]

# Above this many table slots the clustering sorts instead of counting.
_DENSE_SLOTS = 1 << 22


# The C++ chunk path for the centroid sums and their backward (L divides C, stride 1, batch
# scope): "auto" takes it when its tables are cheaper than the per-row kernels, "always"
# whenever it applies (tests), "never" not at all.
CHUNK_PATH = "auto"
_CHUNK_MODES = {"auto": 0, "always": 1, "never": 2}

# Tests set this to make a silent fallback to the plain-PyTorch kernels an error.
REQUIRE_EXTENSION = False
_EXT_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


def _ext(*tensors):
    """The C++ kernels if they apply to these tensors (CPU; float32/64, int32 or int64)."""
    tensors = [t for t in tensors if t is not None]
    ok = all(t.device.type == "cpu" and t.dtype in _EXT_DTYPES for t in tensors)
    ext = extension.get() if ok else None
    if ext is None and REQUIRE_EXTENSION and extension.enabled():
        full = [t for t in tensors if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)]
        if full:
            raise RuntimeError(
                f"reuse kernels: fell back to PyTorch for {[(t.dtype, tuple(t.shape)) for t in tensors]}"
            )
    return ext


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are hashed and averaged in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lengths(t: torch.Tensor, dim: int = -1, keepdim: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.norm(dim=dim, keepdim=keepdim, dtype=dtype)``, taken again in float64 where float32's
    sums of squares overflowed (entries above about 1e19: the length is finite, its square is
    not): the norm centroid's lengths stay finite wherever F.conv2d's outputs do."""
    n = t.norm(dim=dim, keepdim=keepdim, dtype=dtype)
    return _finite_lengths(n, lambda: t.double().norm(dim=dim, keepdim=keepdim))


def _finite_lengths(norms: torch.Tensor, again) -> torch.Tensor:
    """``norms`` or, where one is not finite and they are not float64, ``again()`` (the same
    lengths computed in float64) in their dtype. A NaN or Inf entry of the input gives the same
    non-finite length either way (the recomputation costs time only then). The test is the sum
    of the (non-negative) lengths: 10-50 us on the chain's tensors, where ``isfinite(...).all()``
    took 0.1-1 ms; a sum that overflows only costs a recomputation. On the CPU only: traced
    (fake or functional tensors: ``unit_rows``' backward norms while export or AOT autograd
    trace it) the test would need the lengths' values, and on a GPU it would be one more wait
    for the device per call (the chain's waits there are listed in docs/performance.md)."""
    if type(norms) is not torch.Tensor or norms.device.type != "cpu":
        return norms
    if norms.dtype == torch.float64 or not norms.numel() or math.isfinite(float(norms.sum())):
        return norms
    return again().to(norms.dtype)


def pack_ids(proj: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` (bit k = proj[..., k] > 0) computed as a matmul of the 0/1 bits
    with the powers of two: exact in float32 up to 24 bits and in float64 up to 53; the
    int64 reduction is used beyond that."""
    H = proj.shape[-1]
    if H > 53:
        return pack_bits(proj)
    ft = torch.float32 if H <= 24 else torch.float64
    powers = torch.ones(H, dtype=ft, device=proj.device) * 2 ** torch.arange(H, device=proj.device, dtype=ft)
    return ((proj > 0).to(ft) @ powers).to(torch.int64)


def _pack_last(proj: torch.Tensor) -> torch.Tensor:
    """:func:`pack_ids` of ``proj`` (..., H), by the C++ kernel when the view allows it
    (H contiguous, or a 4-D (Nb, A, B, H) permutation of a contiguous NCHW conv output)."""
    H = proj.shape[-1]
    ext = _ext(proj) if proj.dtype in (torch.float32, torch.float64) and H <= 63 and proj.numel() else None
    if ext is not None:
        lead = proj.shape[:-1]
        if proj.stride(-1) == 1 and proj.dim() == 2:  # (U, H) rows, any row stride
            return ext.pack_signs(proj.unsqueeze(-1)).view(lead)
        if proj.is_contiguous():
            return ext.pack_signs(proj.reshape(-1, H, 1)).view(lead)
        if proj.dim() == 4 and proj.permute(0, 3, 1, 2).is_contiguous():  # an NCHW conv output, permuted
            nchw = proj.permute(0, 3, 1, 2)
            return ext.pack_signs(nchw.reshape(lead[0], H, -1)).view(lead)
    return pack_ids(proj)


def _project(rows: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """rows @ planes with the planes zero-padded to a multiple of 16 columns (BLAS is much
    faster for those shapes), sliced back to H columns."""
    H = planes.shape[1]
    pad = -H % 16
    if pad and rows.shape[0] > 4096:
        return (rows @ F.pad(planes, (0, pad)))[..., :H]
    return rows @ planes


def _hash_rows(rows: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """pack_ids(rows @ planes): by the C++ kernel, which never forms the (U, H) projections
    (conv2, L = 64, H = 8: 1.36 -> 0.47 ms in benchmarks/kernels_ab.py, docs/performance.md), else by
    a matmul and packing."""
    ext = _ext(rows, planes) if rows.dtype in (torch.float32, torch.float64) and planes.shape[1] <= 63 else None
    if ext is not None and rows.numel():
        return ext.hash_rows(rows.contiguous(), planes.contiguous())
    return _pack_last(_project(rows, planes))


def hash_ids(xp: torch.Tensor, planes: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Cluster ids (nb, Nb, Oh, Ow) int64 of every sub-vector, Eq. 4 with H = planes.shape[1].

    Sub-vectors that are the same piece of the input (one pixel's channel chunk, or one run
    of pixels of a kernel row) are hashed once and their id gathered into every row that
    contains them, so equal sub-vectors get equal ids wherever they occur.
    """
    ct = compute_dtype(xp.dtype)
    planes = planes.to(device=xp.device, dtype=ct)
    H = planes.shape[1]
    oh, ow = g.out_hw
    if g.N == 0:
        return torch.zeros(g.nb, g.Nb, oh, ow, dtype=torch.int64, device=xp.device)
    kind = g.kind
    if kind == "window":
        v = planes.view(g.kh, g.kw, g.C, H).permute(3, 2, 0, 1)
        proj = F.conv2d(xp.permute(0, 3, 1, 2).to(ct), v, stride=(g.sh, g.sw), dilation=(g.dh, g.dw))
        return _pack_last(proj.permute(0, 2, 3, 1)).unsqueeze(0)
    if kind in ("chunk", "row"):
        P = g.Nb * g.Hp * g.Wp
        rows = xp.reshape(P, g.C).to(ct)
        if kind == "chunk":
            nq = g.C // g.L
            unit = _hash_rows(rows.reshape(P * nq, g.L), planes).view(P, nq)
            taps, per_tap = range(g.kh * g.kw), nq
        else:  # m pixels of a kernel row, all channels: a (1 x m) convolution over every anchor
            m = g.L // g.C
            v = planes.view(m, g.C, H).permute(2, 1, 0).unsqueeze(2)  # (H, C, 1, m)
            proj = F.conv2d(xp.permute(0, 3, 1, 2).to(ct), v, dilation=(1, g.dw))  # (Nb, H, Hp, Wp - span)
            unit = F.pad(_pack_last(proj.permute(0, 2, 3, 1)), (0, (m - 1) * g.dw)).reshape(P)
            taps = [i * g.kw + jj * m for i in range(g.kh) for jj in range(g.kw // m)]
            per_tap = 1
        ext = _ext(unit)
        if ext is not None:
            blocks = torch.tensor([(t, q) for t in taps for q in range(per_tap)], dtype=torch.int64)
            return ext.gather_ids(unit.contiguous(), per_tap, blocks, g.vector()).view(g.nb, g.Nb, oh, ow)
        unit4 = unit.view(g.Nb, g.Hp, g.Wp, per_tap)
        ids = torch.stack([g.tap_view(unit4, t).permute(3, 0, 1, 2) for t in taps])
        return ids.reshape(g.nb, g.Nb, oh, ow)
    ids = torch.empty(g.nb, g.N, dtype=torch.int64, device=xp.device)
    for b in range(g.nb):
        ids[b] = _pack_last(_project(g.gather_block(xp, b).to(ct), planes))
    return ids.view(g.nb, g.Nb, oh, ow)


def compact(ids: torch.Tensor, H: int, scope: str, with_keys: bool = False):
    """Cluster each sub-matrix: ids (nb, Nb, Oh, Ow) -> (inverse, counts).

    ``inverse`` (same shape as ids, int32: it is kept for the backward, so it is small)
    holds each row's slot in its sub-matrix, ``counts`` (nb, Cmax) int64 the members per
    slot. Scope "input" keeps images apart; "batch" clusters the whole batch. With
    ``with_keys``, also each slot's hash id (:func:`slot_keys`).
    """
    ext = _ext(ids)
    if ext is not None and ids[0].numel() > 0:  # the C++ ranking knows the keys anyway
        inverse, counts, keys = ext.compact(ids.reshape(ids.shape[0], -1).contiguous(), H, _segment(ids, scope))
        inverse = inverse.view_as(ids)
    else:
        inverse, counts = _compact_torch(ids, H, scope)
        keys = slot_keys(ids, inverse, counts) if with_keys else None
    return (inverse, counts, keys) if with_keys else (inverse, counts)


def _compact_torch(ids: torch.Tensor, H: int, scope: str):
    """:func:`compact` in plain PyTorch (a counting pass for small H, else a sort)."""
    nb = ids.shape[0]
    Nb = ids.shape[1]
    flat = ids.reshape(nb, -1)
    N = flat.shape[1]
    dev = ids.device
    base = torch.arange(nb, device=dev)[:, None]
    if N == 0:
        return ids.to(torch.int32), torch.zeros(nb, 0, dtype=torch.int64, device=dev)
    if scope == "batch" and H <= 20 and nb << H <= max(_DENSE_SLOTS, 4 * nb * N):
        S = 1 << H
        if bool(((flat < 0) | (flat >= S)).any()):  # as the C++ counting pass: ids index its table
            raise RuntimeError(
                f"compact: cluster ids must lie in [0, 2^H) with H = {H}; pass the H of the planes that hashed them"
            )
        present = torch.bincount((flat + base * S).view(-1), minlength=nb * S).view(nb, S)
        occupied = present > 0
        rank = occupied.cumsum(1) - 1
        cmax = int(rank[:, -1].max()) + 1
        inverse = rank.gather(1, flat)
        slot = (rank + base * cmax)[occupied]
        counts = torch.zeros(nb * cmax, dtype=torch.int64, device=dev)
        counts[slot] = present[occupied]
        return inverse.view_as(ids).to(torch.int32), counts.view(nb, cmax)
    seg = Nb if scope == "input" else 1
    srt, perm = torch.sort(flat.reshape(nb * seg, N // seg), dim=1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    local = new.view(nb, N).cumsum(1) - 1
    cmax = int(local[:, -1].max()) + 1
    inverse = torch.empty_like(srt).scatter_(1, perm, local.view(nb * seg, N // seg)).view(nb, N)
    counts = torch.bincount((inverse + base * cmax).view(-1), minlength=nb * cmax)
    return inverse.view_as(ids).to(torch.int32), counts.view(nb, cmax)


def _segment(ids: torch.Tensor, scope: str) -> int:
    """Rows per clustering segment: all N ("batch") or one image's ("input")."""
    N = ids[0].numel()
    return N if scope == "batch" else N // ids.shape[1]


def slot_keys(ids: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each slot's hash id, (nb, Cmax) int64, -1 for empty slots."""
    nb = counts.shape[0]
    ext = _ext(ids, inverse)
    if ext is not None:
        return ext.slot_keys(ids.reshape(nb, -1).contiguous(), inverse.reshape(nb, -1).contiguous(), counts.shape[1])
    keys = torch.full_like(counts, -1)
    return keys.scatter_(1, inverse.reshape(nb, -1).long(), ids.reshape(nb, -1))


def chunk_path_applies(ids: torch.Tensor, g: Geometry, scope: str) -> bool:
    """Whether the C++ kernels can take the chunk path (L divides C, stride 1, "batch"
    scope: every block of a chunk hashes a pixel to the same id, so clusters of different
    taps can be summed per pixel); they take it when given the slot keys."""
    if scope != "batch" or g.kind != "chunk" or (g.sh, g.sw) != (1, 1) or CHUNK_PATH == "never":
        return False
    return ids.device.type == "cpu" and extension.get() is not None


def chunk_keys(ids: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, g: Geometry, scope: str):
    """The slot keys for the chunk path where it applies, else None."""
    return slot_keys(ids, inverse, counts) if chunk_path_applies(ids, g, scope) else None


def centroid_means(
    xp: torch.Tensor,
    inverse: torch.Tensor,
    counts: torch.Tensor,
    g: Geometry,
    keys: torch.Tensor | None = None,
    interior: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Per slot, the mean of its members' sub-vectors: (nb, Cmax, L) in the compute dtype
    (empty slots are zero). ``keys`` (from :func:`chunk_keys`) enables the chunk path.

    ``interior`` = (top, left, H, W) tells that ``xp`` is zero outside that rectangle (the
    input inside its zero padding, as :func:`reuse.im2col` makes it): the chunk path then
    skips the padding's pixels, which add nothing to any sum."""
    x = xp.to(compute_dtype(xp.dtype))
    ct = x.dtype
    cmax = counts.shape[1]
    inv = inverse.reshape(g.nb, g.N)
    ext = _ext(x, inverse)
    if ext is not None:
        return ext.centroid_means(
            x.contiguous(),
            inv.contiguous(),
            counts.contiguous(),
            g.vector(),
            g.pieces_tensor(),
            keys,
            _CHUNK_MODES[CHUNK_PATH],
            *(interior or (0, 0, -1, -1)),
        )
    sums = torch.zeros(g.nb, cmax, g.L, dtype=ct, device=xp.device)
    inv = inv.long()
    for b, pieces in enumerate(g.pieces):
        for t, c0, c1, e0 in pieces:
            src = g.tap_view(x, t, c0, c1).reshape(g.N, c1 - c0)
            sums[b, :, e0 : e0 + c1 - c0].index_add_(0, inv[b], src)
    return sums / counts.clamp(min=1).unsqueeze(-1).to(ct)


def centroid_means_backward(
    dcent: torch.Tensor,
    inverse: torch.Tensor,
    counts: torch.Tensor,
    g: Geometry,
    dtype: torch.dtype,
    keys: torch.Tensor | None = None,
    interior: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Gradient of the centroids (means) w.r.t. the padded input: every member of a
    cluster receives the cluster's gradient divided by its size (Eq. 13), added into the
    pixels its sub-vector came from (col2im).

    With ``interior`` = (top, left, H, W), the gradient of the unpadded input that sits there
    in the padded frame, (Nb, C, H, W) channels-last; the C++ kernels then never form the
    padded one."""
    inv = inverse.reshape(g.nb, g.N)
    ext = _ext(dcent, inverse)
    if ext is not None:
        return ext.centroid_means_backward(
            dcent.contiguous(),
            inv.contiguous(),
            counts.contiguous(),
            g.vector(),
            g.pieces_tensor(),
            keys,
            _CHUNK_MODES[CHUNK_PATH],
            *(interior or (0, 0, -1, -1)),
        ).to(dtype)
    share = dcent / counts.clamp(min=1).unsqueeze(-1).to(dcent.dtype)
    inv = inv.long()
    dxp = torch.zeros(g.Nb, g.Hp, g.Wp, g.C, dtype=dcent.dtype, device=dcent.device)
    oh, ow = g.out_hw
    for b, pieces in enumerate(g.pieces):
        for t, c0, c1, e0 in pieces:
            part = share[b, :, e0 : e0 + c1 - c0].index_select(0, inv[b])
            g.tap_view(dxp, t, c0, c1).add_(part.view(g.Nb, oh, ow, c1 - c0))
    return _crop(dxp, interior).to(dtype)


def _crop(d_padded: torch.Tensor, interior: tuple[int, int, int, int] | None) -> torch.Tensor:
    """The padded (Nb, Hp, Wp, C) gradient as is, or its ``interior`` (top, left, H, W) as a
    fresh (Nb, C, H, W) channels-last tensor (what the C++ kernels return)."""
    if interior is None:
        return d_padded
    top, left, H, W = interior
    Nb, C = d_padded.shape[0], d_padded.shape[3]
    out = torch.empty(Nb, C, H, W, dtype=d_padded.dtype, device=d_padded.device, memory_format=torch.channels_last)
    return out.copy_(d_padded[:, top : top + H, left : left + W].permute(0, 3, 1, 2))


def reconstruct_rows(
    yc: torch.Tensor, inverse: torch.Tensor, bias: torch.Tensor | None = None, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """y[n] = bias + sum_b scales[b, n] * y_c[b, inverse[b, n]] (scales default to 1): (N, M)
    rows in (b, oh, ow) order."""
    nb, cmax, M = yc.shape
    inv = inverse.reshape(nb, -1)
    w = None if scales is None else scales.reshape(nb, -1)
    ext = _ext(yc, inv, bias, w)
    if ext is not None:
        return ext.reconstruct(yc.contiguous(), inv.contiguous(), bias, w)
    inv = inv.long()
    if nb == 1 and w is None:
        rows = yc[0].index_select(0, inv[0])
    else:
        slots = inv + torch.arange(nb, device=inv.device)[:, None] * cmax
        weights = None if w is None else w.t().contiguous().to(yc.dtype)
        rows = F.embedding_bag(slots.t().contiguous(), yc.reshape(nb * cmax, M), mode="sum", per_sample_weights=weights)
    if bias is not None:
        rows += bias.to(rows.dtype)
    return rows


def reconstruct_rows_backward(
    dy_rows: torch.Tensor, inverse: torch.Tensor, cmax: int, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """dy_c,s (Eq. 8): per slot, the sum of the output gradient over the slot's members
    (each weighted by its scale when given), (nb, Cmax, M) in ``dy_rows``' dtype. (Until
    session 23 the callers passed a zeroed output that the C++ kernel did not use: a second
    (nb, Cmax, M) tensor zeroed and held during the kernel, 12 MB at AlexNet conv3's L = 192.)"""
    nb = inverse.shape[0]
    inv = inverse.reshape(nb, -1)
    w = None if scales is None else scales.reshape(nb, -1)
    ext = _ext(dy_rows, inv, w)
    if ext is not None:
        return ext.reconstruct_backward(dy_rows.contiguous(), inv.contiguous(), cmax, w).to(dy_rows.dtype)
    inv = inv.long()
    dyc = dy_rows.new_zeros(nb, cmax, dy_rows.shape[1])
    for b in range(nb):
        src = dy_rows if w is None else dy_rows * w[b, :, None].to(dy_rows.dtype)
        dyc[b].index_add_(0, inv[b], src)
    return dyc


def reconstruct_scales_backward(dy_rows: torch.Tensor, yc: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Gradient of the member scales: d_scales[b, n] = dy[n] . y_c[b, inverse[b, n]], (nb, N)."""
    nb = inverse.shape[0]
    inv = inverse.reshape(nb, -1)
    ext = _ext(dy_rows, yc, inv)
    if ext is not None:
        return ext.reconstruct_scales_backward(dy_rows.contiguous(), yc.contiguous(), inv.contiguous())
    inv = inv.long()
    return torch.stack([(yc[b].index_select(0, inv[b]) * dy_rows).sum(1) for b in range(nb)])


def reconstruct_scaled_backward(
    dy_rows: torch.Tensor, yc: torch.Tensor, inverse: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients of the scaled reconstruction, (dy_c,s (nb, Cmax, M), d_scales (nb, N)),
    in one pass over the (block, row) pairs (the C++ kernel; else the two functions above)."""
    nb, cmax, M = yc.shape
    inv = inverse.reshape(nb, -1)
    w = scales.reshape(nb, -1).to(yc.dtype)
    rows = dy_rows.to(yc.dtype)
    ext = _ext(rows, yc, inv, w)
    if ext is not None:
        dyc, dw = ext.reconstruct_backward_scaled(rows.contiguous(), yc.contiguous(), inv.contiguous(), w.contiguous())
        return dyc, dw
    dyc = reconstruct_rows_backward(rows, inv, cmax, w)
    return dyc, reconstruct_scales_backward(rows, yc, inv)


def member_norms(xp: torch.Tensor, g: Geometry) -> torch.Tensor:
    """||x_{n,b}|| of every member sub-vector, (nb, N) in the compute dtype."""
    x = xp.to(compute_dtype(xp.dtype))
    ext = _ext(x)
    if ext is not None:
        norms = ext.member_norms(x.contiguous(), g.vector(), g.pieces_tensor(), g.nb)
    else:
        norms = torch.stack([g.gather_block(x, b).norm(dim=1) for b in range(g.nb)])
    return _finite_lengths(norms, lambda: member_norms(xp.double(), g))


def member_norms_backward(
    g_norms: torch.Tensor,
    norms: torch.Tensor,
    xp: torch.Tensor,
    g: Geometry,
    at: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the member norms w.r.t. the padded input: x / ||x|| times the incoming
    gradient, added into the pixels of each sub-vector (0 for zero sub-vectors).

    With ``at`` = (top, left), ``xp`` is instead the unpadded input (Nb, H, W, C), any layout,
    sitting there in the padded frame ``g``; the result is its gradient, (Nb, C, H, W)
    channels-last, and the C++ kernel never forms the padded one.

    With ``out`` (the result's shape and layout), the gradient is added into ``out``, which is
    returned: the C++ kernel writes it there directly, without a second x-sized tensor."""
    ct = g_norms.dtype
    x = xp.to(ct)
    ext = _ext(g_norms, norms, x)
    if ext is not None:
        direct = out is not None and out.dtype == ct and out.device == x.device
        d = ext.member_norms_backward(
            g_norms.contiguous(),
            norms.to(ct).contiguous(),
            x if at is not None else x.contiguous(),  # the unpadded input is read with its strides
            g.vector(),
            g.pieces_tensor(),
            *(at or (-1, -1)),
            out if direct else None,
        )
        if out is None or direct:
            return d
        return out.add_(d)
    if out is not None:
        return out.add_(member_norms_backward(g_norms, norms, xp, g, at))
    interior = None
    if at is not None:
        (top, left), (H, W) = at, x.shape[1:3]
        x = F.pad(x, (0, 0, left, g.Wp - W - left, top, g.Hp - H - top))
        interior = (top, left, H, W)
    factor = torch.where(norms > 0, g_norms / norms.clamp_min(torch.finfo(ct).tiny), torch.zeros_like(g_norms))
    dxp = torch.zeros_like(x)
    for b in range(g.nb):
        g.scatter_block_(dxp, b, g.gather_block(x, b) * factor[b, :, None])
    return _crop(dxp, interior)


def unit_rows(c: torch.Tensor, eps: float) -> torch.Tensor:
    """c / max(||c||, eps) along the last dimension (F.normalize), one pass in C++. Half
    precision is normalised in float32 (in float16, eps = 1e-12 is 0 and a zero row gave NaN)."""
    ct = compute_dtype(c.dtype)
    if ct != c.dtype:
        return unit_rows(c.to(ct), eps).to(c.dtype)
    ext = _ext(c) if c.dtype in (torch.float32, torch.float64) else None
    if ext is not None and c.dim() and c.numel():
        return ext.unit_rows(c.contiguous(), eps)
    return unit_rows_torch(c, eps)


def unit_rows_torch(c: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`unit_rows` in plain PyTorch."""
    return c / lengths(c, keepdim=True).clamp_min(eps)


def unit_rows_backward(u: torch.Tensor, n: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Backward of :func:`unit_rows` from its output ``u`` and the rows' norms ``n`` (keepdim):
    (g - u (u . g)) / max(n, eps), without the projection term where n < eps (as F.normalize).
    Half precision in float32, as :func:`unit_rows`."""
    ct = compute_dtype(u.dtype)
    if ct != u.dtype:
        return unit_rows_backward(u.to(ct), n.to(ct), g.to(ct), eps).to(u.dtype)
    ext = _ext(u, n, g) if u.dtype in (torch.float32, torch.float64) and g.dtype == u.dtype else None
    if ext is not None and u.dim() and u.numel():
        return ext.unit_rows_backward(u.contiguous(), n.to(u.dtype).contiguous(), g.contiguous(), eps)
    return unit_rows_backward_torch(u, n, g, eps)


def unit_rows_backward_torch(u: torch.Tensor, n: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`unit_rows_backward` in plain PyTorch."""
    s = (u * g).sum(-1, keepdim=True).masked_fill_(n < eps, 0)
    return (u * s).neg_().add_(g).div_(n.clamp_min(eps))


def pad_channels_last(x: torch.Tensor, t: int, b: int, left: int, r: int) -> torch.Tensor:
    """im2col's padded copy (Nb, H + t + b, W + left + r, C) of ``x`` (Nb, C, H, W), zero around
    x: one C++ pass for a channels-last float32/64 CPU ``x``, else :func:`pad_nhwc_torch`."""
    nhwc = x.permute(0, 2, 3, 1)
    ext = _ext(x) if x.dtype in (torch.float32, torch.float64) and x.numel() and nhwc.is_contiguous() else None
    if ext is not None:
        return ext.pad_nhwc(nhwc, t, b, left, r)
    return pad_nhwc_torch(nhwc, t, b, left, r)


def pad_nhwc_torch(nhwc: torch.Tensor, t: int, b: int, left: int, r: int) -> torch.Tensor:
    """The zero-padded copy of ``nhwc`` (Nb, H, W, C) in plain PyTorch: one copy of the interior
    (free to read when x is channels-last), zeros around it."""
    Nb, H, W, C = nhwc.shape
    xp = nhwc.new_empty(Nb, H + t + b, W + left + r, C)
    xp[:, :t].zero_()
    xp[:, t + H :].zero_()
    xp[:, t : t + H, :left].zero_()
    xp[:, t : t + H, left + W :].zero_()
    xp[:, t : t + H, left : left + W].copy_(nhwc)
    return xp


# --------------------------------------------------------------------------- the per-pixel chain
#
# Where every sub-vector is one whole pixel (L = C, the "chunk" kind), the stride is 1 and the
# scope "batch", block b is kernel tap b and every block hashes a pixel to the same id. The
# per-pixel chain (ops.cluster_pixels; docs/architecture.md) keeps per pixel what the generic chain
# keeps per (block, row): the ids (Nb, Hp, Wp), each pixel's key rank ``ranks`` (the rank of
# its id among the ids of the pixels any block covers; -1 where no block covers it), a per-block
# map ``slot_map`` (nb, G) from key rank to slot (-1: the block has no such pixel), and the
# member norms. Row n's slot in block b is ``slot_map[b, ranks[pixel of (b, n)]]``, the generic
# chain's ``inverse[b, n]`` (:func:`pixel_inverse`); the C++ kernels sum what their generic
# twins sum, in the same order, and the plain-PyTorch fallbacks form the generic tensors and
# call the generic functions, so both chains give the same bits.


# Whether the rewrite (and ops.reuse_conv2d) emit the per-pixel chain where it fits; tests and
# A/B benchmarks set it to False to run the generic chain instead (the same values).
PIXEL_CHAIN = True


def pixel_chain_fits(C: int, L: int, stride, kernel_size) -> bool:
    """Whether a layer's stage can run the per-pixel chain: sub-vectors of one whole pixel
    (L = C) of a kernel of several taps (the "chunk" kind; a 1 x 1 kernel's L = C is its whole
    window) and stride 1. The caller checks the scope."""
    kh, kw = (int(v) for v in kernel_size)
    return L == C and kh * kw > 1 and tuple(int(v) for v in stride) == (1, 1)


def check_pixel_chain(C: int, L: int, stride, kernel_size, op: str) -> None:
    """:func:`pixel_chain_fits`, or a ValueError naming ``op`` and the way on."""
    if not pixel_chain_fits(C, L, stride, kernel_size):
        raise ValueError(
            f"{op}: the per-pixel chain needs sub-vectors of one whole pixel (L = C = {C}, got L = {L}) of a "
            f"kernel of more than one tap (got {tuple(kernel_size)}) and stride 1 (got {tuple(stride)}); use the "
            f"generic chain (per_pixel=False, reuse.cluster)"
        )


# The most channel slices a layer's stage is split into for the per-pixel chain (L dividing C,
# below): each slice is a chain of its own in the graph, with its own op calls, so more slices
# than this leave the stage to the generic chain.
MAX_PIXEL_SLICES = 8


def pixel_slices(C: int, L: int, stride, kernel_size) -> int:
    """How many per-pixel chains a layer's stage runs as, or 0 where it runs none. Where L = C,
    one. Where L divides C (at most :data:`MAX_PIXEL_SLICES` times), C / L: sub-vector
    (tap, chunk j) is one whole pixel of the input's channel slice j, so the convolution is the
    sum over slices j of the slices' convolutions, each with the slice's rows of W, and each a
    per-pixel chain with its blocks the generic chain's blocks of chunk j (the same clusters;
    :func:`join_blocks`). Stride 1 and a kernel of more than one tap, as
    :func:`pixel_chain_fits`."""
    C, L = int(C), int(L)
    if L <= 0 or C % L or C // L > MAX_PIXEL_SLICES:
        return 0
    return C // L if pixel_chain_fits(L, L, stride, kernel_size) else 0


def use_pixel_chain(C: int, L: int, stride, kernel_size, scope: str) -> bool:
    """Whether to emit the per-pixel chain for a layer (:func:`pixel_slices` chains): it fits,
    the scope is "batch", :data:`PIXEL_CHAIN` is on and the C++ kernels are there (elsewhere,
    e.g. on a GPU, its plain-PyTorch fallbacks form the generic chain's tensors anyway; they
    are tested, not chosen)."""
    fits = pixel_slices(C, L, stride, kernel_size) > 0
    return PIXEL_CHAIN and scope == "batch" and fits and extension.get() is not None


def one_call_when_traced(fn):
    """``fn`` (a function the rewritten graph calls), recording itself as one call node when
    traced symbolically, as ``torch.fx.wrap`` would: a pickled GraphModule re-traces its code
    when loaded, and these functions must stay single calls in it, not be traced through.
    Traced means a ``torch.fx.Proxy`` among the arguments (or inside a list argument)."""

    @functools.wraps(fn)
    def call(*args):
        for a in args:
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.fx.Proxy):
                    return t.tracer.create_proxy("call_function", call, args, {})
        return fn(*args)

    return call


@one_call_when_traced
def split_channels(x: torch.Tensor, L: int) -> list[torch.Tensor]:
    """The per-pixel chains' inputs where L divides C (:func:`pixel_slices`): ``x``'s channel
    slices of L, each a channels-last copy (the chain's kernels read whole pixels). One split,
    so the backward joins the slices' input gradients in one concatenation."""
    return [t.contiguous(memory_format=torch.channels_last) for t in torch.split(x, L, dim=1)]


@one_call_when_traced
def join_blocks(parts: list[torch.Tensor]) -> torch.Tensor:
    """One per-block tensor of a stage run as per-pixel chains on channel slices
    (:func:`split_channels`) from the slices' (taps, n_j, ...) tensors, in the generic chain's
    block order: block (tap t, chunk j) is row t of slice j's, at t * slices + j. Dim 1 is
    padded to the largest n_j with zeros (the counts' and centroids' Cmax: empty slots, as the
    generic chain's). The counts (nb, Cmax) this way; with ``keep_parts`` the inverse, ids,
    centroids and centroid outputs too (``ops.reuse_conv2d``)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    n = max(t.shape[1] for t in parts)
    out = first.new_zeros(first.shape[0], len(parts), n, *first.shape[2:])
    for j, t in enumerate(parts):
        out[:, j, : t.shape[1]] = t
    return out.reshape(first.shape[0] * len(parts), n, *first.shape[2:])


@one_call_when_traced
def add_outputs(ys: list[torch.Tensor]) -> torch.Tensor:
    """The layer's output from its slices' chains: their sum, in slice order."""
    y = ys[0]
    for t in ys[1:]:
        y = y + t
    return y


def pixel_geometry(ranks_shape, window) -> Geometry:
    """The geometry of a per-pixel chain's maps: ``ranks_shape`` (Nb, Hp, Wp) and ``window``
    = (kh, kw, dh, dw); the channel count does not matter to the maps (C = L = 1)."""
    Nb, Hp, Wp = (int(v) for v in ranks_shape)
    kh, kw, dh, dw = (int(v) for v in window)
    return Geometry.of((Nb, Hp, Wp, 1), (kh, kw), (1, 1), (dh, dw), 1)


def check_pixel_geometry(g: Geometry, op: str) -> None:
    """:func:`check_pixel_chain` of a geometry."""
    check_pixel_chain(g.C, g.L, (g.sh, g.sw), (g.kh, g.kw), op)


def _taps(t4: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(nb, Nb, Oh, Ow): every tap's view of a per-pixel (Nb, Hp, Wp) tensor, stacked."""
    return torch.stack([g.tap_view(t4.unsqueeze(-1), t).squeeze(-1) for t in range(g.kh * g.kw)])


def _interior_rows(x: torch.Tensor | None, interior, g: Geometry, *others):
    """``x``'s pixels as contiguous (Nb * H * W, C) rows, when the C++ kernels can read them in
    place of the padded frame's interior: ``x`` channels-last float32/64 on the CPU at
    ``interior`` = (top, left, H, W); else None. (The padding's pixels are zero: id 0, norm 0.)"""
    if x is None or interior is None or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        return None
    nhwc = x.permute(0, 2, 3, 1)
    if not nhwc.is_contiguous() or _ext(x, *others) is None or tuple(nhwc.shape) != (g.Nb, *interior[2:], g.C):
        return None
    return nhwc.reshape(-1, g.C)


def _frame(inner: torch.Tensor, interior, g: Geometry) -> torch.Tensor:
    """(Nb, Hp, Wp): zeros, with ``inner`` (Nb * H * W values) at ``interior``."""
    top, left, H, W = interior
    out = inner.new_zeros(g.Nb, g.Hp, g.Wp)
    out[:, top : top + H, left : left + W] = inner.view(g.Nb, H, W)
    return out


def hash_pixel_ids(xp: torch.Tensor, planes: torch.Tensor, g: Geometry, x=None, interior=None) -> torch.Tensor:
    """Eq. 4 once per pixel, (Nb, Hp, Wp) int64: the ids :func:`hash_ids` gathers into its
    blocks (the same computation). Given the unpadded input ``x`` at ``interior`` (top, left,
    H, W) of the padded frame, the C++ kernel hashes only its pixels: the padding's are zero
    vectors, whose id is 0 (each row's dot products do not depend on the other rows)."""
    check_pixel_geometry(g, "reuse.lsh_hash(per_pixel=True)")
    ct = compute_dtype(xp.dtype)
    planes = planes.to(device=xp.device, dtype=ct)
    if xp.numel() == 0:
        return torch.zeros(g.Nb, g.Hp, g.Wp, dtype=torch.int64, device=xp.device)
    rows = _interior_rows(x, interior, g, planes) if x is not None and x.dtype == ct else None
    if rows is not None and planes.shape[1] <= 63:  # _hash_rows takes the C++ kernel for these
        return _frame(_hash_rows(rows, planes), interior, g)
    return _hash_rows(xp.reshape(g.Nb * g.Hp * g.Wp, g.C).to(ct), planes).view(g.Nb, g.Hp, g.Wp)


def _covered(g: Geometry, device) -> torch.Tensor:
    """(Hp, Wp) bool: the pixels some block (kernel tap) reads."""
    oh, ow = g.out_hw
    rows = torch.zeros(g.Hp, dtype=torch.bool, device=device)
    cols = torch.zeros(g.Wp, dtype=torch.bool, device=device)
    for i in range(g.kh):
        rows[i * g.dh : i * g.dh + oh] = True
    for j in range(g.kw):
        cols[j * g.dw : j * g.dw + ow] = True
    return rows[:, None] & cols[None, :]


def pixel_compact(ids: torch.Tensor, g: Geometry):
    """:func:`compact` of the per-pixel chain: per-pixel ids (Nb, Hp, Wp) -> (ranks (Nb, Hp, Wp)
    int32, slot_map (nb, G) int32, counts (nb, Cmax) int64), the generic chain's slots and counts
    (slots rank a block's ids ascending)."""
    ext = _ext(ids)
    if ext is not None and ids.numel() and g.N:
        return tuple(ext.pixel_compact(ids.contiguous(), g.vector()))
    nb, dev = g.kh * g.kw, ids.device
    cov = _covered(g, dev)
    vals = ids[:, cov]
    if bool((vals < 0).any()):
        raise RuntimeError("pixel_compact: cluster ids must be non-negative")
    uniq = torch.unique(vals)
    G = uniq.numel()
    ranks = torch.full(ids.shape, -1, dtype=torch.int32, device=dev)
    ranks[:, cov] = torch.searchsorted(uniq, vals).to(torch.int32)
    taps = _taps(ranks, g).reshape(nb, -1).long()
    base = torch.arange(nb, device=dev)[:, None] * G
    cnt = torch.bincount((taps + base).view(-1), minlength=nb * G).view(nb, G) if G else taps.new_zeros(nb, 0)
    present = cnt > 0
    slots = present.cumsum(1) - 1
    slot_map = torch.where(present, slots, torch.full_like(slots, -1)).to(torch.int32)
    cmax = int(present.sum(1).max()) if nb and G else 0
    counts = torch.zeros(nb, cmax, dtype=torch.int64, device=dev)
    block = torch.arange(nb, device=dev)[:, None].expand(nb, G)
    counts[block[present], slots[present]] = cnt[present]
    return ranks, slot_map, counts


def pixel_inverse(ranks: torch.Tensor, slot_map: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The generic chain's ``inverse`` (nb, Nb, Oh, Ow) int32 of a per-pixel chain's maps."""
    oh, ow = g.out_hw
    nb = slot_map.shape[0]
    ext = _ext(ranks, slot_map)
    if ext is not None and g.N and slot_map.numel():
        return ext.pixel_inverse(ranks.contiguous(), slot_map.contiguous(), g.vector()).view(nb, g.Nb, oh, ow)
    taps = _taps(ranks, g).long()
    if slot_map.shape[1] == 0:
        return taps.to(torch.int32)
    return torch.stack([slot_map[t][taps[t].clamp(min=0)] for t in range(nb)])


def pixel_rows(t: torch.Tensor, g: Geometry) -> torch.Tensor:
    """A per-pixel (Nb, Hp, Wp) tensor read into the generic chain's (nb, Nb, Oh, Ow) layout."""
    return _taps(t, g).contiguous()


def pixel_norms(xp: torch.Tensor, g: Geometry, x=None, interior=None) -> torch.Tensor:
    """||pixel|| (Nb, Hp, Wp) in the compute dtype: :func:`member_norms` of the per-pixel chain
    (the C++ kernel computes each pixel's norm as member_norms does). Given the unpadded input
    ``x`` at ``interior``, only its pixels are read (the padding's norms are 0)."""
    check_pixel_geometry(g, "reuse.member_norms(per_pixel=True)")
    return _finite_lengths(
        _pixel_norms(xp, g, x, interior),
        lambda: _pixel_norms(xp.double(), g, None if x is None else x.double(), interior),
    )


def _pixel_norms(xp, g: Geometry, x, interior) -> torch.Tensor:
    if xp.numel() and x is not None and x.dtype == compute_dtype(xp.dtype):
        rows = _interior_rows(x, interior, g)
        if rows is not None:
            return _frame(_ext(rows).pixel_norms(rows.view(g.Nb, interior[2], interior[3], g.C)), interior, g)
    xc = xp.to(compute_dtype(xp.dtype))
    ext = _ext(xc)
    if ext is not None and xc.numel():
        return ext.pixel_norms(xc.contiguous())
    return xc.norm(dim=-1)


def _pixel_chunk(kernel: str, t, ranks, slot_map, counts, g: Geometry, interior):
    """The C++ chunk-path kernel ``kernel`` of the per-pixel chain on ``t`` (the input or the
    centroids' gradient), or None where the generic chain would take the per-row kernels (no
    C++ kernels, the chunk path off or declined by its cost rule)."""
    ext = _ext(t, ranks, slot_map)
    if ext is None or not g.N or not slot_map.numel() or CHUNK_PATH == "never":
        return None
    return getattr(ext, kernel)(
        t.contiguous(),
        ranks.contiguous(),
        slot_map.contiguous(),
        counts.contiguous(),
        g.vector(),
        g.pieces_tensor(),
        _CHUNK_MODES[CHUNK_PATH],
        *(interior or (0, 0, -1, -1)),
    )


def pixel_centroid_means(xp, ranks, slot_map, counts, g: Geometry, interior=None) -> torch.Tensor:
    """:func:`centroid_means` of the per-pixel chain (the chunk path's tables, where the
    generic chain takes them; else the generic kernels on :func:`pixel_inverse`)."""
    out = _pixel_chunk("pixel_centroid_means", xp.to(compute_dtype(xp.dtype)), ranks, slot_map, counts, g, interior)
    if out is not None:
        return out
    return centroid_means(xp, pixel_inverse(ranks, slot_map, g), counts, g, None, interior)


def pixel_centroid_means_backward(dcent, ranks, slot_map, counts, g: Geometry, dtype, interior=None) -> torch.Tensor:
    """:func:`centroid_means_backward` of the per-pixel chain."""
    out = _pixel_chunk("pixel_centroid_means_backward", dcent, ranks, slot_map, counts, g, interior)
    if out is not None:
        return out.to(dtype)
    return centroid_means_backward(dcent, pixel_inverse(ranks, slot_map, g), counts, g, dtype, None, interior)


def pixel_reconstruct_rows(yc, ranks, slot_map, g: Geometry, bias=None, scales=None) -> torch.Tensor:
    """:func:`reconstruct_rows` of the per-pixel chain (``scales`` per pixel, (Nb, Hp, Wp))."""
    ext = _ext(yc, ranks, slot_map, bias, scales)
    if ext is not None and g.N and yc.numel():
        return ext.pixel_reconstruct(
            yc.contiguous(), ranks.contiguous(), slot_map.contiguous(), bias, scales, g.vector()
        )
    rows = None if scales is None else pixel_rows(scales, g)
    return reconstruct_rows(yc, pixel_inverse(ranks, slot_map, g), bias, rows)


def pixel_reconstruct_rows_backward(dy_rows, ranks, slot_map, g: Geometry, cmax: int, scales=None) -> torch.Tensor:
    """:func:`reconstruct_rows_backward` of the per-pixel chain, (nb, Cmax, M)."""
    ext = _ext(dy_rows, ranks, slot_map, scales)
    if ext is not None and g.N and cmax * slot_map.shape[0] * dy_rows.shape[1]:
        out = ext.pixel_reconstruct_backward(
            dy_rows.contiguous(), ranks.contiguous(), slot_map.contiguous(), cmax, scales, g.vector()
        )
        return out.to(dy_rows.dtype)
    rows = None if scales is None else pixel_rows(scales, g)
    return reconstruct_rows_backward(dy_rows, pixel_inverse(ranks, slot_map, g), cmax, rows)


def pixel_scales_backward(dy_rows, yc, ranks, slot_map, g: Geometry) -> torch.Tensor:
    """:func:`reconstruct_scales_backward` of the per-pixel chain, summed into the pixels:
    (Nb, Hp, Wp). The C++ kernel walks each pixel's taps (lane sums per pixel); else the generic
    kernel on the formed inverse, folded into the pixels (:func:`fold_taps`): the same values up
    to rounding."""
    ext = _ext(dy_rows, yc, ranks, slot_map)
    if ext is not None and g.N and yc.numel():
        return ext.pixel_scales_backward(
            dy_rows.contiguous(), yc.contiguous(), ranks.contiguous(), slot_map.contiguous(), g.vector()
        )
    inv = pixel_inverse(ranks, slot_map, g)
    d_rows = reconstruct_scales_backward(dy_rows, yc, inv.reshape(inv.shape[0], -1)).view(inv.shape)
    return fold_taps(d_rows, g)


def fold_taps(rows: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The adjoint of :func:`pixel_rows`: (nb, Nb, Oh, Ow) summed into its pixels, (Nb, Hp, Wp)."""
    out = rows.new_zeros(g.Nb, g.Hp, g.Wp)
    for t in range(rows.shape[0]):
        g.tap_view(out.unsqueeze(-1), t).squeeze(-1).add_(rows[t])
    return out


def _skip_tensor(x, skip) -> torch.Tensor:
    """The C++ kernels' common values: ``skip`` (C floats) as a tensor of x's dtype, or zeros."""
    return x.new_zeros(x.shape[1]) if skip is None else torch.tensor(skip, dtype=x.dtype)


def zero_skip_weight_grad(x, dy, weight, stride, padding, dilation, skip=None):
    """The weight and bias gradients (dW, db) of the exact ``F.conv2d(x, W, b, stride, padding,
    dilation)`` (groups 1; ``padding`` (top, left) of a symmetric padding) for the output
    gradient ``dy``. The C++ kernel skips the inputs equal to their channel's common value
    ``skip`` (C floats, default zeros): it sums (x - skip) * dy over the other inputs and adds
    skip times each tap's sum of dy over its in-image outputs (the same sums, regrouped). Without
    it, or off the CPU, ``aten.convolution_backward``'s, which are stock's. A non-finite db (an
    inf or NaN in ``dy``) takes stock's gradients as well, so that a NaN or inf in ``dy`` shows
    in dW as it does there, wherever it meets a skipped input."""
    ext = _ext(x, dy) if x.dtype in (torch.float32, torch.float64) and x.dtype == dy.dtype else None
    if ext is not None:
        kh, kw = weight.shape[2:]
        gy = dy.permute(0, 2, 3, 1).contiguous()  # (Nb, Oh, Ow, M): free for a channels-last dy
        sk = _skip_tensor(x, skip)
        dw, db = ext.zero_skip_weight_grad(x, gy, sk, [kh, kw, *stride, *padding, *dilation])
        if bool(torch.isfinite(db).all()):
            return dw, db
    _, dw, db = torch.ops.aten.convolution_backward(
        dy,
        x,
        weight,
        [weight.shape[0]],
        list(stride),
        list(padding),
        list(dilation),
        False,
        [0, 0],
        1,
        [False, True, True],
    )
    return dw, db


def conv_pool_forward(x, weight, bias, padding, pool, relu, skip=None):
    """A first block, conv (stride 1, groups 1, ``padding`` (top, left) of a symmetric padding)
    -> max_pool2d(``pool`` = k, s, p) (-> ReLU), without the convolution's output in memory:
    (out (Nb, Ph, Pw, M), idx (Nb, Ph, Pw, M) uint8, the maximum's position in its window, 255
    where the ReLU passes no gradient). The C++ kernel adds each input's difference from its
    channel's common value ``skip`` (C floats; None: zeros) to a per-image table of the
    common values' outputs (F.conv2d's sums, regrouped); without it, the reference's stock ops."""
    ext = _ext(x, weight, bias)
    if ext is not None and x.dtype == weight.dtype:
        sk = _skip_tensor(x, skip)
        return tuple(ext.conv_pool_forward(x, weight, bias, sk, [*padding, *pool, int(relu)]))
    from .reference import reference_conv_pool

    out, idx = reference_conv_pool(x, weight, bias, padding, pool, relu)
    return out.permute(0, 2, 3, 1).contiguous(), idx


def conv_pool_sizes(x, weight, padding, pool) -> tuple[int, int, int, int]:
    """(Oh, Ow, Ph, Pw): the convolution's output size (stride 1, ``padding`` (top, left) on
    both sides) and the max-pool's (``pool`` = k, s, p; floor mode) of conv_pool's block."""
    kh, kw = weight.shape[2:]
    k, s, p = pool
    Oh = conv_out_size(x.shape[2] + 2 * padding[0], kh, 1, 1)
    Ow = conv_out_size(x.shape[3] + 2 * padding[1], kw, 1, 1)
    return Oh, Ow, conv_out_size(Oh + 2 * p, k, s, 1), conv_out_size(Ow + 2 * p, k, s, 1)


def _route_pooled(gp, idx, Oh, Ow, pool):
    """max_pool2d's backward from conv_pool_forward's window positions: the convolution output's
    gradient (Nb, M, Oh, Ow) from the pooled one gp (Nb, Ph, Pw, M)."""
    k, s, p = pool
    Nb, Ph, Pw, M = gp.shape
    live = idx != 255
    local = torch.where(live, idx, 0).long()
    ih = (torch.arange(Ph) * s - p).view(1, Ph, 1, 1) + local // k
    iw = (torch.arange(Pw) * s - p).view(1, 1, Pw, 1) + local % k
    flat = torch.where(live, ih * Ow + iw, 0).permute(0, 3, 1, 2).reshape(Nb, M, Ph * Pw)
    g = torch.where(live, gp, 0).permute(0, 3, 1, 2).reshape(Nb, M, Ph * Pw)
    return gp.new_zeros(Nb, M, Oh * Ow).scatter_add_(2, flat, g).view(Nb, M, Oh, Ow)


def conv_pool_weight_grad(x, gp, idx, weight, padding, pool, skip=None):
    """The weight and bias gradients of :func:`conv_pool_forward`'s block from the pooled output's
    gradient ``gp`` (Nb, Ph, Pw, M) and its window positions ``idx``. The C++ kernel routes each
    image's pooled gradient to its maxima in a thread's scratch and sums as
    :func:`zero_skip_weight_grad` does; without it, or where db is not finite (so that a NaN or
    inf shows in dW as in stock's), the routed gradient in memory and ATen's weight gradient."""
    kh, kw = weight.shape[2:]
    ext = _ext(x, gp) if x.dtype in (torch.float32, torch.float64) and x.dtype == gp.dtype else None
    if ext is not None:
        sk = _skip_tensor(x, skip)
        dw, db = ext.conv_pool_weight_grad(x, gp.contiguous(), idx.contiguous(), sk, [kh, kw, *padding, *pool])
        if bool(torch.isfinite(db).all()):
            return dw, db
    Oh, Ow, _, _ = conv_pool_sizes(x, weight, padding, pool)
    dy = _route_pooled(gp, idx, Oh, Ow, pool)
    _, dw, db = torch.ops.aten.convolution_backward(
        dy, x, weight, [weight.shape[0]], [1, 1], list(padding), [1, 1], False, [0, 0], 1, [False, True, True]
    )
    return dw, db
