"""The ``reuse`` custom operators: one per stage of the rewritten convolution.

Each op is a ``torch.library.custom_op`` with its fake (shape) function and its backward
next to its forward. A rewritten ``y = conv2d(x, W, b)`` reads, in ``print_readable()``::

    xp        = reuse.im2col(x, kernel, stride, padding, dilation)    # lazy im2col view
    ids       = reuse.lsh_hash(xp, planes, kernel, stride, dilation)  # Eq. 4, per sub-vector
    centroids, inverse, counts = reuse.cluster(xp, ids, ...)         # per sub-matrix
    y_c       = reuse.centroid_gemm(centroids, W)                     # y_c,b = x_c,b . W_b
    y         = reuse.reconstruct(y_c, inverse, b)                    # sum_b y_c,b[inverse_b] + b

Backward (Section IV) never runs a GEMM over N rows: ``reconstruct`` sums the output
gradient per cluster (dy_c,s, Eq. 8), ``centroid_gemm`` forms dW_b = x_c,b^T dy_c,s,b
(Eq. 10) and the centroid gradient dy_c,s,b W_b^T, and ``cluster`` hands each member its
cluster's share (Eq. 13-18) and adds it back into the input pixels (col2im).

Tensors: ``xp`` (Nb, Hp, Wp, C) padded channels-last input; ``planes`` (L, H) hyperplanes;
``ids`` (nb, Nb, Oh, Ow) int64 and ``inverse`` (same shape, int32: ``inverse[b]`` holds
each row's slot in sub-matrix b); ``counts`` (nb, Cmax) int64;
``centroids`` (nb, Cmax, L); ``y_c`` (nb, Cmax, M); ``y`` (Nb, M, Oh, Ow), channels-last
strided. Cmax is data-dependent.

Where every sub-vector is one whole pixel (L = C, stride 1, "batch" scope) the rewrite emits
the per-pixel chain instead (docs/architecture.md): ``lsh_hash(..., per_pixel=True)`` returns
the ids per padded pixel (Nb, Hp, Wp), ``cluster_pixels`` returns ``(centroids, ranks,
slot_map, counts)`` (the inverse factorised: ``inverse[b, n] = slot_map[b, ranks[pixel of (b,
n)]]``), ``member_norms(..., per_pixel=True)`` the norms per pixel, and ``reconstruct(yc,
ranks, bias, norms, slot_map, window)`` reads through them; the values are the generic
chain's, bit for bit.
"""

from __future__ import annotations

import weakref

import torch

from . import kernels
from .geometry import Geometry, conv_out_size

__all__ = [
    "check_input",
    "im2col",
    "lsh_hash",
    "cluster",
    "cluster_norms",
    "cluster_pixels",
    "cluster_pixels_grad",
    "unit_rows",
    "unit_rows_grad",
    "centroid_gemm",
    "reconstruct",
    "cluster_grad",
    "cluster_input_grad",
    "reconstruct_grad_scaled",
    "reconstruct_grad",
    "zero_skip_conv2d",
    "zero_skip_conv2d_grad",
    "exact_conv2d",
    "zero_skip_runs",
    "conv_pool",
    "conv_pool_grad",
    "conv_pool_block",
    "conv_pool_runs",
    "SCOPES",
]

SCOPES = ("input", "batch")


def _padded_geometry(xp_shape, kernel, stride, dilation, L: int) -> Geometry:
    return Geometry.of(xp_shape, kernel, stride, dilation, L)


# --------------------------------------------------------------------------- check_input


@torch.library.custom_op("reuse::check_input", mutates_args=())
def check_input(x: torch.Tensor, in_channels: int, layer: str) -> None:
    """The checks F.conv2d makes of its input, before a rewritten convolution: without them
    the chain would read a wrong number of channels without noticing (a group's slice of
    the input, or one whole window as the sub-vector)."""
    if x.dim() != 4:
        raise ValueError(
            f"reuse: layer {layer!r} expected a 4-D (batch, channels, height, width) input, got shape "
            f"{tuple(x.shape)}; add the batch dimension (x.unsqueeze(0)) for a single image"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"reuse: layer {layer!r} expected input{list(x.shape)} to have {in_channels} channels "
            f"(its in_channels), but got {x.shape[1]} channels instead"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"reuse: layer {layer!r} expected a floating-point input, got {x.dtype}; convert it to the "
            f"model's dtype (x.float() for a float32 model), as F.conv2d requires"
        )


@check_input.register_fake
def _(x, in_channels, layer):
    return None


# no output, no mutation: without this, fx's dead-code elimination (and graph passes like it)
# would drop the check
torch.fx.node.has_side_effect(torch.ops.reuse.check_input.default)


# --------------------------------------------------------------------------- im2col


@torch.library.custom_op("reuse::im2col", mutates_args=())
def im2col(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int]
) -> torch.Tensor:
    """The lazy im2col view: ``x`` zero-padded by ``padding`` = (top, bottom, left, right) and
    laid out channels-last, (Nb, Hp, Wp, C). Row n of the paper's x is the window of it
    anchored at (oh * stride_h, ow * stride_w)."""
    _check_window(x.shape, kernel_size, padding, dilation)
    return kernels.pad_channels_last(x, *padding)


@im2col.register_fake
def _(x, kernel_size, stride, padding, dilation):
    _check_window(x.shape, kernel_size, padding, dilation)
    t, b, left, r = padding
    return x.new_empty(x.shape[0], x.shape[2] + t + b, x.shape[3] + left + r, x.shape[1])


def _check_window(shape, kernel_size, padding, dilation):
    if len(shape) != 4:
        raise ValueError(f"reuse.im2col expects a 4-D (N, C, H, W) input, got shape {tuple(shape)}")
    t, b, left, r = padding
    for size, k, d, name in (
        (shape[2] + t + b, kernel_size[0], dilation[0], "height"),
        (shape[3] + left + r, kernel_size[1], dilation[1], "width"),
    ):
        if isinstance(size, int) and size < d * (k - 1) + 1:
            raise ValueError(
                f"reuse.im2col: padded input {name} {size} is smaller than the dilated kernel "
                f"extent {d * (k - 1) + 1}; use a larger input or keep this layer exact"
            )


def _im2col_setup(ctx, inputs, output):
    ctx.padding = inputs[3]
    ctx.hw = inputs[0].shape[2:]
    # When cluster and member_norms send their gradients to x directly (channels-last x),
    # xp gets none: no zero padded gradient should be made up for it.
    ctx.set_materialize_grads(False)


def _im2col_backward(ctx, grad):
    if grad is None:
        return None, None, None, None, None
    t, _, left, _ = ctx.padding
    h, w = ctx.hw
    return grad.permute(0, 3, 1, 2)[:, :, t : t + h, left : left + w], None, None, None, None


im2col.register_autograd(_im2col_backward, setup_context=_im2col_setup)


# --------------------------------------------------------------------------- lsh_hash


@torch.library.custom_op("reuse::lsh_hash", mutates_args=())
def lsh_hash(
    xp: torch.Tensor,
    planes: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    per_pixel: bool = False,
    x: torch.Tensor | None = None,
    padding: list[int] | None = None,
) -> torch.Tensor:
    """Eq. 4 on every sub-vector: bit k of a sub-vector's id is ``planes[:, k] . v > 0``.
    L and H are ``planes.shape``; one hash family serves every sub-matrix and batch.

    With ``per_pixel`` (the per-pixel chain, sub-vectors of one whole pixel, L = C, stride 1)
    the ids are returned once per padded pixel, (Nb, Hp, Wp): the id of sub-vector (b, n) is
    that of the pixel it is. The rewrite then also passes the convolution's input ``x``
    (``xp = im2col(x, ..., padding)``): a channels-last ``x`` is hashed in place of ``xp``'s
    interior, and the padding's zero pixels get id 0 without being read (the same ids)."""
    g = _padded_geometry(xp.shape, kernel_size, stride, dilation, planes.shape[0])
    if per_pixel:
        return kernels.hash_pixel_ids(xp, planes, g, x, _interior(xp, x, padding))
    return kernels.hash_ids(xp, planes, g)


def _per_member_shape(xp_shape, kernel_size, stride, dilation, L) -> tuple:
    """(nb, Nb, Oh, Ow): one entry per sub-vector (usable with symbolic sizes)."""
    Nb, Hp, Wp, C = xp_shape
    nb = -(-(kernel_size[0] * kernel_size[1] * C) // L)
    oh = conv_out_size(Hp, kernel_size[0], stride[0], dilation[0])
    ow = conv_out_size(Wp, kernel_size[1], stride[1], dilation[1])
    return nb, Nb, oh, ow


@lsh_hash.register_fake
def _(xp, planes, kernel_size, stride, dilation, per_pixel=False, x=None, padding=None):
    if per_pixel:
        _check_pixel_args(xp.shape, kernel_size, stride, planes.shape[0], "reuse.lsh_hash(per_pixel=True)")
        return xp.new_empty(xp.shape[:3], dtype=torch.int64)
    return xp.new_empty(_per_member_shape(xp.shape, kernel_size, stride, dilation, planes.shape[0]), dtype=torch.int64)


def _check_pixel_args(xp_shape, kernel_size, stride, L, op):
    """The per-pixel chain's condition on (symbolic) sizes, for the fakes."""
    kernels.check_pixel_chain(xp_shape[3], L, stride, kernel_size, op)


# --------------------------------------------------------------------------- cluster


@torch.library.custom_op("reuse::cluster", mutates_args=())
def cluster(
    xp: torch.Tensor,
    ids: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    L: int,
    H: int,
    scope: str,
    x: torch.Tensor | None = None,
    padding: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster each sub-matrix by id within ``scope`` and average the members.

    Returns ``(centroids, inverse, counts)``; see the module docstring for shapes. A slot's
    hash id is ``kernels.slot_keys(ids, inverse, counts)``. The rewrite also passes the
    convolution's input ``x`` (``xp = im2col(x, ..., padding)``): if ``x`` is channels-last,
    the backward writes ``x``'s gradient directly (``cluster_input_grad``; none for ``xp``),
    so no padded gradient is formed, and the forward's chunk path skips the padding's pixels
    (``xp`` must then be ``im2col``'s zero-padded copy of ``x``, as in the rewrite).
    """
    return _cluster(xp, ids, kernel_size, stride, dilation, L, H, scope, "reuse.cluster", x, padding)


def _cluster(xp, ids, kernel_size, stride, dilation, L, H, scope, op, x=None, padding=None):
    if scope not in SCOPES:
        raise ValueError(f"{op}: scope must be one of {SCOPES}, got {scope!r}")
    g = _padded_geometry(xp.shape, kernel_size, stride, dilation, L)
    interior = _interior(xp, x, padding)
    centroids, inverse, counts = _cluster_ids(xp, ids, g, H, scope, interior)
    ct = kernels.compute_dtype(xp.dtype)  # a float16 table's sum would overflow in float16
    if xp.dtype.is_floating_point and xp.numel() and not bool(torch.isfinite(centroids.sum(dtype=ct))):
        # A NaN or Inf sub-vector hashes like any other (a NaN one to id 0, the zero
        # vectors' id) and would make its cluster's centroid, so the output of every member
        # in every image of the batch, non-finite. Such sub-vectors get a cluster of their
        # own (id 2^H, past every hash id): only the outputs they feed are non-finite, as
        # with F.conv2d. The check is one sum of the small centroid table (30 us at conv2;
        # isfinite().all() takes 0.7 ms); the rare case pays a second clustering. A
        # sub-vector is bad if an entry is: the norms of the 0/1 indicator of non-finite
        # entries (the norms of xp itself overflow for finite entries above ~1e19, and a
        # table of huge finite entries can overflow the check's sum: then none is bad).
        bad = (kernels.member_norms((~torch.isfinite(xp)).to(ct), g) > 0).view_as(ids)
        ids = torch.where(bad, torch.full_like(ids, 1 << H), ids)
        centroids, inverse, counts = _cluster_ids(xp, ids, g, H + 1, scope, interior)
    return centroids, inverse, counts


def _cluster_ids(xp, ids, g, H, scope, interior):
    """Compact ``ids`` (< 2^H) and average the members: (centroids, inverse, counts)."""
    keys = None
    if kernels.chunk_path_applies(ids, g, scope):
        inverse, counts, keys = kernels.compact(ids, H, scope, with_keys=True)
        _hand_keys(inverse, keys)
    else:
        inverse, counts = kernels.compact(ids, H, scope)
    centroids = kernels.centroid_means(xp, inverse, counts, g, keys, interior).to(xp.dtype)
    return centroids, inverse, counts


def _interior(xp, x, padding) -> tuple[int, int, int, int] | None:
    """Where ``x`` sits in ``xp = im2col(x, ..., padding)``, (top, left, H, W): the rest of
    ``xp`` is zero padding. None when ``x`` or ``padding`` is not given or the shapes do not
    fit."""
    if x is None or padding is None or x.dim() != 4 or xp.dim() != 4:
        return None
    t, b, left, r = padding
    H, W = x.shape[2], x.shape[3]
    if (xp.shape[1], xp.shape[2]) != (H + t + b, W + left + r):
        return None
    return (t, left, H, W)


# The slot keys `compact` returned in cluster's forward, for its setup_context (which sees
# only the op's outputs): keyed by the id of the `inverse` output, checked by identity, and
# dropped when that tensor is freed (forwards without autograd never collect theirs).
# Saves the second pass over the ids (~1 ms per step at conv2 L=32).
_KEYS: dict[int, tuple] = {}


def _hand_keys(inverse: torch.Tensor, keys: torch.Tensor) -> None:
    if _concrete(inverse):
        _KEYS[id(inverse)] = (weakref.ref(inverse), keys)
        weakref.finalize(inverse, _KEYS.pop, id(inverse), None)


def _take_keys(inverse: torch.Tensor) -> torch.Tensor | None:
    entry = _KEYS.pop(id(inverse), None)
    return entry[1] if entry is not None and entry[0]() is inverse else None


@cluster.register_fake
def _cluster_fake(xp, ids, kernel_size, stride, dilation, L, H, scope, x=None, padding=None):
    cmax = torch.library.get_ctx().new_dynamic_size()
    nb = ids.shape[0]
    return (
        xp.new_empty(nb, cmax, L),
        torch.empty_like(ids, dtype=torch.int32),
        ids.new_empty(nb, cmax),
    )


def _concrete(t: torch.Tensor) -> bool:
    """A plain tensor with data (not a fake or functional one seen while tracing)."""
    return type(t) is torch.Tensor and t.device.type != "meta"


def _to_input(x, padding) -> bool:
    """Whether a backward (cluster's, member_norms') writes the gradient of the unpadded ``x``
    directly: only for a channels-last ``x``, measured faster and leaner there (conv2, L=32:
    peak 54.5 -> 41.6 MB, 0.53 -> 0.51x); for NCHW ``x`` the strided reads cost more time than
    the padded copy saves (docs/performance.md)."""
    if x is None:
        return False
    if padding is None:
        raise ValueError("reuse ops: give padding together with x")
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _cluster_setup(ctx, inputs, output):
    """setup_context of ``cluster`` and of ``cluster_norms`` (whose output has the norms too)."""
    xp, ids, kernel_size, stride, dilation, L, _, scope, x, padding = inputs
    ctx.to_input = _to_input(x, padding)
    ctx.padding = padding
    inverse, counts = output[1], output[2]
    # the chunk path of the backward needs each slot's key (nb x Cmax, small), not the ids
    g = _padded_geometry(xp.shape, kernel_size, stride, dilation, L)
    keys = _take_keys(inverse)
    if keys is None and _concrete(ids):
        keys = kernels.chunk_keys(ids, inverse, counts, g, scope)
    saved = [inverse, counts, keys]
    if len(output) == 4:  # cluster_norms: the norms' backward reads the input (x itself when
        saved += [x if ctx.to_input else xp, output[3]]  # its gradient goes to x, else xp) and the norms
    ctx.save_for_backward(*saved)
    # inverse and counts get no gradient: no zero tensors of their size in the backward
    # (inverse's would be nb x N, as large as inverse itself, at the backward's peak)
    ctx.mark_non_differentiable(inverse, counts)
    ctx.set_materialize_grads(False)
    ctx.args = (list(xp.shape), kernel_size, stride, dilation, L)
    ctx.dtype = xp.dtype


def _input_slot(ctx, x_index: int) -> int:
    """Which input of a clustering op (``xp`` at 0, ``x`` at ``x_index``) its backward gives
    the input's gradient: ``x`` when it writes x's gradient directly (``ctx.to_input``)."""
    return x_index if ctx.to_input else 0


def _input_grads(ctx, x_index: int, n_inputs: int, grad) -> tuple:
    """The backward's return: ``grad`` at :func:`_input_slot`, None for the other inputs."""
    out = [None] * n_inputs
    out[_input_slot(ctx, x_index)] = grad
    return tuple(out)


def _cluster_input_grads(ctx, g_centroids, g_norms=None):
    """The input's gradient from the centroids' and (``cluster_norms``) the norms' gradients,
    in one buffer: for ``x`` directly when channels-last, else for ``xp``."""
    inverse, counts, keys, *norm_parts = ctx.saved_tensors
    xp_shape, k, s, d, L = ctx.args
    pad = ctx.padding if ctx.to_input else None
    grad = None
    if ctx.needs_input_grad[_input_slot(ctx, 8)]:
        if g_centroids is not None:
            if ctx.to_input:
                grad = cluster_input_grad(g_centroids, inverse, counts, xp_shape, k, s, pad, d, keys)
            else:
                grad = cluster_grad(g_centroids, inverse, counts, xp_shape, k, s, d, keys)
        if g_norms is not None:
            src, norms = norm_parts
            if grad is not None:  # the norms' share, added in place: no second input-sized tensor
                member_norms_grad_into(grad, g_norms, norms, src, k, s, d, L, pad)
            elif ctx.to_input:
                grad = member_norms_input_grad(g_norms, norms, src, k, s, pad, d, L)
            else:
                grad = member_norms_grad(g_norms, norms, src, k, s, d, L)
    if grad is not None:
        grad = grad.to(ctx.dtype)
    return _input_grads(ctx, 8, 10, grad)


def _cluster_backward(ctx, g_centroids, _g_inverse, _g_counts):
    return _cluster_input_grads(ctx, g_centroids)


cluster.register_autograd(_cluster_backward, setup_context=_cluster_setup)


@torch.library.custom_op("reuse::cluster_grad", mutates_args=())
def cluster_grad(
    g_centroids: torch.Tensor,
    inverse: torch.Tensor,
    counts: torch.Tensor,
    xp_shape: list[int],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backward of ``cluster`` w.r.t. ``xp`` (Eq. 13-18): each member receives its
    cluster's centroid gradient divided by the cluster size, added back into the pixels
    of its sub-vector (col2im). Its own op so that the backward stays traceable. ``keys``
    (each slot's hash id, given for "batch" scope) enables the kernels' chunk path."""
    g = _padded_geometry(xp_shape, kernel_size, stride, dilation, g_centroids.shape[-1])
    return kernels.centroid_means_backward(g_centroids, inverse, counts, g, g_centroids.dtype, keys)


@cluster_grad.register_fake
def _(g_centroids, inverse, counts, xp_shape, kernel_size, stride, dilation, keys=None):
    return g_centroids.new_empty(xp_shape)


@torch.library.custom_op("reuse::cluster_input_grad", mutates_args=())
def cluster_input_grad(
    g_centroids: torch.Tensor,
    inverse: torch.Tensor,
    counts: torch.Tensor,
    xp_shape: list[int],
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """``cluster_grad`` for the unpadded input: the gradient of ``x`` (Nb, C, H, W, in
    channels-last memory) where ``xp = im2col(x, ..., padding)`` has ``xp_shape``; the
    padding's share is dropped without forming the padded gradient."""
    Nb, Hp, Wp, C = (int(v) for v in xp_shape)
    top, bottom, left, right = (int(v) for v in padding)
    H, W = Hp - top - bottom, Wp - left - right
    g = _padded_geometry(xp_shape, kernel_size, stride, dilation, g_centroids.shape[-1])
    # (Nb, C, H, W) channels-last, a fresh tensor autograd can add other gradients into
    return kernels.centroid_means_backward(
        g_centroids, inverse, counts, g, g_centroids.dtype, keys, interior=(top, left, H, W)
    )


@cluster_input_grad.register_fake
def _(g_centroids, inverse, counts, xp_shape, kernel_size, stride, padding, dilation, keys=None):
    Nb, Hp, Wp, C = (int(v) for v in xp_shape)
    H, W = Hp - padding[0] - padding[1], Wp - padding[2] - padding[3]
    return g_centroids.new_empty_strided(*_out_geometry(Nb, C, H, W))


# --------------------------------------------------------------------------- cluster_pixels


@torch.library.custom_op("reuse::cluster_pixels", mutates_args=())
def cluster_pixels(
    xp: torch.Tensor,
    ids: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    L: int,
    H: int,
    x: torch.Tensor | None = None,
    padding: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cluster`` ("batch" scope) for the per-pixel chain: sub-vectors of one whole pixel
    (L = C), stride 1, so sub-matrix b is kernel tap b and every sub-matrix hashes a pixel
    alike. ``ids`` are the per-pixel ids of ``lsh_hash(per_pixel=True)``, (Nb, Hp, Wp).

    Returns ``(centroids, ranks, slot_map, counts)``: centroids and counts as ``cluster``
    returns them (the same values), and its inverse index factorised: ``ranks`` (Nb, Hp, Wp)
    int32, each pixel's key rank (the rank of its id among the ids of the pixels any tap reads;
    -1 for a pixel none reads), and ``slot_map`` (nb, G) int32, each sub-matrix's slot of a key
    rank (-1 where it has no such pixel). Row n's slot in sub-matrix b is
    ``slot_map[b, ranks[pixel of (b, n)]]`` (``kernels.pixel_inverse`` forms cluster's inverse).
    The chain never writes the (nb, N) ids, inverse or norms: 2.5-5 MB each at CifarNet's conv2.
    ``x`` and ``padding`` as for ``cluster``."""
    return _cluster_pixels(xp, ids, kernel_size, stride, dilation, L, H, x, padding, "reuse.cluster_pixels")


def _cluster_pixels(xp, ids, kernel_size, stride, dilation, L, H, x, padding, op):
    """The forward of ``cluster_pixels`` (and of ``cluster_pixels_norms``)."""
    g = _padded_geometry(xp.shape, kernel_size, stride, dilation, L)
    kernels.check_pixel_geometry(g, op)
    if tuple(ids.shape) != tuple(xp.shape[:3]):
        raise ValueError(
            f"{op}: ids must be the per-pixel ids (Nb, Hp, Wp) = {tuple(xp.shape[:3])} of "
            f"lsh_hash(per_pixel=True), got {tuple(ids.shape)}"
        )
    interior = _interior(xp, x, padding)
    out = _cluster_pixel_ids(xp, ids, g, interior)
    ct = kernels.compute_dtype(xp.dtype)
    if xp.dtype.is_floating_point and xp.numel() and not bool(torch.isfinite(out[0].sum(dtype=ct))):
        # as cluster: pixels with a NaN or Inf entry get a cluster of their own (id 2^H)
        bad = ~torch.isfinite(xp).all(-1)
        out = _cluster_pixel_ids(xp, torch.where(bad, torch.full_like(ids, 1 << H), ids), g, interior)
    return out


def _cluster_pixel_ids(xp, ids, g, interior):
    ranks, slot_map, counts = kernels.pixel_compact(ids, g)
    centroids = kernels.pixel_centroid_means(xp, ranks, slot_map, counts, g, interior).to(xp.dtype)
    return centroids, ranks, slot_map, counts


def _cluster_pixels_fake(xp, ids, kernel_size, stride, L, op):
    """The fake outputs of ``cluster_pixels`` (``cluster_pixels_norms`` adds the norms)."""
    _check_pixel_args(xp.shape, kernel_size, stride, L, op)
    ctx = torch.library.get_ctx()
    cmax, G = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    nb = kernel_size[0] * kernel_size[1]
    return (
        xp.new_empty(nb, cmax, L),
        torch.empty_like(ids, dtype=torch.int32),
        ids.new_empty(nb, G, dtype=torch.int32),
        ids.new_empty(nb, cmax),
    )


@cluster_pixels.register_fake
def _(xp, ids, kernel_size, stride, dilation, L, H, x=None, padding=None):
    return _cluster_pixels_fake(xp, ids, kernel_size, stride, L, "reuse.cluster_pixels")


def _cluster_pixels_setup(ctx, inputs, output):
    xp, ids, kernel_size, stride, dilation, L, _, x, padding = inputs
    _, ranks, slot_map, counts = output
    ctx.to_input = _to_input(x, padding)
    ctx.padding = padding
    ctx.save_for_backward(ranks, slot_map, counts)
    ctx.mark_non_differentiable(ranks, slot_map, counts)
    ctx.set_materialize_grads(False)
    ctx.args = (list(xp.shape), kernel_size, stride, dilation)
    ctx.dtype = xp.dtype


def _cluster_pixels_backward(ctx, g_centroids, _g_ranks, _g_map, _g_counts):
    return _pixel_input_grads(ctx, g_centroids)


def _pixel_input_grads(ctx, g_centroids, g_norms=None):
    """The input's gradient of ``cluster_pixels`` (from the centroids') and of
    ``cluster_pixels_norms`` (the norms' share added in place), for ``x`` directly when
    channels-last, else for ``xp``."""
    ranks, slot_map, counts, *norm_parts = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[_input_slot(ctx, 7)]:
        pad = ctx.padding if ctx.to_input else None
        if g_centroids is not None:
            grad = cluster_pixels_grad(g_centroids, ranks, slot_map, counts, *ctx.args, pad)
        if g_norms is not None:
            src, norms = norm_parts
            grad = _add_pixel_norms_grad(grad, g_norms, norms, src, pad)
        if grad is not None:
            grad = grad.to(ctx.dtype)
    return _input_grads(ctx, 7, 9, grad)


cluster_pixels.register_autograd(_cluster_pixels_backward, setup_context=_cluster_pixels_setup)


@torch.library.custom_op("reuse::cluster_pixels_norms", mutates_args=())
def cluster_pixels_norms(
    xp: torch.Tensor,
    ids: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    L: int,
    H: int,
    x: torch.Tensor | None = None,
    padding: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cluster_pixels`` and ``member_norms(..., per_pixel=True)`` in one op (the per-pixel
    chain's ``cluster_norms``, for ``norm_grad=True``): ``(centroids, ranks, slot_map, counts,
    norms)``, each as the two ops return it. The backward writes the norms' share of the
    input's gradient into the centroids' share in place (x * g / ||x|| per pixel, g the norms'
    gradient), so the input's two gradients share one buffer, as with ``cluster_norms``."""
    out = _cluster_pixels(xp, ids, kernel_size, stride, dilation, L, H, x, padding, "reuse.cluster_pixels_norms")
    g = _padded_geometry(xp.shape, kernel_size, stride, dilation, L)
    return (*out, kernels.pixel_norms(xp, g, x, _interior(xp, x, padding)).to(xp.dtype))


@cluster_pixels_norms.register_fake
def _(xp, ids, kernel_size, stride, dilation, L, H, x=None, padding=None):
    out = _cluster_pixels_fake(xp, ids, kernel_size, stride, L, "reuse.cluster_pixels_norms")
    return (*out, xp.new_empty(xp.shape[:3]))


def _cluster_pixels_norms_setup(ctx, inputs, output):
    _cluster_pixels_setup(ctx, inputs, output[:4])
    xp, x = inputs[0], inputs[7]
    # the norms' backward reads the input (x itself when its gradient goes to x, else xp)
    ctx.save_for_backward(*output[1:4], x if ctx.to_input else xp, output[4])


def _cluster_pixels_norms_backward(ctx, g_centroids, _g_ranks, _g_map, _g_counts, g_norms):
    return _pixel_input_grads(ctx, g_centroids, g_norms)


def _add_pixel_norms_grad(grad, g_norms, norms, src, pad):
    """``grad`` + the per-pixel norms' share of the input's gradient, src * g / ||src|| (0 for a
    zero pixel), in place where ``grad`` is given (else a new tensor). ``pad`` given: ``src``
    and ``grad`` are the unpadded input (Nb, C, H, W) and the norms (Nb, Hp, Wp) cover its
    padded frame; else both are the padded (Nb, Hp, Wp, C)."""
    f = torch.where(norms > 0, g_norms / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
    if pad is not None:
        top, bottom, left, right = pad
        f = f[:, top : f.shape[1] - bottom, left : f.shape[2] - right]
        rows, f = src.permute(0, 2, 3, 1), f.unsqueeze(-1).to(src.dtype)
        if grad is None:
            return (rows * f).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        grad.permute(0, 2, 3, 1).addcmul_(rows, f)
        return grad
    f = f.unsqueeze(-1).to(src.dtype)
    if grad is None:
        return src * f
    return grad.addcmul_(src, f)


cluster_pixels_norms.register_autograd(_cluster_pixels_norms_backward, setup_context=_cluster_pixels_norms_setup)


@torch.library.custom_op("reuse::cluster_pixels_grad", mutates_args=())
def cluster_pixels_grad(
    g_centroids: torch.Tensor,
    ranks: torch.Tensor,
    slot_map: torch.Tensor,
    counts: torch.Tensor,
    xp_shape: list[int],
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    padding: list[int] | None = None,
) -> torch.Tensor:
    """Backward of ``cluster_pixels`` (``cluster_grad``'s Eq. 13-18 from the per-pixel maps):
    the gradient of ``xp``, or with ``padding`` that of the unpadded input (Nb, C, H, W) in
    channels-last memory, as ``cluster_input_grad``."""
    g = _padded_geometry(xp_shape, kernel_size, stride, dilation, g_centroids.shape[-1])
    interior = None
    if padding is not None:
        top, bottom, left, right = (int(v) for v in padding)
        interior = (top, left, g.Hp - top - bottom, g.Wp - left - right)
    return kernels.pixel_centroid_means_backward(g_centroids, ranks, slot_map, counts, g, g_centroids.dtype, interior)


@cluster_pixels_grad.register_fake
def _(g_centroids, ranks, slot_map, counts, xp_shape, kernel_size, stride, dilation, padding=None):
    if padding is None:
        return g_centroids.new_empty(xp_shape)
    Nb, Hp, Wp, C = (int(v) for v in xp_shape)
    H, W = Hp - padding[0] - padding[1], Wp - padding[2] - padding[3]
    return g_centroids.new_empty_strided(*_out_geometry(Nb, C, H, W))


# --------------------------------------------------------------------------- unit_rows

UNIT_EPS = 1e-12  # F.normalize's default


@torch.library.custom_op("reuse::unit_rows", mutates_args=())
def unit_rows(c: torch.Tensor) -> torch.Tensor:
    """c / max(||c||, eps) along the last dim: ``F.normalize(c, dim=-1)``, the norm
    centroid's unit centroids. An op of its own for its backward, (g - u (u . g)) / max(||c||,
    eps) with two temporaries; F.normalize's autograd held six centroid-sized ones at once,
    the norm centroid's backward peak on CifarNet conv2 at L=1600. Both are one C++ pass
    (kernels.unit_rows)."""
    return kernels.unit_rows(c, UNIT_EPS)


@unit_rows.register_fake
def _(c):
    return torch.empty_like(c)


def _unit_rows_setup(ctx, inputs, output):
    (c,) = inputs
    ctx.save_for_backward(output, kernels.lengths(c, keepdim=True, dtype=kernels.compute_dtype(c.dtype)))


def _unit_rows_backward(ctx, g):
    u, n = ctx.saved_tensors
    return unit_rows_grad(u, n, g)


@torch.library.custom_op("reuse::unit_rows_grad", mutates_args=())
def unit_rows_grad(u: torch.Tensor, n: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Backward of ``unit_rows`` from its output ``u`` and the rows' norms ``n`` (keepdim):
    (g - u (u . g)) / max(n, eps); below eps the denominator is the constant eps, so there is
    no projection term (as F.normalize). Its own op so the backward stays traceable."""
    return kernels.unit_rows_backward(u, n, g, UNIT_EPS)


@unit_rows_grad.register_fake
def _(u, n, g):
    return torch.empty_like(u)


unit_rows.register_autograd(_unit_rows_backward, setup_context=_unit_rows_setup)


# --------------------------------------------------------------------------- centroid_gemm


@torch.library.custom_op("reuse::centroid_gemm", mutates_args=())
def centroid_gemm(centroids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y_c,b = x_c,b . W_b for every sub-matrix b: (nb, Cmax, L) x (M, C, kh, kw) -> (nb, Cmax, M)."""
    wb = Geometry.of_weight(weight.shape, centroids.shape[-1]).weight_blocks(weight)
    _check_blocks(centroids, wb)
    return torch.bmm(centroids, wb)


@centroid_gemm.register_fake
def _(centroids, weight):
    return centroids.new_empty(centroids.shape[0], centroids.shape[1], weight.shape[0], dtype=weight.dtype)


def _check_blocks(centroids, wb):
    if centroids.dtype != wb.dtype:
        raise TypeError(
            f"reuse.centroid_gemm: input dtype {centroids.dtype} differs from weight dtype {wb.dtype}; "
            f"convert the input or the model (model.to(dtype)), as F.conv2d requires"
        )
    if centroids.shape[0] != wb.shape[0]:
        raise ValueError(
            f"reuse.centroid_gemm: {centroids.shape[0]} sub-matrices of centroids but the weight "
            f"splits into {wb.shape[0]} blocks of L={centroids.shape[-1]}"
        )


def _gemm_setup(ctx, inputs, output):
    centroids, weight = inputs
    ctx.save_for_backward(centroids, weight)


def _gemm_backward(ctx, g_yc):
    centroids, weight = ctx.saved_tensors
    geom = Geometry.of_weight(weight.shape, centroids.shape[-1])
    wb = geom.weight_blocks(weight)
    g_yc = g_yc.to(wb.dtype)
    d_cent = d_w = None
    if ctx.needs_input_grad[0]:
        d_cent = torch.bmm(g_yc, wb.transpose(1, 2)).to(centroids.dtype)  # dy_c,s,b . W_b^T
    if ctx.needs_input_grad[1]:
        d_w = geom.weight_from_blocks(torch.bmm(centroids.to(wb.dtype).transpose(1, 2), g_yc))  # Eq. 10
    return d_cent, d_w


centroid_gemm.register_autograd(_gemm_backward, setup_context=_gemm_setup)


# --------------------------------------------------------------------------- reconstruct


@torch.library.custom_op("reuse::reconstruct", mutates_args=())
def reconstruct(
    yc: torch.Tensor,
    inverse: torch.Tensor,
    bias: torch.Tensor | None,
    scales: torch.Tensor | None = None,
    slot_map: torch.Tensor | None = None,
    window: list[int] | None = None,
) -> torch.Tensor:
    """y = sum_b y_c,b[inverse_b] + bias, as (Nb, M, Oh, Ow) in channels-last memory. With
    ``scales`` (nb, Nb, Oh, Ow) each member's term is multiplied by its scale (the
    norm-preserving centroid: a member's norm times its cluster's unit centroid output).

    The per-pixel chain (``reuse.cluster_pixels``) gives the inverse index factorised:
    ``inverse`` is then the pixels' key ranks (Nb, Hp, Wp), ``slot_map`` (nb, G) each block's
    slot of a key rank, ``window`` = (kh, kw, dh, dw) the kernel, and ``scales`` per pixel
    (Nb, Hp, Wp); row n's slot in block b is ``slot_map[b, inverse[pixel of (b, n)]]``."""
    if slot_map is not None:
        g = _pixel_maps_geometry(inverse, slot_map, window, "reuse.reconstruct")
        rows = kernels.pixel_reconstruct_rows(yc, inverse, slot_map, g, bias, scales)
        oh, ow = g.out_hw
        size, stride = _out_geometry(g.Nb, yc.shape[-1], oh, ow)
        return rows.new_empty(0).set_(rows.untyped_storage(), rows.storage_offset(), size, stride)
    nb, Nb, oh, ow = inverse.shape
    rows = kernels.reconstruct_rows(yc, inverse, bias, scales)
    # The (N, M) rows are the output in channels-last memory. Re-wrap the storage as a
    # fresh tensor rather than a permuted view: autograd forbids in-place ops (ReLU(inplace))
    # on views returned by custom functions.
    size, stride = _out_geometry(Nb, yc.shape[-1], oh, ow)
    return rows.new_empty(0).set_(rows.untyped_storage(), rows.storage_offset(), size, stride)


def _out_geometry(Nb, M, oh, ow):
    """Size and strides of a (Nb, M, oh, ow) tensor in channels-last memory."""
    return (Nb, M, oh, ow), (oh * ow * M, 1, ow * M, M)


def _pixel_maps_geometry(ranks, slot_map, window, op):
    if window is None or len(window) != 4:
        raise ValueError(f"{op}: with slot_map (the per-pixel chain) give window = [kh, kw, dh, dw]")
    if ranks.dim() != 3 or slot_map.dim() != 2 or slot_map.shape[0] != window[0] * window[1]:
        raise ValueError(
            f"{op}: the per-pixel chain's inverse is the key ranks (Nb, Hp, Wp) and slot_map (kh * kw, G); got "
            f"{tuple(ranks.shape)} and {tuple(slot_map.shape)} for window {list(window)}"
        )
    return kernels.pixel_geometry(ranks.shape, window)


@reconstruct.register_fake
def _(yc, inverse, bias, scales=None, slot_map=None, window=None):
    if slot_map is not None:
        kh, kw, dh, dw = window
        Nb, Hp, Wp = inverse.shape
        oh, ow = conv_out_size(Hp, kh, 1, dh), conv_out_size(Wp, kw, 1, dw)
        return yc.new_empty_strided(*_out_geometry(Nb, yc.shape[-1], oh, ow))
    nb, Nb, oh, ow = inverse.shape
    return yc.new_empty_strided(*_out_geometry(Nb, yc.shape[-1], oh, ow))


def _reconstruct_setup(ctx, inputs, output):
    yc, inverse, bias, scales, slot_map, window = inputs
    ctx.has_scales = scales is not None
    # y_c is needed only for the scales' gradient: a first layer's norms (of the model's input)
    # need none, and keeping y_c there would only raise the backward's peak.
    keep_yc = ctx.has_scales and ctx.needs_input_grad[3]
    ctx.save_for_backward(inverse, scales, yc if keep_yc else None, slot_map)
    ctx.window = window
    ctx.cmax = yc.shape[1]
    ctx.yc_dtype = yc.dtype
    ctx.has_bias = bias is not None


def _reconstruct_backward(ctx, g_y):
    inverse, scales, yc, slot_map = ctx.saved_tensors
    if slot_map is not None:
        return _pixel_reconstruct_backward(ctx, g_y, inverse, scales, yc, slot_map)
    d_yc = d_bias = d_scales = None
    both = ctx.has_scales and ctx.needs_input_grad[0] and ctx.needs_input_grad[3]
    if both:  # one pass for the two (the norm centroid's backward)
        d_yc, d_scales = reconstruct_grad_scaled(g_y, yc, inverse, scales)
        d_yc, d_scales = d_yc.to(ctx.yc_dtype), d_scales.to(scales.dtype)
    elif ctx.needs_input_grad[0]:
        d_yc = reconstruct_grad(g_y, inverse, ctx.cmax, scales).to(ctx.yc_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        d_bias = g_y.sum((0, 2, 3))
    if ctx.has_scales and ctx.needs_input_grad[3] and not both:
        d_scales = reconstruct_scales_grad(g_y, yc, inverse).to(scales.dtype)
    return d_yc, None, d_bias, d_scales, None, None


def _pixel_reconstruct_backward(ctx, g_y, ranks, scales, yc, slot_map):
    """The backward of the per-pixel chain's reconstruct: y_c's gradient, and the per-pixel
    scales' (with the norms' gradient, ``norm_grad=True``) in a pass of its own."""
    d_yc = d_bias = d_scales = None
    if ctx.needs_input_grad[0]:
        d_yc = reconstruct_grad(g_y, ranks, ctx.cmax, scales, slot_map, ctx.window).to(ctx.yc_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        d_bias = g_y.sum((0, 2, 3))
    if ctx.has_scales and ctx.needs_input_grad[3]:
        d_scales = reconstruct_scales_grad(g_y, yc, ranks, slot_map, ctx.window).to(scales.dtype)
    return d_yc, None, d_bias, d_scales, None, None


reconstruct.register_autograd(_reconstruct_backward, setup_context=_reconstruct_setup)


@torch.library.custom_op("reuse::reconstruct_grad", mutates_args=())
def reconstruct_grad(
    g_y: torch.Tensor,
    inverse: torch.Tensor,
    cmax: int,
    scales: torch.Tensor | None = None,
    slot_map: torch.Tensor | None = None,
    window: list[int] | None = None,
) -> torch.Tensor:
    """Backward of ``reconstruct`` w.r.t. ``y_c``: dy_c,s (Eq. 8), the output gradient summed
    over each cluster's members (weighted by their scales), (nb, Cmax, M). Its own op so the
    backward stays traceable. ``slot_map`` and ``window``: the per-pixel chain, as in
    ``reconstruct``."""
    M = g_y.shape[1]
    rows = g_y.permute(0, 2, 3, 1).reshape(-1, M)
    if slot_map is not None:
        g = _pixel_maps_geometry(inverse, slot_map, window, "reuse.reconstruct_grad")
        return kernels.pixel_reconstruct_rows_backward(rows, inverse, slot_map, g, cmax, scales)
    return kernels.reconstruct_rows_backward(rows, inverse, cmax, scales)


@reconstruct_grad.register_fake
def _(g_y, inverse, cmax, scales=None, slot_map=None, window=None):
    nb = slot_map.shape[0] if slot_map is not None else inverse.shape[0]
    return g_y.new_empty(nb, cmax, g_y.shape[1])


@torch.library.custom_op("reuse::reconstruct_scales_grad", mutates_args=())
def reconstruct_scales_grad(
    g_y: torch.Tensor,
    yc: torch.Tensor,
    inverse: torch.Tensor,
    slot_map: torch.Tensor | None = None,
    window: list[int] | None = None,
) -> torch.Tensor:
    """Backward of ``reconstruct`` w.r.t. ``scales``: each member's output gradient dotted
    with its cluster's output, (nb, Nb, Oh, Ow). With ``slot_map`` and ``window`` (the
    per-pixel chain, as in ``reconstruct``), the gradient of the per-pixel scales, (Nb, Hp, Wp):
    the members' terms summed into their pixels."""
    M = g_y.shape[1]
    rows = g_y.permute(0, 2, 3, 1).reshape(-1, M).to(yc.dtype)
    if slot_map is not None:
        g = _pixel_maps_geometry(inverse, slot_map, window, "reuse.reconstruct_scales_grad")
        return kernels.pixel_scales_backward(rows, yc, inverse, slot_map, g)
    return kernels.reconstruct_scales_backward(rows, yc, inverse).view(inverse.shape)


@reconstruct_scales_grad.register_fake
def _(g_y, yc, inverse, slot_map=None, window=None):
    return yc.new_empty(inverse.shape)


@torch.library.custom_op("reuse::reconstruct_grad_scaled", mutates_args=())
def reconstruct_grad_scaled(
    g_y: torch.Tensor, yc: torch.Tensor, inverse: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reconstruct_grad`` with scales and ``reconstruct_scales_grad`` in one pass:
    (dy_c,s (nb, Cmax, M), d_scales (nb, Nb, Oh, Ow))."""
    M = g_y.shape[1]
    rows = g_y.permute(0, 2, 3, 1).reshape(-1, M)
    d_yc, d_scales = kernels.reconstruct_scaled_backward(rows, yc, inverse, scales)
    return d_yc, d_scales.view(inverse.shape)


@reconstruct_grad_scaled.register_fake
def _(g_y, yc, inverse, scales):
    return yc.new_empty(yc.shape), yc.new_empty(inverse.shape)


# --------------------------------------------------------------------------- member_norms


@torch.library.custom_op("reuse::member_norms", mutates_args=())
def member_norms(
    xp: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    L: int,
    x: torch.Tensor | None = None,
    padding: list[int] | None = None,
    per_pixel: bool = False,
) -> torch.Tensor:
    """||x_{n,b}||, the norm of every sub-vector, (nb, Nb, Oh, Ow): the per-member scales of
    the norm-preserving centroid (``ReuseConfig(centroid="norm")``). With ``per_pixel`` (the
    per-pixel chain: L = C, stride 1), the norm of every padded pixel, (Nb, Hp, Wp), which is
    the norm of every sub-vector that is that pixel (the same values); a channels-last ``x``
    is then read in place of ``xp``'s interior (the padding's norms are 0), as below.

    The rewrite also passes the convolution's input ``x`` with ``xp = im2col(x, ..., padding)``:
    if ``x`` is channels-last, the backward keeps ``x`` instead of the padded ``xp`` and returns
    the gradient for ``x`` directly (none for ``xp``): the norms are a function of ``x``, and
    the padded copy is neither kept nor given a padded gradient. Otherwise the gradient goes
    to ``xp`` as without ``x``."""
    if per_pixel:
        g = _padded_geometry(xp.shape, kernel_size, stride, dilation, L)
        return kernels.pixel_norms(xp, g, x, _interior(xp, x, padding)).to(xp.dtype)
    return _member_norms(xp, kernel_size, stride, dilation, L)


def _member_norms(xp, kernel_size, stride, dilation, L) -> torch.Tensor:
    """The forward of ``member_norms`` (and the norms of ``cluster_norms``)."""
    g = _padded_geometry(xp.shape, kernel_size, stride, dilation, L)
    oh, ow = g.out_hw
    return kernels.member_norms(xp, g).to(xp.dtype).view(g.nb, g.Nb, oh, ow)


@member_norms.register_fake
def _(xp, kernel_size, stride, dilation, L, x=None, padding=None, per_pixel=False):
    if per_pixel:
        _check_pixel_args(xp.shape, kernel_size, stride, L, "reuse.member_norms(per_pixel=True)")
        return xp.new_empty(xp.shape[:3])
    return xp.new_empty(_per_member_shape(xp.shape, kernel_size, stride, dilation, L))


def _norms_setup(ctx, inputs, output):
    xp, kernel_size, stride, dilation, L, x, padding, per_pixel = inputs
    ctx.per_pixel = per_pixel
    ctx.from_input = _to_input(x, padding)  # the same rule as cluster's backward
    ctx.save_for_backward(x if ctx.from_input else xp, output)
    ctx.args = (kernel_size, stride, dilation, L)
    ctx.padding = padding


def _norms_backward(ctx, g_norms):
    src, norms = ctx.saved_tensors
    none = (None,) * 7
    if ctx.per_pixel:  # d ||p|| / dp = p / ||p|| (0 for a zero pixel), per pixel
        if ctx.from_input:  # the gradient of x: its pixels' factors (the padding's are not x's)
            dx = _add_pixel_norms_grad(None, g_norms, norms, src, ctx.padding)
            return None, None, None, None, None, dx, None, None
        return (_add_pixel_norms_grad(None, g_norms, norms, src, None), *none)
    if ctx.from_input:
        k, s, d, L = ctx.args
        dx = member_norms_input_grad(g_norms, norms, src, k, s, ctx.padding, d, L)
        return None, None, None, None, None, dx, None, None
    return (member_norms_grad(g_norms, norms, src, *ctx.args), *none)


member_norms.register_autograd(_norms_backward, setup_context=_norms_setup)


@torch.library.custom_op("reuse::member_norms_input_grad", mutates_args=())
def member_norms_input_grad(
    g_norms: torch.Tensor,
    norms: torch.Tensor,
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    L: int,
) -> torch.Tensor:
    """Backward of ``member_norms`` given ``x``: x / ||x|| times the gradient, summed into the
    input's pixels, (Nb, C, H, W) in channels-last memory (the padding's share is dropped)."""
    Nb, C, H, W = x.shape
    top, bottom, left, right = (int(v) for v in padding)
    g = _padded_geometry([Nb, H + top + bottom, W + left + right, C], kernel_size, stride, dilation, L)
    nb = g.nb
    x_cl = x.permute(0, 2, 3, 1)
    d = kernels.member_norms_backward(g_norms.reshape(nb, -1), norms.reshape(nb, -1), x_cl, g, at=(top, left))
    return d.to(x.dtype)  # (Nb, C, H, W) channels-last, a fresh tensor autograd can add into


@member_norms_input_grad.register_fake
def _(g_norms, norms, x, kernel_size, stride, padding, dilation, L):
    return x.new_empty_strided(*_out_geometry(*x.shape))


@torch.library.custom_op("reuse::member_norms_grad", mutates_args=())
def member_norms_grad(
    g_norms: torch.Tensor,
    norms: torch.Tensor,
    xp: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    L: int,
) -> torch.Tensor:
    """Backward of ``member_norms``: x / ||x|| times the gradient, back into the pixels."""
    g = _padded_geometry(xp.shape, kernel_size, stride, dilation, L)
    nb = g.nb
    return kernels.member_norms_backward(g_norms.reshape(nb, -1), norms.reshape(nb, -1), xp, g).to(xp.dtype)


@member_norms_grad.register_fake
def _(g_norms, norms, xp, kernel_size, stride, dilation, L):
    return torch.empty_like(xp)


# --------------------------------------------------------------------------- cluster_norms


@torch.library.custom_op("reuse::cluster_norms", mutates_args=())
def cluster_norms(
    xp: torch.Tensor,
    ids: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    L: int,
    H: int,
    scope: str,
    x: torch.Tensor | None = None,
    padding: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cluster`` and ``member_norms`` in one op, for the norm-preserving centroid:
    ``(centroids, inverse, counts, norms)``, each as the two ops return it.

    Why one op: the input gets a gradient from the centroids and one from the norms, both
    as large as the input. As two ops, autograd holds both at once before adding them (one
    input-sized tensor too many at the backward's peak: CifarNet conv2, channels-last,
    L=1600, 33.0 MB against the mean centroid's 26.9). Here the backward writes the norms'
    share into the centroids' gradient (``member_norms_grad_into``)."""
    centroids, inverse, counts = _cluster(
        xp, ids, kernel_size, stride, dilation, L, H, scope, "reuse.cluster_norms", x, padding
    )
    return centroids, inverse, counts, _member_norms(xp, kernel_size, stride, dilation, L)


@cluster_norms.register_fake
def _(xp, ids, kernel_size, stride, dilation, L, H, scope, x=None, padding=None):
    norms = xp.new_empty(_per_member_shape(xp.shape, kernel_size, stride, dilation, L))
    return (*_cluster_fake(xp, ids, kernel_size, stride, dilation, L, H, scope), norms)


def _cluster_norms_backward(ctx, g_centroids, _g_inverse, _g_counts, g_norms):
    return _cluster_input_grads(ctx, g_centroids, g_norms)


cluster_norms.register_autograd(_cluster_norms_backward, setup_context=_cluster_setup)


@torch.library.custom_op("reuse::member_norms_grad_into", mutates_args=("out",))
def member_norms_grad_into(
    out: torch.Tensor,
    g_norms: torch.Tensor,
    norms: torch.Tensor,
    src: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    L: int,
    padding: list[int] | None = None,
) -> None:
    """Add the backward of ``member_norms`` into ``out``: without ``padding``, ``src`` is the
    padded ``xp`` and ``out`` its gradient (``member_norms_grad``); with it, ``src`` is the
    unpadded input and ``out`` its channels-last gradient (``member_norms_input_grad``)."""
    if padding is None:
        g = _padded_geometry(src.shape, kernel_size, stride, dilation, L)
        at = None
    else:
        Nb, C, H, W = src.shape
        top, bottom, left, right = (int(v) for v in padding)
        g = _padded_geometry([Nb, H + top + bottom, W + left + right, C], kernel_size, stride, dilation, L)
        src, at = src.permute(0, 2, 3, 1), (top, left)
    if at is not None:
        view = out.permute(0, 2, 3, 1)  # (Nb, H, W, C): the channels-last memory as it lies
        if not view.is_contiguous():
            raise ValueError("reuse.member_norms_grad_into: out must be channels-last (Nb, C, H, W)")
    nb = g.nb
    kernels.member_norms_backward(g_norms.reshape(nb, -1), norms.reshape(nb, -1), src, g, at=at, out=out)


@member_norms_grad_into.register_fake
def _(out, g_norms, norms, src, kernel_size, stride, dilation, L, padding=None):
    return None


# --------------------------------------------------------------------------- the chain, eagerly


def reuse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    planes: torch.Tensor,
    kernel_size,
    stride,
    padding,
    dilation,
    *,
    scope: str = "batch",
    centroid: str = "norm",
    keep_parts: bool = True,
    norm_grad: bool = True,
    per_pixel: bool | None = None,
):
    """The chain the rewrite emits for one convolution (one group), called eagerly:
    ``padding`` is (top, bottom, left, right), ``planes`` (L, H). Returns ``(y, parts)`` with
    the intermediate tensors (``xp``, ``ids``, ``centroids``, ``inverse``, ``counts``, ``yc``);
    with ``keep_parts=False`` only ``counts``, and every intermediate is dropped after its
    last use, as in the rewritten graph's code (for memory measurements). With the norm
    centroid and ``norm_grad=False`` the member norms are constants of the backward
    (``ReuseConfig.norm_grad``): ``cluster`` and a ``member_norms`` of the detached input.

    ``per_pixel``: the per-pixel chain (``cluster_pixels``; None: where the rewrite would emit
    it, ``kernels.use_pixel_chain``); its parts hold ``ranks`` and ``slot_map`` and, with
    ``keep_parts``, the generic ``ids`` and ``inverse`` formed from them."""
    k, s, p, d = list(kernel_size), list(stride), list(padding), list(dilation)
    L, H = planes.shape
    x = chain_input(x)
    fused = centroid == "norm" and norm_grad
    if per_pixel is None:
        per_pixel = kernels.use_pixel_chain(x.shape[1], L, s, k, scope)
    if per_pixel:
        y, parts = _reuse_conv2d_pixels(x, weight, bias, planes, k, s, p, d, centroid, keep_parts, norm_grad)
        return chain_output(y), parts
    parts = {}
    xp = im2col(x, k, s, p, d)
    ids = lsh_hash(xp, planes, k, s, d)
    # as the rewrite emits it (passes/conv_rewrite.py): the fused op when the norms need a
    # gradient, else cluster and the norms of the detached input
    if fused:
        cent, inverse, counts, norms = cluster_norms(xp, ids, k, s, d, L, H, scope, x, p)
    else:
        cent, inverse, counts = cluster(xp, ids, k, s, d, L, H, scope, x, p)
        norms = member_norms(xp.detach(), k, s, d, L) if centroid == "norm" else None
    used = unit_rows(cent) if centroid == "norm" else cent
    if keep_parts:
        parts.update(xp=xp, ids=ids, centroids=cent)
    del xp, ids, cent
    yc = centroid_gemm(used, weight)
    del used
    y = reconstruct(yc, inverse, bias, norms)
    if keep_parts:
        parts.update(inverse=inverse, yc=yc)
    parts["counts"] = counts
    return chain_output(y), parts


def _reuse_conv2d_pixels(x, weight, bias, planes, k, s, p, d, centroid, keep_parts, norm_grad):
    """:func:`reuse_conv2d`'s per-pixel chain, as the rewrite emits it (``cluster_pixels_norms``
    with the norms' gradient). Where L divides C (``kernels.pixel_slices``), one chain per
    channel slice of L, their outputs added (the bias in the first); the parts are then the
    generic chain's, joined from the slices' (``kernels.join_blocks``), and ``slices`` holds
    each slice's own."""
    L = planes.shape[0]
    C = x.shape[1]
    if C == L or C % L:  # one chain (its ops check the geometry)
        return _pixel_chain(x, weight, bias, planes, k, s, p, d, centroid, keep_parts, norm_grad)
    chains = [
        _pixel_chain(xj, wj, bias if j == 0 else None, planes, k, s, p, d, centroid, keep_parts, norm_grad)
        for j, (xj, wj) in enumerate(zip(kernels.split_channels(x, L), torch.split(weight, L, dim=1)))
    ]
    y = kernels.add_outputs([c[0] for c in chains])
    slices = [c[1] for c in chains]
    per_block = ("ids", "centroids", "inverse", "yc", "counts")
    parts = {name: kernels.join_blocks([sl[name] for sl in slices]) for name in per_block if name in slices[0]}
    if keep_parts:
        parts["slices"] = slices
        parts["xp"] = im2col(x, k, s, p, d)
    return y, parts


def _pixel_chain(x, weight, bias, planes, k, s, p, d, centroid, keep_parts, norm_grad):
    """One per-pixel chain (L = C)."""
    L, H = planes.shape
    xp = im2col(x, k, s, p, d)
    ids = lsh_hash(xp, planes, k, s, d, True, x, p)
    if centroid == "norm" and norm_grad:
        cent, ranks, slot_map, counts, norms = cluster_pixels_norms(xp, ids, k, s, d, L, H, x, p)
    else:
        cent, ranks, slot_map, counts = cluster_pixels(xp, ids, k, s, d, L, H, x, p)
        norms = member_norms(xp.detach(), k, s, d, L, x.detach(), p, True) if centroid == "norm" else None
    used = unit_rows(cent) if centroid == "norm" else cent
    parts = {}
    if keep_parts:
        g = _padded_geometry(xp.shape, k, s, d, L)
        parts.update(xp=xp, ids=kernels.pixel_rows(ids, g), centroids=cent, ranks=ranks, slot_map=slot_map)
        parts["inverse"] = kernels.pixel_inverse(ranks, slot_map, g)
    del xp, ids, cent
    yc = centroid_gemm(used, weight)
    del used
    y = reconstruct(yc, ranks, bias, norms, slot_map, [k[0], k[1], d[0], d[1]])
    if keep_parts:
        parts["yc"] = yc
    parts["counts"] = counts
    return y, parts


# --------------------------------------------------------------------------- zero_skip_conv2d


@torch.library.custom_op("reuse::zero_skip_conv2d", mutates_args=())
def zero_skip_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    skip: list[float] | None = None,
) -> torch.Tensor:
    """An exact layer (not a reuse stage): ``F.conv2d(x, weight, bias, stride, padding,
    dilation)`` (groups 1, ``padding`` (top, left) of a symmetric padding), whose forward is
    ATen's convolution, bit for bit, and whose weight and bias gradients skip the inputs equal
    to their channel's common value ``skip`` (C floats; None: zeros) (:func:`kernels.zero_skip_weight_grad`:
    the same sums, regrouped). The input gradient, where one is needed, is ATen's. The measured
    policy picks it for an exact layer whose input is mostly one value per channel, where it
    times faster (docs/policies.md, "Zero-skipping exact layers"); the rewrite emits it through
    :func:`exact_conv2d`."""
    if skip is not None and len(skip) != x.shape[1]:
        raise ValueError(f"reuse.zero_skip_conv2d: {len(skip)} skip values for an input of {x.shape[1]} channels")
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], 1)


@zero_skip_conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, skip=None):
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], 1)


@torch.library.custom_op("reuse::zero_skip_conv2d_grad", mutates_args=())
def zero_skip_conv2d_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    skip: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias gradients of :func:`zero_skip_conv2d` (an op of its own, so that
    compiled backward graphs call it as one)."""
    return kernels.zero_skip_weight_grad(x, dy, weight, stride, padding, dilation, skip)


def _weight_grads_like(weight, dy):
    """Fake (dW, db) of an exact layer's weight-gradient op: dW as ``weight``, contiguous, and db
    of ``dy``'s channels."""
    return torch.empty_like(weight, memory_format=torch.contiguous_format), dy.new_empty(dy.shape[1])


@zero_skip_conv2d_grad.register_fake
def _(x, dy, weight, stride, padding, dilation, skip=None):
    return _weight_grads_like(weight, dy)


def _zero_skip_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, skip = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (stride, padding, dilation, skip)
    ctx.has_bias = bias is not None


def _zero_skip_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, skip = ctx.conv
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.aten.convolution_backward(
            dy, x, weight, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False]
        )[0]
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dw, db = zero_skip_conv2d_grad(x.detach(), dy, weight.detach(), stride, padding, dilation, skip)
    return dx, dw, db if ctx.has_bias else None, None, None, None, None


zero_skip_conv2d.register_autograd(_zero_skip_backward, setup_context=_zero_skip_setup)


def zero_skip_runs(x: torch.Tensor) -> bool:
    """Whether :func:`exact_conv2d` runs :func:`zero_skip_conv2d` for input ``x`` (with a weight
    of its dtype): a 4-D float32/64 tensor on the CPU, outside autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 4
        and not torch.is_autocast_enabled("cpu")
    )


@kernels.one_call_when_traced
def exact_conv2d(x, weight, bias, stride: list[int], padding: list[int], dilation: list[int], skip=None):
    """What the rewrite emits for an exact layer with the zero-skipping weight gradient:
    :func:`zero_skip_conv2d` for a float32/64 ``x`` on the CPU, else (another device or dtype,
    or under ``torch.autocast``, which casts a stock convolution's inputs) ``F.conv2d`` itself,
    so that the layer computes what the stock layer computes there. Traced symbolically it
    records itself as one call (``kernels.one_call_when_traced``)."""
    if zero_skip_runs(x) and x.dtype == weight.dtype:
        return zero_skip_conv2d(x, weight, bias, stride, padding, dilation, skip)
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)


# --------------------------------------------------------------------------- conv_pool


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (its channel stride 1; a single channel's
    tensor by its own strides, as ``model.to(memory_format=torch.channels_last)`` leaves them)."""
    return t.dim() == 4 and t.stride(1) == 1 and t.shape[2] * t.shape[3] > 1


def _block_output(out_nhwc: torch.Tensor, x, weight) -> torch.Tensor:
    """The block's (Nb, M, Ph, Pw) output: channels-last memory where the input or the weight is
    channels-last (as ATen's CPU convolution chooses), else contiguous."""
    out = out_nhwc.permute(0, 3, 1, 2)
    return out if _channels_last(x) or _channels_last(weight) else out.contiguous()


@torch.library.custom_op("reuse::conv_pool", mutates_args=())
def conv_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: list[int],
    pool: list[int],
    relu: bool,
    skip: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact first block in one op (not a reuse stage): ``F.conv2d(x, weight, bias, 1,
    padding)`` (groups 1, ``padding`` (top, left) of a symmetric padding) -> ``F.max_pool2d(k,
    s, p)`` (``pool`` = [k, s, p]; dilation 1, floor mode) -> ``F.relu`` if ``relu``, for an
    input that needs no gradient (a model's first layer). Returns (out, idx): the block's output
    and, per pooled value, its maximum's position in its window (uint8 (Nb, Ph, Pw, M), 255
    where the ReLU passes no gradient), which the backward routes the gradient by. The
    convolution's output is never in memory as a whole, and the inputs equal to their
    channel's common value ``skip`` (C floats; None: zeros) are added once per position, not
    once per occurrence (:func:`kernels.conv_pool_forward`: F.conv2d's sums, regrouped; the
    max and its position as ATen's max_pool2d picks them). The weight and bias gradients are
    :func:`zero_skip_conv2d`'s sums on the routed gradient. The measured policy picks it where
    it times faster than the layers it replaces (docs/policies.md, "The first block in one
    pass"); the rewrite emits it through :func:`conv_pool_block`."""
    if skip is not None and len(skip) != x.shape[1]:
        raise ValueError(f"reuse.conv_pool: {len(skip)} skip values for an input of {x.shape[1]} channels")
    if len(pool) != 3 or len(padding) != 2:
        raise ValueError(
            f"reuse.conv_pool: pool must be [kernel, stride, padding] and padding [top, left]; got {pool}, {padding}"
        )
    out, idx = kernels.conv_pool_forward(x, weight, bias, padding, pool, relu, skip)
    return _block_output(out, x, weight), idx


@conv_pool.register_fake
def _(x, weight, bias, padding, pool, relu, skip=None):
    _, _, Ph, Pw = kernels.conv_pool_sizes(x, weight, padding, pool)
    shape = (x.shape[0], Ph, Pw, weight.shape[0])
    return _block_output(x.new_empty(shape), x, weight), x.new_empty(shape, dtype=torch.uint8)


@torch.library.custom_op("reuse::conv_pool_grad", mutates_args=())
def conv_pool_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    padding: list[int],
    pool: list[int],
    skip: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias gradients of :func:`conv_pool` for its output's gradient ``g`` (an op
    of its own, so that compiled backward graphs call it as one)."""
    gp = g.permute(0, 2, 3, 1).contiguous()  # (Nb, Ph, Pw, M): free for a channels-last g
    return kernels.conv_pool_weight_grad(x, gp, idx, weight, padding, pool, skip)


@conv_pool_grad.register_fake
def _(x, g, idx, weight, padding, pool, skip=None):
    return _weight_grads_like(weight, g)


def _conv_pool_setup(ctx, inputs, output):
    x, weight, bias, padding, pool, relu, skip = inputs
    ctx.save_for_backward(x, output[1], weight)
    ctx.block = (padding, pool, skip)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _conv_pool_backward(ctx, g, _g_idx):
    x, idx, weight = ctx.saved_tensors
    padding, pool, skip = ctx.block
    if ctx.needs_input_grad[0]:
        raise RuntimeError(
            "reuse.conv_pool computes no input gradient (it is a first block's op, whose input needs none); "
            "call reuse_compiler.runtime.ops.conv_pool_block, which runs the stock layers for an input that "
            "requires grad"
        )
    dw = db = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dw, db = conv_pool_grad(x.detach(), g, idx, weight.detach(), padding, pool, skip)
    return None, dw, db if ctx.has_bias else None, None, None, None, None


conv_pool.register_autograd(_conv_pool_backward, setup_context=_conv_pool_setup)


def conv_pool_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`conv_pool_block` runs :func:`conv_pool` (the C++ kernels) for input ``x``:
    :func:`zero_skip_runs`, ``weight``'s dtype, an input that needs no gradient, and the C++
    kernels built."""
    from . import extension

    return zero_skip_runs(x) and x.dtype == weight.dtype and not x.requires_grad and extension.get() is not None


@kernels.one_call_when_traced
def conv_pool_block(x, weight, bias, padding: list[int], pool: list[int], relu: bool, skip=None):
    """What the rewrite emits for an exact first block conv -> max_pool2d (-> ReLU) that the
    measured policy runs in one pass: :func:`conv_pool` where :func:`conv_pool_runs`, else the
    layers themselves (:func:`exact_conv2d`, ``F.max_pool2d``, ``F.relu``), which compute what
    the stock block computes. Traced symbolically it records itself as one call."""
    if conv_pool_runs(x, weight):
        return conv_pool(x, weight, bias, padding, pool, relu, skip)[0]
    y = exact_conv2d(x, weight, bias, [1, 1], padding, [1, 1], skip)
    y = torch.nn.functional.max_pool2d(y, pool[0], pool[1], pool[2])
    return torch.nn.functional.relu(y) if relu else y


# --------------------------------------------------------------------------- autocast


@kernels.one_call_when_traced
def chain_input(x: torch.Tensor) -> torch.Tensor:
    """The chain's input: under ``torch.autocast`` a float16/bfloat16 ``x`` as float32, once
    for every op of the chain (the rewrite emits this call first; without autocast, or for a
    float32/64 ``x``, ``x`` itself). The chain runs in float32 under autocast: its C++ kernels
    are float32/64, and its clustering sums would keep few bits in half precision; stock
    convolutions there run in the lower precision (docs/architecture.md, "Mixed precision").
    Traced symbolically (a pickled GraphModule re-traces its code when loaded) it records
    itself as one call (``kernels.one_call_when_traced``)."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return x.float()
    return x


@kernels.one_call_when_traced
def chain_output(y: torch.Tensor) -> torch.Tensor:
    """The chain's output: under ``torch.autocast`` a float32 ``y`` in autocast's dtype
    (bfloat16/float16), as ``F.conv2d`` gives it there, so that the layers after a rewritten one
    run and keep their activations as they do after a stock convolution; the chain itself ran
    in float32 (:func:`chain_input`). Without autocast, or for a float64 ``y``, ``y`` itself.
    Traced symbolically it records itself as one call, as :func:`chain_input` does."""
    if y.dtype == torch.float32 and torch.is_autocast_enabled(y.device.type):
        return y.to(torch.get_autocast_dtype(y.device.type))
    return y


def _register_autocast() -> None:
    """Every ``reuse`` op, called under autocast, casts its half-precision inputs to float32
    and runs with autocast off, so that the ATen ops inside it (the GEMMs, the fallbacks) stay
    float32 as well (``torch.library.register_autocast``; float64 inputs are left as they are)."""
    for op in list(globals().values()):  # the CustomOpDef objects (duck-typed: torch >= 2.5)
        if getattr(op, "_namespace", None) == "reuse" and hasattr(op, "register_autocast"):
            for device in ("cpu", "cuda"):
                op.register_autocast(device, torch.float32)


_register_autocast()
