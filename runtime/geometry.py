"""Geometry of the lazy im2col view.

The rewritten convolution never builds the N x K im2col matrix. Its ``reuse.im2col`` node
returns the zero-padded input in channels-last layout, ``xp`` of shape (Nb, Hp, Wp, C).
Row ``n = (b, oh, ow)`` of the paper's matrix x is the window of ``xp`` anchored at
``(oh * sh, ow * sw)``; its entries are laid out (k_h, k_w, c) with the channel fastest, as
in TensorFlow's im2col, so a row is ``K = kh * kw * C`` long and tap ``t = i * kw + j``
occupies positions ``[t * C, (t + 1) * C)``.

A row is cut into ``nb = ceil(K / L)`` sub-vectors ("blocks") of length L; the last is
zero-padded. This module answers, for a block, which taps and channel ranges it covers
("pieces"), and gives strided views of ``xp`` for one tap, so the ops can read or write a
block for all N rows without materialising x.

>>> g = Geometry.of((1, 6, 6, 4), kernel=(3, 3), stride=(1, 1), dilation=(1, 1), L=6)
>>> g.out_hw, g.K, g.nb, g.kind
((4, 4), 36, 6, 'general')
>>> g.pieces[1]  # flat positions 6..11: tap 1 channels 2..3, then tap 2 channels 0..3
((1, 2, 4, 0), (2, 0, 4, 2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["Geometry", "block_kind", "conv_out_size"]


@lru_cache(maxsize=256)
def _pieces_tensor(kh: int, kw: int, C: int, L: int, dw: int) -> torch.Tensor:
    g = Geometry.of_weight((0, C, kh, kw), L)
    rows = []
    for b, block in enumerate(g.pieces):
        for t, c0, c1, e0 in block:
            if rows and dw == 1:
                pb, pt, pc0, plen, pe0 = rows[-1]
                # previous piece ends its pixel, this one starts the next pixel of the same kernel row
                if pb == b and c0 == 0 and pc0 + plen == (t - pt) * C and t % kw != 0 and pe0 + plen == e0:
                    rows[-1] = (pb, pt, pc0, plen + (c1 - c0), pe0)
                    continue
            rows.append((b, t, c0, c1 - c0, e0))
    return torch.tensor(rows, dtype=torch.int64).view(-1, 5)


@lru_cache(maxsize=256)
def _block_pieces(K: int, C: int, L: int) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
    """:attr:`Geometry.pieces` for a window of ``K`` values, ``C`` per tap, cut into blocks of ``L``."""
    out = []
    for b in range(math.ceil(K / L)):
        lo, hi = b * L, min((b + 1) * L, K)
        k, block = lo, []
        while k < hi:
            t, c0 = divmod(k, C)
            c1 = min(C, c0 + hi - k)
            block.append((t, c0, c1, k - lo))
            k += c1 - c0
        out.append(tuple(block))
    return tuple(out)


def conv_out_size(size: int, k: int, stride: int, dilation: int) -> int:
    """Output length of a convolution over an already padded axis of length ``size``."""
    return (size - dilation * (k - 1) - 1) // stride + 1


def block_kind(kh: int, kw: int, C: int, L: int) -> str:
    """Which fast path a sub-vector length has.

    - ``"window"``: L = K, one block, the whole window (hashed with one convolution).
    - ``"chunk"``: L divides C, a sub-vector is one pixel's channel chunk.
    - ``"row"``: L = m * C with m dividing kw, m > 1: m neighbouring pixels of one kernel row.
    - ``"general"``: anything else (sub-vectors straddle pixels irregularly).
    """
    K = kh * kw * C
    if L == K:
        return "window"
    if C % L == 0:
        return "chunk"
    if L % C == 0 and kw % (L // C) == 0:
        return "row"
    return "general"


@dataclass(frozen=True)
class Geometry:
    """Shapes and index arithmetic of one rewritten convolution (one group)."""

    Nb: int
    Hp: int
    Wp: int
    C: int
    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    L: int

    @staticmethod
    def of_weight(weight_shape, L: int) -> Geometry:
        """The block layout of a weight (M, C, kh, kw) cut into sub-vectors of length L (no
        input: for weight blocks and pieces only)."""
        _, C, kh, kw = (int(s) for s in weight_shape)
        return Geometry(0, kh, kw, C, kh, kw, 1, 1, 1, 1, int(L))

    @staticmethod
    def of(xp_shape, kernel, stride, dilation, L: int) -> Geometry:
        Nb, Hp, Wp, C = (int(s) for s in xp_shape)
        return Geometry(Nb, Hp, Wp, C, *map(int, kernel), *map(int, stride), *map(int, dilation), int(L))

    @property
    def out_hw(self) -> tuple[int, int]:
        return (
            conv_out_size(self.Hp, self.kh, self.sh, self.dh),
            conv_out_size(self.Wp, self.kw, self.sw, self.dw),
        )

    @property
    def N(self) -> int:
        oh, ow = self.out_hw
        return self.Nb * oh * ow

    @property
    def K(self) -> int:
        return self.kh * self.kw * self.C

    @property
    def nb(self) -> int:
        return math.ceil(self.K / self.L)

    @property
    def kind(self) -> str:
        return block_kind(self.kh, self.kw, self.C, self.L)

    @property
    def pieces(self) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
        """Per block, the tuple of ``(tap, c0, c1, e0)``: channels [c0, c1) of tap ``tap``
        sit at positions [e0, e0 + c1 - c0) of the sub-vector. Positions not covered (only
        in the last block) are the zero padding. (Cached per ``(K, C, L)`` by a plain
        ``lru_cache``: a ``cached_property`` takes a lock on Python 3.11, which
        ``torch.compile`` cannot trace, one graph break per layer.)"""
        return _block_pieces(self.K, self.C, self.L)

    def tap_view(self, xp4: torch.Tensor, tap: int, c0: int = 0, c1: int | None = None) -> torch.Tensor:
        """Strided view (Nb, Oh, Ow, c1 - c0) of ``xp4`` (Nb, Hp, Wp, C): for every output
        position, channels [c0, c1) of the pixel that kernel tap ``tap`` reads."""
        i, j = divmod(tap, self.kw)
        oh, ow = self.out_hw
        r0, q0 = i * self.dh, j * self.dw
        return xp4[
            :,
            r0 : r0 + self.sh * (oh - 1) + 1 : self.sh,
            q0 : q0 + self.sw * (ow - 1) + 1 : self.sw,
            c0 : self.C if c1 is None else c1,
        ]

    def gather_block(self, xp4: torch.Tensor, b: int) -> torch.Tensor:
        """Sub-matrix ``b`` of x as an (N, L) tensor (a view when the block is one piece)."""
        pieces = self.pieces[b]
        if len(pieces) == 1 and pieces[0][2] - pieces[0][1] == self.L:
            t, c0, c1, _ = pieces[0]
            return self.tap_view(xp4, t, c0, c1).reshape(self.N, self.L)
        parts = [self.tap_view(xp4, t, c0, c1) for t, c0, c1, _ in pieces]
        covered = sum(c1 - c0 for _, c0, c1, _ in pieces)
        if covered < self.L:
            oh, ow = self.out_hw
            parts.append(xp4.new_zeros(self.Nb, oh, ow, self.L - covered))
        return torch.cat(parts, dim=-1).reshape(self.N, self.L)

    def scatter_block_(self, dxp4: torch.Tensor, b: int, dsub: torch.Tensor) -> None:
        """Adjoint of :meth:`gather_block`: add ``dsub`` (N, L) into ``dxp4`` in place."""
        oh, ow = self.out_hw
        dsub = dsub.reshape(self.Nb, oh, ow, self.L)
        for t, c0, c1, e0 in self.pieces[b]:
            self.tap_view(dxp4, t, c0, c1).add_(dsub[..., e0 : e0 + c1 - c0])

    def vector(self) -> list[int]:
        """The 13 ints the C++ kernels take: Nb, Hp, Wp, C, kh, kw, sh, sw, dh, dw, L, Oh, Ow."""
        return [
            self.Nb,
            self.Hp,
            self.Wp,
            self.C,
            self.kh,
            self.kw,
            self.sh,
            self.sw,
            self.dh,
            self.dw,
            self.L,
            *self.out_hw,
        ]

    def pieces_tensor(self) -> torch.Tensor:
        """:attr:`pieces` as an int64 (n, 5) tensor of (block, tap, c0, len, e0) for the C++
        kernels, with runs of whole-pixel pieces of neighbouring taps in one kernel row merged
        when they are neighbours in memory too (dilation 1 along the width)."""
        return _pieces_tensor(self.kh, self.kw, self.C, self.L, self.dw)

    def weight_blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """W as nb blocks of L rows: (M, C, kh, kw) -> (nb, L, M), rows in (kh, kw, c) order,
        the last block zero-padded."""
        M = weight.shape[0]
        w = weight.permute(0, 2, 3, 1).reshape(M, self.K)
        pad = self.nb * self.L - self.K
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
        return w.reshape(M, self.nb, self.L).permute(1, 2, 0)

    def weight_from_blocks(self, wb: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_blocks` (drops the padding rows)."""
        M = wb.shape[-1]
        w = wb.permute(2, 0, 1).reshape(M, self.nb * self.L)[:, : self.K]
        return w.reshape(M, self.kh, self.kw, self.C).permute(0, 3, 1, 2)
