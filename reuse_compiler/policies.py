"""Parameter policies of Section V-A, as pure functions.

>>> l_range(kw=5, in_channels=64, first_layer=False)   # CifarNet conv2
(5, 40)
>>> h_range(32768)
(9, 14)
>>> l_values(5, 40, kh=5, kw=5, in_channels=64)         # fast-path values in [5, 40]
[32, 16, 8]
>>> candidates([32, 16, 8], [9, 10], M=64)  # an H step costs 1/64 < 1/16 - 1/32
[(32, 9), (32, 10), (16, 10), (8, 10)]
"""

from __future__ import annotations

import math
from fractions import Fraction

from reuse_compiler.runtime.geometry import block_kind

__all__ = ["l_range", "h_range", "l_values", "candidates", "expected_cost", "MAX_H"]

MAX_H = 62


def l_range(kw: int, in_channels: int, first_layer: bool) -> tuple[int, int]:
    """Policy 1 with Amendment 1.

    L_min = k_w and L_max = ceil(sqrt(I_c)) * k_w; for a layer other than the first
    convolution with k_w * k_w < 10, L_min = k_w * k_w. If that makes L_min exceed L_max the
    range is the single value L_min.
    """
    lo = kw
    hi = math.ceil(math.sqrt(in_channels)) * kw
    if not first_layer and kw * kw < 10:
        lo = kw * kw
    return lo, max(lo, hi)


def h_range(N: int) -> tuple[int, int]:
    """Policy 2: H_min is the smallest H with 2^H > 0.01 N, H_max the largest with 2^H < N
    (N = rows being clustered); H_min >= 1, H_max >= H_min, both <= 62."""
    h_min = 1
    while (1 << h_min) <= 0.01 * N and h_min < MAX_H:
        h_min += 1
    h_max = h_min
    while h_max < MAX_H and (1 << (h_max + 1)) < N:
        h_max += 1
    return h_min, h_max


def l_values(L_min: int, L_max: int, *, kh: int, kw: int, in_channels: int, mode: str = "fast") -> list[int]:
    """The [L] list of Policy 3, descending. This project's choice: with ``mode="fast"``,
    the values in [L_min, L_max] that have a fast path (L = K, L dividing I_c, or L = m * I_c
    with m dividing k_w); if none does, the two ends of the range. ``mode="all"``: every
    integer in the range. ``mode="extended"``: the fast-path values from L_min up to K
    (Policy 1's upper bound lifted: fewer, longer sub-vectors are what is cheap on a CPU).
    Values never exceed K."""
    K = kh * kw * in_channels
    hi = K if mode == "extended" else min(L_max, K)
    lo = min(L_min, hi)
    if mode == "all":
        return list(range(hi, lo - 1, -1))
    fast = [L for L in range(hi, lo - 1, -1) if block_kind(kh, kw, in_channels, L) != "general"]
    return fast or sorted({lo, min(L_max, K)}, reverse=True)


def candidates(Ls: list[int], Hs: list[int], M: int) -> list[tuple[int, int]]:
    """Policy 3: walk from (Ls[0], Hs[0]) to (Ls[-1], Hs[-1]), each step moving L down
    (delta E_f = 1/L2 - 1/L1, Eq. 22) or H up (delta E_f = (H2 - H1) / M, Eq. 23),
    whichever adds less expected time. Ties take the L step. ``Ls`` must be descending and
    ``Hs`` ascending."""
    i = j = 0
    out = [(Ls[0], Hs[0])]
    # exact fractions: in floats a true tie (1/8 - 1/12 = 1/24 against M = 24) fell either way
    while i < len(Ls) - 1 or j < len(Hs) - 1:
        d_l = Fraction(1, Ls[i + 1]) - Fraction(1, Ls[i]) if i < len(Ls) - 1 else math.inf
        d_h = Fraction(Hs[j + 1] - Hs[j], M) if j < len(Hs) - 1 else math.inf
        if d_l <= d_h:
            i += 1
        else:
            j += 1
        out.append((Ls[i], Hs[j]))
    return out


def expected_cost(L: int, H: int, M: int, r_c: float) -> float:
    """Eq. 21: the forward's expected time relative to the exact layer, H/M + r_c + 1/L."""
    return H / M + r_c + 1 / L
