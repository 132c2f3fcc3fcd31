"""ONNX export of a compiled module: ``export_onnx(gm, x, "model.onnx")``.

The ``"reuse"`` variant exports the rewritten graph at each layer's current stage: every
``reuse`` op is lowered to standard ONNX (opset 18) by plain functions over
``onnxscript.opset18`` handed to ``torch.onnx.export(dynamo=True, custom_translation_table=...)``,
so the hashing (with the module's own hash planes), the per-sub-matrix clustering, the
centroid GEMM and the reconstruction run inside onnxruntime, for any batch size. The
``"exact"`` variant exports the traced source graph with the original convolutions.

Lowering, op by op (the batch Nb is the only dynamic input dim; Hp, Wp, C, L, H and M are
read from static shapes at export time; Cmax is computed at run time). ``docs/onnx.md``
has the details and the traps.

- ``im2col``: ``Pad`` + ``Transpose`` to channels-last.
- ``lsh_hash``: bit k is ``MatMul(sub-vector, planes)[k] > 0``; the bits are packed into
  int64 ids by a float ``MatMul`` with the powers of two (24 bits per column, combined in
  int64). L = K: one ``Conv`` with the H planes as filters. L dividing C: every pixel chunk
  is hashed once and the ids are gathered per kernel tap. Other L: the im2col rows
  from one ``Gather`` of the windows' pixels.
- ``cluster``: ranks of the ids per block, in ascending id order: a counting table
  (``ScatterElements`` add over block * 2**H + id, ``CumSum``) when H <= 20, else ``Unique``
  over offset keys (scope "input": (block * Nb + image) * 2**H + id), or over key columns
  (``Unique(axis=0)``) when those do not fit in int64. Centroid sums: ``ScatterElements``
  add over the im2col rows; for chunk blocks in scope "batch", the batch is summed per
  (pixel key, pixel) and two ``MatMul`` ops with 0/1 matrices give every tap's window sum.
- ``centroid_gemm``: the weight blocks (constant-folded) and a batched ``MatMul``.
- ``reconstruct``: ``Gather`` of the slots' outputs, ``ReduceSum`` over the blocks, bias,
  ``Transpose`` back to (Nb, M, Oh, Ow).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from reuse_compiler.passes.conv_rewrite import rewritten_graph, state_path
from reuse_compiler.runtime.geometry import Geometry

__all__ = [
    "export_onnx",
    "export_module",
    "ort_session",
    "ort_providers",
    "onnx_translation_table",
    "OnnxExport",
    "OnnxExportError",
    "VARIANTS",
]

VARIANTS = ("reuse", "exact")
INSTALL_HINT = "pip install 'reuse-compiler[onnx]' (CPU) or 'reuse-compiler[onnx-gpu]' (CUDA; never both)"


class OnnxExportError(RuntimeError):
    """The module cannot be exported as asked; the message says why and what to do."""


def _require(*names: str):
    """Import the optional ONNX packages, with a clear error naming the missing one."""
    mods = []
    for name in names:
        try:
            mods.append(__import__(name))
        except ImportError as e:
            extra = " (export_onnx(..., check=False) exports without it)" if name == "onnxruntime" else ""
            raise ImportError(
                f"reuse_compiler ONNX export needs the '{name}' package, which is not installed: {INSTALL_HINT}{extra}"
            ) from e
    return mods


# --------------------------------------------------------------------------- translations


def onnx_translation_table() -> dict:
    """``{torch.ops.reuse.<op>.default: translation}`` for ``torch.onnx.export``'s
    ``custom_translation_table``: plain functions over ``onnxscript.opset18``."""
    (onnx,) = _require("onnx")
    _require("onnxscript")
    from onnx import numpy_helper
    from onnxscript import opset18 as op

    INT64 = onnx.TensorProto.INT64

    def const(array, dtype=np.int64):
        return op.Constant(value=numpy_helper.from_array(np.asarray(array, dtype=dtype)))

    def static(dim, what: str) -> int:
        if not isinstance(dim, int):
            raise OnnxExportError(f"{what} must be static at export time (only the batch is dynamic); got {dim!r}")
        return dim

    def geometry(xp, kernel_size, stride, dilation, L: int) -> Geometry:
        _, Hp, Wp, C = xp.shape
        dims = (static(Hp, "the padded height"), static(Wp, "the padded width"), static(C, "the channel count"))
        return Geometry(0, *dims, *map(int, kernel_size), *map(int, stride), *map(int, dilation), int(L))

    def pixel_index(g: Geometry) -> np.ndarray:
        """(Oh*Ow, kh*kw): flat pixel (row-major in Hp x Wp) that tap t of output position n reads."""
        oh, ow = g.out_hw
        rows = np.arange(oh)[:, None, None, None] * g.sh + np.arange(g.kh)[None, None, :, None] * g.dh
        cols = np.arange(ow)[None, :, None, None] * g.sw + np.arange(g.kw)[None, None, None, :] * g.dw
        return (rows * g.Wp + cols).reshape(oh * ow, g.kh * g.kw)

    def im2col_rows(xp, g: Geometry):
        """The paper's im2col matrix, (Nb, Oh*Ow, nb, L): one Gather of each window's pixels
        (channels fastest), the last block zero-padded."""
        oh, ow = g.out_hw
        win = op.Gather(op.Reshape(xp, [-1, g.Hp * g.Wp, g.C]), const(pixel_index(g)), axis=1)
        rows = op.Reshape(win, [-1, oh * ow, g.K])
        pad = g.nb * g.L - g.K
        if pad:
            rows = op.Pad(rows, [0, 0, 0, 0, 0, pad])
        return op.Reshape(rows, [-1, oh * ow, g.nb, g.L])

    def pack_bits(proj, H: int):
        """Eq. 4: bit k = proj[..., k] > 0, packed into int64 ids. The 0/1 bits go through a
        float32 MatMul with the powers of two, 24 bits per column (exact), and the columns are
        combined in int64 with Mul/Add. Not ReduceSum: onnxruntime's int64 ReduceSum rounds
        above 2**53; not BitShift: ONNX defines it for unsigned types only."""
        bits = op.Cast(op.Greater(proj, op.CastLike(0.0, proj)), to=onnx.TensorProto.FLOAT)
        parts = -(-H // 24)
        powers = np.zeros((H, parts), np.float32)
        for k in range(H):
            powers[k, k // 24] = float(1 << (k % 24))
        packed = op.Cast(op.MatMul(bits, const(powers, np.float32)), to=INT64)  # (..., parts); (H, 1) is fast
        ids = op.Squeeze(op.Slice(packed, const([0]), const([1]), const([-1])), [-1])
        for j in range(1, parts):
            part = op.Squeeze(op.Slice(packed, const([j]), const([j + 1]), const([-1])), [-1])
            ids = op.Add(ids, op.Mul(part, const(1 << (24 * j))))
        return ids

    def im2col(x, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int]):
        t, b, left, r = (int(p) for p in padding)
        if t or b or left or r:
            x = op.Pad(x, [0, 0, t, left, 0, 0, b, r])
        return op.Transpose(x, perm=[0, 2, 3, 1])

    def lsh_hash(xp, planes, kernel_size: list[int], stride: list[int], dilation: list[int]):
        L, H = (static(d, "the hash planes' shape") for d in planes.shape)
        g = geometry(xp, kernel_size, stride, dilation, L)
        oh, ow = g.out_hw
        planes = op.CastLike(planes, xp)
        if g.kind == "window":  # one block: a convolution with the H planes as filters
            filters = op.Transpose(op.Reshape(planes, [g.kh, g.kw, g.C, H]), perm=[3, 2, 0, 1])
            proj = op.Conv(
                op.Transpose(xp, perm=[0, 3, 1, 2]),
                filters,
                kernel_shape=[g.kh, g.kw],
                strides=[g.sh, g.sw],
                dilations=[g.dh, g.dw],
            )
            return op.Unsqueeze(pack_bits(op.Transpose(proj, perm=[0, 2, 3, 1]), H), [0])
        if g.kind == "chunk":  # a sub-vector is one pixel's channel chunk: hash every chunk once
            nq = g.C // g.L
            unit = pack_bits(op.MatMul(op.Reshape(xp, [-1, g.Hp * g.Wp, nq, g.L]), planes), H)  # (Nb, P, nq)
            ids = op.Gather(unit, const(pixel_index(g)), axis=1)  # (Nb, Oh*Ow, T, nq)
            return op.Reshape(op.Transpose(ids, perm=[2, 3, 0, 1]), [g.nb, -1, oh, ow])
        ids = pack_bits(op.MatMul(im2col_rows(xp, g), planes), H)  # (Nb, Oh*Ow, nb)
        return op.Reshape(op.Transpose(ids, perm=[2, 0, 1]), [g.nb, -1, oh, ow])

    def dense_rank(ids, nb: int, H: int):
        """unique_rank for scope "batch" with few possible ids (as the torch kernel): count every
        id of every block in an (nb, 2**H) table, rank the occupied entries with a CumSum."""
        int0 = numpy_helper.from_array(np.zeros(1, np.int64))
        key = op.Reshape(op.Add(op.Reshape(ids, [nb, -1]), const(np.arange(nb).reshape(nb, 1) << H)), [-1])
        table = op.ConstantOfShape(op.Constant(value_ints=[nb << H]), value=int0)
        ones = op.Expand(op.Constant(value_int=1), op.Shape(key))
        present = op.ScatterElements(table, key, ones, axis=0, reduction="add")  # (nb * 2**H,) members per id
        occupied = op.Cast(op.Greater(op.Reshape(present, [nb, 1 << H]), const(0)), to=INT64)
        rank = op.Sub(op.CumSum(occupied, op.Constant(value_int=1)), const(1))  # (nb, 2**H)
        cmax = op.ReduceMax(op.ReduceSum(occupied, [1], keepdims=0), keepdims=1)  # (1,), the data-dependent Cmax
        # allowzero: an empty batch gives a 0 in Shape(ids), which must stay 0 (not "copy the dim")
        inverse = op.Reshape(op.Gather(op.Reshape(rank, [-1]), key), op.Shape(ids), allowzero=1)
        # counts[b, rank] = present for occupied ids; the empty ones write 0 to a spare last slot
        spare = op.Mul(cmax, const([nb]))
        slot = op.Add(rank, op.Mul(const(np.arange(nb).reshape(nb, 1)), cmax))
        slot = op.Reshape(op.Where(op.Cast(occupied, to=onnx.TensorProto.BOOL), slot, spare), [-1])
        counts = op.ScatterElements(op.ConstantOfShape(op.Add(spare, const([1])), value=int0), slot, present, axis=0)
        counts = op.Reshape(op.Slice(counts, const([0]), spare), [nb, -1])
        return inverse, counts, cmax

    def unique_rank(ids, H: int, scope: str):
        """Per block b, the ascending rank of each row's key among the keys present in the
        block; returns (rank per row (nb, N), counts (nb, Cmax) int64, Cmax (1,))."""
        nb = static(ids.shape[0], "the number of sub-matrices")
        blocks = const(np.arange(nb).reshape(nb, 1, 1, 1))
        nbits = max(nb - 1, 1).bit_length()
        if scope != "input" and H <= 20 and nb << H <= 1 << 22:
            return dense_rank(ids, nb, H)
        if scope == "input":
            batch = op.Shape(ids, start=1, end=2)
            image = op.Reshape(
                op.Range(op.Constant(value_int=0), op.Squeeze(batch), op.Constant(value_int=1)), [1, -1, 1, 1]
            )
            group = op.Add(op.Mul(blocks, batch), image)  # (nb, Nb, 1, 1): b * Nb + image
            per_block = op.Mul(batch, const([1 << H])) if H + nbits + 32 <= 63 else None
            parts = [blocks, image]
        else:
            group = blocks
            per_block = const([1 << H]) if H + nbits <= 63 else None
            parts = [blocks]
        if per_block is not None:  # one int64 key: group * 2**H + id
            key = op.Add(op.Mul(group, const([1 << H])), ids)
            uk, _first, inv, cnt = op.Unique(op.Reshape(key, [-1]), sorted=1)
            # the key's block (keys are >= 0, so Div floors); per_block is 0 for an empty batch
            # in scope "input" (then uk is empty too), and onnxruntime's integer Div refuses 0
            row = op.Div(uk, op.Max(per_block, const([1])))
        else:  # too wide for one int64: Unique over (block[, image], id) rows, sorted lexicographically
            full = op.Shape(ids)
            cols = [op.Unsqueeze(op.Reshape(op.Expand(p, full), [-1]), [1]) for p in parts]
            cols.append(op.Unsqueeze(op.Reshape(ids, [-1]), [1]))
            uk, _first, inv, cnt = op.Unique(op.Concat(*cols, axis=1), axis=0, sorted=1)
            row = op.Reshape(op.Gather(uk, op.Constant(value_ints=[0]), axis=1), [-1])
        zeros_nb = op.ConstantOfShape(
            op.Constant(value_ints=[nb]), value=numpy_helper.from_array(np.zeros(1, np.int64))
        )
        ones = op.Expand(op.Constant(value_int=1), op.Shape(row))
        per_row = op.ScatterElements(zeros_nb, row, ones, axis=0, reduction="add")  # clusters per block
        cmax = op.ReduceMax(per_row, keepdims=1)  # (1,), the data-dependent Cmax
        start = op.Sub(op.CumSum(per_row, op.Constant(value_int=0)), per_row)  # exclusive prefix sum
        rank = op.Sub(op.Range(op.Constant(value_int=0), op.Size(row), op.Constant(value_int=1)), op.Gather(start, row))
        slot = op.Add(op.Mul(row, cmax), rank)  # unique per key, so the scatter below needs no reduction
        zeros = op.ConstantOfShape(op.Mul(cmax, const([nb])), value=numpy_helper.from_array(np.zeros(1, np.int64)))
        counts = op.Reshape(op.ScatterElements(zeros, slot, cnt, axis=0), [nb, -1])
        return op.Reshape(op.Gather(rank, inv), op.Shape(ids), allowzero=1), counts, cmax

    def row_sums(xp, inverse, cmax, g: Geometry):
        """Per slot, the sum of its members' sub-vectors, (nb * Cmax, L): a segment sum over
        the N x (nb * L) im2col matrix. ScatterElements(add) on flat element indices is
        race-free in onnxruntime (ScatterND(add) is not) and twice as fast as the 2-D form."""
        rows = op.Reshape(im2col_rows(xp, g), [-1])  # (N * nb * L,), rows in (n, b) order
        offsets = op.Mul(const(np.arange(g.nb).reshape(g.nb, 1)), cmax)
        slots = op.Transpose(op.Add(op.Reshape(inverse, [g.nb, -1]), offsets), perm=[1, 0])  # (N, nb)
        index = op.Reshape(op.Add(op.Mul(op.Unsqueeze(slots, [2]), const([g.L])), const(np.arange(g.L))), [-1])
        zeros = op.CastLike(op.ConstantOfShape(op.Mul(cmax, const([g.nb * g.L]))), rows)
        return op.Reshape(op.ScatterElements(zeros, index, rows, axis=0, reduction="add"), [-1, g.L])

    def pixel_sums_fit(g: Geometry, H: int, scope: str) -> bool:
        """Whether :func:`pixel_sums` applies: chunk blocks, scope "batch", and its
        (keys x pixels x L) table stays below 2**25 elements for any input (keys <= nq * 2**H)."""
        nq = g.C // g.L if g.kind == "chunk" else 0
        return bool(nq) and scope != "input" and H + nq.bit_length() <= 62 and nq * g.Hp * g.Wp * g.L << H <= 1 << 25

    def box_matrix(size: int, out: int, stride: int, k: int, dilation: int) -> np.ndarray:
        """(k, size) 0/1: row i selects the positions i * dilation + a * stride, a < out, that
        tap i reads along one axis."""
        m = np.zeros((k, size), np.float32)
        for i in range(k):
            m[i, i * dilation + np.arange(out) * stride] = 1.0
        return m

    def pixel_sums(xp, ids, inverse, counts, cmax, g: Geometry, H: int):
        """:func:`row_sums` for chunk blocks (L divides C) in scope "batch", without the N x K
        matrix. Block b = (tap t, chunk q) of row n is chunk q of the pixel that tap t reads,
        and its id is that pixel's, so the block's cluster sums are sums over the pixels in
        tap t's window grouped by the pixel's key (q, id). The batch is summed per (key,
        pixel) once (a scatter of Nb * Hp * Wp * C elements instead of N * K), then two
        MatMuls with 0/1 matrices (width, then height) give every tap's window sum."""
        nq, T, P = g.C // g.L, g.kh * g.kw, g.Hp * g.Wp
        oh, ow = g.out_hw
        int0 = numpy_helper.from_array(np.zeros(1, np.int64))
        # the flat (image, pixel, chunk) that block b = t * nq + q of each row reads, in ids' order
        where = (pixel_index(g).T[:, None, :] * nq + np.arange(nq)[None, :, None]).reshape(g.nb, 1, oh * ow)
        batch = op.Shape(ids, start=1, end=2)
        image = op.Range(op.Constant(value_int=0), op.Squeeze(batch), op.Constant(value_int=1))
        target = op.Reshape(op.Add(op.Mul(op.Reshape(image, [1, -1, 1]), const([P * nq])), const(where)), [-1])
        # every pixel's id (pixels no tap reads keep 0; they lie in no window)
        npix = op.ConstantOfShape(op.Mul(batch, const([P * nq])), value=int0)
        pixel_ids = op.ScatterElements(npix, target, op.Reshape(ids, [-1]), axis=0)  # duplicates agree
        key = op.Add(op.Reshape(pixel_ids, [-1, P, nq]), const(np.arange(nq) << H))
        _keys, _first, kidx, _cnt = op.Unique(op.Reshape(key, [-1]), sorted=1)  # kidx: key index per pixel
        # table[k, p, :] = sum over the batch of the chunks at pixel p whose key is k
        position = np.arange(P).reshape(1, P, 1, 1) * g.L + np.arange(g.L).reshape(1, 1, 1, g.L)
        index = op.Add(op.Mul(op.Reshape(kidx, [-1, P, nq, 1]), const([P * g.L])), const(position))
        zeros = op.CastLike(op.ConstantOfShape(op.Mul(op.Shape(_keys), const([P * g.L]))), xp)
        table = op.ScatterElements(zeros, op.Reshape(index, [-1]), op.Reshape(xp, [-1]), axis=0, reduction="add")
        # the window sums as two MatMuls with 0/1 matrices: along the width, then along the height
        box_w = const(box_matrix(g.Wp, ow, g.sw, g.kw, g.dw), np.float32)
        box_h = const(box_matrix(g.Hp, oh, g.sh, g.kh, g.dh), np.float32)
        window = op.MatMul(op.CastLike(box_w, xp), op.Reshape(table, [-1, g.Wp, g.L]))  # (keys * Hp, kw, L)
        window = op.MatMul(op.CastLike(box_h, xp), op.Reshape(window, [-1, g.Hp, g.kw * g.L]))  # (keys, kh, kw * L)
        window = op.Reshape(window, [-1, g.L])  # (keys * T, L), taps row-major
        # each slot's key index: scatter every member's (all members of a slot share it)
        offsets = op.Mul(const(np.arange(g.nb).reshape(g.nb, 1)), cmax)
        slots = op.Reshape(op.Add(op.Reshape(inverse, [g.nb, -1]), offsets), [-1])
        slot_key = op.ScatterElements(
            op.ConstantOfShape(op.Mul(cmax, const([g.nb])), value=int0), slots, op.Gather(kidx, target), axis=0
        )
        taps = const((np.arange(g.nb) // nq).reshape(g.nb, 1))
        pick = op.Reshape(op.Add(op.Mul(op.Reshape(slot_key, [g.nb, -1]), const([T])), taps), [-1])
        used = op.CastLike(op.Greater(op.Reshape(counts, [-1, 1]), const([0])), xp)  # padding slots: 0
        return op.Mul(op.Gather(window, pick, axis=0), used)

    def cluster(
        xp,
        ids,
        kernel_size: list[int],
        stride: list[int],
        dilation: list[int],
        L: int,
        H: int,
        scope: str,
        x=None,  # the unpadded input: only the backward uses it
        padding: list[int] | None = None,
    ):
        g = geometry(xp, kernel_size, stride, dilation, L)
        H = int(H)
        inverse, counts, cmax = unique_rank(ids, H, scope)
        if pixel_sums_fit(g, H, scope):
            sums = pixel_sums(xp, ids, inverse, counts, cmax, g, H)
        else:
            sums = row_sums(xp, inverse, cmax, g)
        size = op.Max(op.CastLike(op.Reshape(counts, [-1, 1]), sums), op.CastLike(1.0, sums))
        centroids = op.Reshape(op.Div(sums, size), [g.nb, -1, g.L])
        return centroids, op.Cast(inverse, to=onnx.TensorProto.INT32), counts

    def centroid_gemm(centroids, weight):
        M, C, kh, kw = (static(d, "the weight's shape") for d in weight.shape)
        nb, L = static(centroids.shape[0], "nb"), static(centroids.shape[2], "L")
        K = C * kh * kw
        w = op.Reshape(op.Transpose(weight, perm=[0, 2, 3, 1]), [M, K])
        if nb * L > K:
            w = op.Pad(w, [0, 0, 0, nb * L - K])
        wb = op.Transpose(op.Reshape(w, [M, nb, L]), perm=[1, 2, 0])  # (nb, L, M)
        return op.MatMul(centroids, op.CastLike(wb, centroids))

    def reconstruct(yc, inverse, bias, scales=None):
        nb = static(inverse.shape[0], "nb")
        M = static(yc.shape[2], "M")
        inverse = op.Cast(inverse, to=INT64)  # the slot index is int32 in PyTorch
        cmax = op.Shape(yc, start=1, end=2)
        slots = op.Add(inverse, op.Mul(const(np.arange(nb).reshape(nb, 1, 1, 1)), cmax))
        y = op.Gather(op.Reshape(yc, [-1, M]), slots, axis=0)  # (nb, Nb, Oh, Ow, M)
        if scales is not None:  # norm-preserving centroid: each member's own norm
            y = op.Mul(y, op.Unsqueeze(op.CastLike(scales, y), [4]))
        y = op.ReduceSum(y, [0], keepdims=0) if nb > 1 else op.Squeeze(y, [0])
        if bias is not None:
            y = op.Add(y, op.CastLike(bias, y))
        return op.Transpose(y, perm=[0, 3, 1, 2])

    def member_norms(
        xp,
        kernel_size: list[int],
        stride: list[int],
        dilation: list[int],
        L: int,
        x=None,  # the unpadded input: only the backward uses it
        padding: list[int] | None = None,
    ):
        g = geometry(xp, kernel_size, stride, dilation, L)
        oh, ow = g.out_hw
        rows = im2col_rows(xp, g)  # (Nb, Oh*Ow, nb, L), zero-padded last block
        norms = op.Sqrt(op.ReduceSum(op.Mul(rows, rows), [3], keepdims=0))  # (Nb, Oh*Ow, nb)
        return op.Reshape(op.Transpose(norms, perm=[2, 0, 1]), [g.nb, -1, oh, ow])

    def cluster_norms(
        xp,
        ids,
        kernel_size: list[int],
        stride: list[int],
        dilation: list[int],
        L: int,
        H: int,
        scope: str,
        x=None,  # the unpadded input: only the backward uses it
        padding: list[int] | None = None,
    ):
        centroids, inverse, counts = cluster(xp, ids, kernel_size, stride, dilation, L, H, scope)
        return centroids, inverse, counts, member_norms(xp, kernel_size, stride, dilation, L)

    def unit_rows(c):
        denom = op.Max(op.ReduceL2(c, [-1], keepdims=1), op.CastLike(1e-12, c))
        return op.Div(c, denom)

    ops = torch.ops.reuse
    return {
        ops.unit_rows.default: unit_rows,
        ops.im2col.default: im2col,
        ops.lsh_hash.default: lsh_hash,
        ops.cluster.default: cluster,
        ops.cluster_norms.default: cluster_norms,
        ops.centroid_gemm.default: centroid_gemm,
        ops.reconstruct.default: reconstruct,
        ops.member_norms.default: member_norms,
    }


# --------------------------------------------------------------------------- export


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote. ``max_abs_diff`` and ``scale`` (None with
    ``check=False``): max |onnxruntime (CPU) - module| and max |module| on the example input."""

    path: str
    variant: str
    opset: int
    input_name: str
    output_names: list[str]
    max_abs_diff: float | None = None
    scale: float | None = None

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def _plan(gm):
    plan = getattr(gm, "reuse_plan", None)
    if plan is None or not hasattr(gm, "_reuse_source"):
        raise TypeError(f"export_onnx: expected a module returned by reuse_compile, got {type(gm).__name__}")
    return plan


def export_module(gm: fx.GraphModule, variant: str = "reuse") -> fx.GraphModule:
    """The module :func:`export_onnx` exports: for ``"reuse"`` the rewritten graph at the
    current stages without the measurement calls, for ``"exact"`` the traced source graph
    (original convolutions). It shares ``gm``'s parameters and buffers (hash planes too).
    Raises :class:`OnnxExportError` for ``"reuse"`` if a layer has across-batch cluster reuse."""
    plan = _plan(gm)
    if variant not in VARIANTS:
        raise ValueError(f"export_onnx: variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "exact":
        return fx.GraphModule(gm, copy.deepcopy(gm._reuse_source), "ExactExport")
    stateful = [r.name for r in plan.rows() if r.rewritable and not r.exact and r.cluster_reuse]
    if stateful:
        calls = "; ".join(f"reuse_compiler.set_stage(gm, {n!r}, cluster_reuse=False)" for n in stateful)
        raise OnnxExportError(
            f"export_onnx: layer(s) {stateful} use across-batch cluster reuse, a store of cluster outputs "
            f"kept between batches that an ONNX graph cannot hold. Call {calls} first, or export variant='exact'."
        )
    return fx.GraphModule(gm, rewritten_graph(gm, record=False), "ReuseExport")


def _has_run(gm) -> bool:
    """Whether every rewritten layer has recorded a forward (its stage is then in use)."""
    for row in _plan(gm).rows():
        if row.rewritable and not row.exact and not gm.get_submodule(state_path(row.name)).last_counts:
            return False
    return True


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _missing_op(err: BaseException) -> str | None:
    """The op named by the exporter's 'No ONNX function found for ...' anywhere in the cause chain."""
    seen, c = set(), err
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        m = re.search(r"No ONNX function found for (<OpOverload\(op='([^']+)', overload='([^']+)'\)>|\S+)", str(c))
        if m:
            return f"{m.group(2)}.{m.group(3)}" if m.group(2) else m.group(1).rstrip(".")
        c = c.__cause__ or c.__context__
    return None


class _Positional(torch.nn.Module):
    """One positional input named ``x`` for the exported program."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def _export(
    module: torch.nn.Module,
    example_input: torch.Tensor,
    path: str,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    optimize: bool = True,
    table: dict | None = None,
    output_names: list[str] | None = None,
) -> None:
    """torch.export ``module`` (eval mode, one input ``x``, dynamic batch), refuse ``reuse``
    ops without a translation, write ``path`` with the translations (one file).

    With a dynamic batch, a batch-1 example is traced as that image repeated twice:
    torch.export specialises every size-1 dim to the constant 1, which clashes with
    ``Dim("batch")``. Only the trace sees the repeat; the file's batch axis stays symbolic."""
    table = onnx_translation_table() if table is None else table
    if dynamic_batch and example_input.shape[0] == 1:
        example_input = example_input.repeat(2, *([1] * (example_input.dim() - 1)))
    dyn = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping torchvision::nms"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.ExitStack() as restore:
        restore.callback(quiet.setLevel, level)
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(_Positional(module), (example_input,), dynamic_shapes=dyn, strict=False)
        except Exception as e:
            raise OnnxExportError(f"export_onnx: torch.export failed: {type(e).__name__}: {e}") from e
        missing = sorted(
            {
                f"{n.target.namespace}.{n.target._opname}.{n.target._overloadname}"
                for n in ep.graph.nodes
                if n.op == "call_function"
                and isinstance(n.target, torch._ops.OpOverload)
                and n.target.namespace == "reuse"
                and n.target not in table
            }
        )
        if missing:
            raise OnnxExportError(
                f"export_onnx: no ONNX translation for {', '.join(missing)}; keep the layers that use it exact "
                f"(reuse_compiler.set_stage(gm, layer, exact=True)) or export variant='exact'"
            )
        try:
            # dynamic_shapes again only names the input's axis 'batch' (the program is not re-exported)
            torch.onnx.export(
                ep,
                (example_input,),
                path,
                dynamo=True,
                custom_translation_table=table,
                dynamic_shapes=dyn,
                input_names=["x"],
                output_names=output_names,
                opset_version=opset,
                external_data=False,
                optimize=optimize,
                verbose=False,
            )
        except torch.onnx.OnnxExporterError as e:
            name = _missing_op(e)
            if name is None:
                raise
            raise OnnxExportError(
                f"export_onnx: the graph calls {name}, which has no ONNX translation: pass one as "
                f"export_onnx(..., translations={{<the op's OpOverload>: fn}}) (a function over onnxscript.opset18 "
                f"ops, see docs/onnx.md), or change the model to use ops the exporter knows"
            ) from e


def export_onnx(
    gm: fx.GraphModule,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    variant: str = "reuse",
    opset: int = 18,
    check: bool = True,
    dynamic_batch: bool = True,
    optimize: bool = True,
    translations: dict | None = None,
) -> OnnxExport:
    """Export a module returned by :func:`reuse_compile` to one ONNX file.

    Args:
        gm: the compiled module. If it has not run yet, one forward on ``example_input``
            (eval mode, no grad) runs first, so the exported stage is the one in use.
        example_input: one float32 (N, C, H, W) batch, N >= 1. C, H and W are fixed in the
            model; the batch stays dynamic unless ``dynamic_batch=False`` (the file then takes
            N images only). N = 1 is traced as two copies of the image; the file does not
            depend on it, and the parity check runs on ``example_input`` itself.
        path: the ``.onnx`` file to write (weights and hash planes inside).
        variant: ``"reuse"``: hashing, clustering, centroid GEMM and reconstruction as ONNX
            ops at each layer's current stage, with the module's hash planes; ``"exact"``:
            the original convolutions.
        opset: ONNX opset, >= 18.
        check: run ``onnx.checker`` (full) and compare onnxruntime (CPU) with the module on
            ``example_input`` (the result's ``max_abs_diff``); needs onnxruntime.
        optimize: run the exporter's graph optimizer (constant folding; slower export).
        translations: extra ``{OpOverload: function}`` entries for ops of your own model,
            written like the ones in :func:`onnx_translation_table`.

    Returns an :class:`OnnxExport` (``os.fspath(result)`` is the path). Raises
    :class:`OnnxExportError` for a layer with across-batch cluster reuse or an op without
    an ONNX translation, and ``ImportError`` naming the package (and the extra to install)
    when onnx, onnxscript or, with ``check``, onnxruntime is missing.
    """
    onnx, _ = _require("onnx", "onnxscript")
    if check:
        _require("onnxruntime")
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"export_onnx: opset must be an int >= 18 (ScatterElements reduction), got {opset!r}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise TypeError("export_onnx: example_input must be one (N, C, H, W) tensor")
    if example_input.dtype != torch.float32:
        raise TypeError(f"export_onnx: only float32 models export, got an input of dtype {example_input.dtype}")
    if example_input.shape[0] == 0:
        raise ValueError("export_onnx: example_input must hold at least one image (the exported model takes any batch)")
    module = export_module(gm, variant)
    path = os.fspath(path)
    with _eval_mode(gm), torch.no_grad():
        if not _has_run(gm):
            gm(example_input)
        outputs = torch.utils._pytree.tree_leaves(module(example_input))
        names = ["y"] if len(outputs) == 1 else [f"y{i}" for i in range(len(outputs))]
        table = {**onnx_translation_table(), **(translations or {})}
        _export(
            module,
            example_input,
            path,
            opset=opset,
            dynamic_batch=dynamic_batch,
            optimize=optimize,
            table=table,
            output_names=names,
        )
    model = onnx.load(path)
    result = OnnxExport(
        path=path,
        variant=variant,
        opset=model.opset_import[0].version,
        input_name=model.graph.input[0].name,
        output_names=[o.name for o in model.graph.output],
    )
    if check:
        onnx.checker.check_model(model, full_check=True)
        custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        if custom or model.functions:
            raise OnnxExportError(f"export_onnx: {path} holds non-standard ops or functions: {custom}")
        session = ort_session(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {result.input_name: example_input.detach().cpu().numpy()})
        refs = [o.detach().cpu().numpy() for o in outputs]
        result.max_abs_diff = max((float(np.abs(g - r).max()) for g, r in zip(got, refs) if r.size), default=0.0)
        result.scale = max((float(np.abs(r).max()) for r in refs if r.size), default=0.0)
    return result


# --------------------------------------------------------------------------- onnxruntime


def ort_providers(prefer_gpu: bool = True) -> list[str]:
    """Execution providers for an InferenceSession: ``CUDAExecutionProvider`` first when the
    installed onnxruntime has it (the onnxruntime-gpu package), then ``CPUExecutionProvider``.
    Nodes the CUDA provider has no kernel for (e.g. ``Unique``) run on the CPU provider."""
    (ort,) = _require("onnxruntime")
    available = ort.get_available_providers()
    order = ["CUDAExecutionProvider", "CPUExecutionProvider"] if prefer_gpu else ["CPUExecutionProvider"]
    return [p for p in order if p in available]


def ort_session(path, *, providers: list | None = None, threads: int | None = None, options=None):
    """An ``onnxruntime.InferenceSession`` for ``path`` (a file or the model's bytes), on
    :func:`ort_providers` unless ``providers`` is given; ``threads`` sets the intra-op threads."""
    (ort,) = _require("onnxruntime")
    so = options if options is not None else ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    model = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(model, so, providers=providers or ort_providers())
