"""Naive reference of the reuse convolution: the paper's equations, written plainly.

This is the test oracle for the custom ops in :mod:`reuse_compiler.runtime.ops`. It builds
the full N x K im2col matrix with ``F.unfold``, hashes every sub-vector with Eq. 4, clusters
each sub-matrix with ``torch.unique``, forms centroids as means, multiplies them with the
weight blocks and reconstructs. Autograd through it gives the exact gradient of the
approximate forward for the fixed cluster assignment, which is what the ops' hand-written
backward (Eq. 7-18) must reproduce.

>>> import torch
>>> x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
>>> planes = lsh_planes(9, 8, seed=0)
>>> y, info = reference_reuse_conv2d(x, w, None, padding=(1, 1, 1, 1), L=9, planes=planes)
>>> y.shape, info["ids"].shape
(torch.Size([2, 4, 6, 6]), torch.Size([3, 2, 6, 6]))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["lsh_planes", "pack_bits", "reference_conv_pool", "reference_reuse_conv2d", "reference_weight_grad"]


def lsh_planes(L: int, H: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H random hyperplanes in R^L, as an (L, H) matrix, fixed by ``seed``."""
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    return torch.randn(L, H, generator=gen, dtype=torch.float64).to(dtype)


def _length(rows: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean length (keepdim), in float64 and cast back where the rows' dtype
    overflows the sum of squares (entries above about 1e19 in float32)."""
    n = rows.norm(dim=1, keepdim=True)
    if rows.dtype != torch.float64 and not bool(torch.isfinite(n).all()):
        n = rows.double().norm(dim=1, keepdim=True).to(rows.dtype)
    return n


def pack_bits(proj: torch.Tensor) -> torch.Tensor:
    """Eq. 4 for each of the last dim's H projections, packed into an int64 id: bit k is
    ``proj[..., k] > 0``. H <= 62 keeps ids non-negative."""
    H = proj.shape[-1]
    weights = torch.ones(H, dtype=torch.int64, device=proj.device) << torch.arange(H, device=proj.device)
    return ((proj > 0).to(torch.int64) * weights).sum(-1)


def reference_reuse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride=(1, 1),
    padding=(0, 0, 0, 0),
    dilation=(1, 1),
    L: int,
    planes: torch.Tensor,
    scope: str = "batch",
    ids: torch.Tensor | None = None,
    centroid: str = "mean",
    norm_grad: bool = True,
):
    """Reuse convolution by the paper's equations. ``padding`` is (top, bottom, left, right).

    ``centroid="mean"`` is the paper's: a member's output is its cluster's mean times W_b.
    ``centroid="norm"`` keeps each member's length: the output is ||x_n|| times the output of
    the unit vector along the cluster's mean (exact for collinear members); ``norm_grad=False``
    makes ||x_n|| a constant of the backward (``ReuseConfig.norm_grad``).

    Returns ``(y, info)`` with ``info`` holding ``ids`` (nb, Nb, Oh, Ow), and per block the
    sorted unique ids, inverse, counts and centroids. Pass ``ids`` to impose a cluster
    assignment (for comparing implementations on the same clusters).
    """
    Nb, C, _, _ = x.shape
    M, _, kh, kw = weight.shape
    t, b_, left, r = padding
    xpad = F.pad(x, (left, r, t, b_))
    Hp, Wp = xpad.shape[-2:]
    Oh = (Hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Ow = (Wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    N, K = Nb * Oh * Ow, C * kh * kw
    nb = math.ceil(K / L)
    # F.unfold's rows are (c, kh, kw); the paper's are (kh, kw, c), channel fastest.
    cols = F.unfold(xpad, (kh, kw), dilation=dilation, stride=stride)
    x_mat = cols.view(Nb, C, kh * kw, Oh * Ow).permute(0, 3, 2, 1).reshape(N, K)
    x_mat = F.pad(x_mat, (0, nb * L - K))
    W = F.pad(weight.permute(0, 2, 3, 1).reshape(M, K), (0, nb * L - K)).t()  # (nb*L, M)
    if ids is None:
        ids = torch.stack([pack_bits(x_mat[:, b * L : (b + 1) * L] @ planes.to(x.dtype)) for b in range(nb)])
    else:
        ids = ids.reshape(nb, N)
    image = torch.arange(Nb).repeat_interleave(Oh * Ow)
    y = x.new_zeros(N, M)
    info = {"ids": ids.view(nb, Nb, Oh, Ow), "keys": [], "inverse": [], "counts": [], "centroids": []}
    for b in range(nb):
        sub = x_mat[:, b * L : (b + 1) * L]
        key = torch.stack([image, ids[b]], 1) if scope == "input" else ids[b][:, None]
        uniq, inv, cnt = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
        mean = sub.new_zeros(len(uniq), L).index_add(0, inv, sub) / cnt[:, None].to(x.dtype)
        if centroid == "norm":
            unit = mean / _length(mean).clamp_min(1e-12)
            scale = _length(sub)
            y = y + (scale if norm_grad else scale.detach()) * (unit @ W[b * L : (b + 1) * L])[inv]
        else:
            y_c = mean @ W[b * L : (b + 1) * L]  # y_c,b = x_c,b . W_b
            y = y + y_c[inv]  # y = sum_b y_c,b[inverse_b]
        centroid_b = mean
        info["keys"].append(uniq[:, -1])
        info["inverse"].append(inv)
        info["counts"].append(cnt)
        info["centroids"].append(centroid_b)
    if bias is not None:
        y = y + bias
    return y.view(Nb, Oh, Ow, M).permute(0, 3, 1, 2), info


def reference_weight_grad(x, dy, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """The exact convolution's weight and bias gradients from the im2col matrix, written
    plainly: dW = dy^T . X over all N rows (Eq. 10 with every row its own cluster), db = the
    column sums of dy. The oracle of the zero-skipping weight gradient (``reuse.zero_skip_conv2d``)."""
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (Nb, K, L)
    g = dy.flatten(2)  # (Nb, M, L)
    dw = torch.einsum("bml,bkl->mk", g, cols).reshape(dy.shape[1], x.shape[1], *kernel_size)
    return dw, dy.sum((0, 2, 3))


def reference_conv_pool(x, weight, bias, padding, pool, relu=True):
    """A first block, ``F.conv2d`` (stride 1) -> ``F.max_pool2d(k, s, p)`` (-> ``F.relu``),
    written with stock ops: (out, idx), idx (Nb, Ph, Pw, M) uint8 the position of each pooled
    value's maximum in its k x k window (row-major, from the unclipped window's corner), 255
    where the ReLU passes no gradient. The oracle of ``reuse.conv_pool``."""
    k, s, p = pool
    y = F.conv2d(x, weight, bias, 1, list(padding))
    out, flat = F.max_pool2d(y, k, s, p, return_indices=True)  # flat: index into (Oh, Ow)
    Ow = y.shape[3]
    Ph, Pw = out.shape[2:]
    h0 = (torch.arange(Ph) * s - p).view(Ph, 1)
    w0 = (torch.arange(Pw) * s - p).view(1, Pw)
    local = (flat // Ow - h0) * k + (flat % Ow - w0)
    if relu:
        local = torch.where(out > 0, local, 255)
        out = F.relu(out)
    return out, local.permute(0, 2, 3, 1).to(torch.uint8).contiguous()
