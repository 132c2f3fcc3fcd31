"""Policies 1-3 of Section V-A, on the paper's rules and SPEC's worked example."""

import math

import pytest

from reuse_compiler import policies


def test_worked_example_cifarnet_conv2():
    """SPEC section 3: CifarNet conv2, 64 -> 64, 5x5, batch 128 of 16x16 maps."""
    N = 128 * 16 * 16
    assert N == 32768 and 64 * 5 * 5 == 1600
    assert policies.l_range(kw=5, in_channels=64, first_layer=False) == (5, 40)
    assert policies.h_range(N) == (9, 14)


@pytest.mark.parametrize(
    "kw,ic,first,expected",
    [
        (5, 3, True, (5, 10)),  # ceil(sqrt(3)) = 2
        (5, 1, True, (5, 5)),
        (3, 64, True, (3, 24)),  # first layer: Amendment 1 does not apply
        (3, 64, False, (9, 24)),  # Amendment 1: 3 * 3 < 10 -> L_min = 9
        (3, 4, False, (9, 9)),  # Amendment 1 pushes L_min past L_max = 6: single value
        (4, 16, False, (4, 16)),  # 4 * 4 = 16 >= 10: no amendment
        (1, 100, False, (1, 10)),
        (11, 3, True, (11, 22)),
    ],
)
def test_policy1_with_amendment(kw, ic, first, expected):
    assert policies.l_range(kw, ic, first) == expected


@pytest.mark.parametrize("N", [1, 2, 3, 50, 100, 101, 1000, 4096, 32768, 10**7])
def test_policy2_definition(N):
    lo, hi = policies.h_range(N)
    assert 1 <= lo <= hi <= 62
    if 2**lo > 0.01 * N and lo > 1:
        assert 2 ** (lo - 1) <= 0.01 * N  # smallest with 2^H > 0.01 N
    if hi > lo:
        assert 2**hi < N <= 2 ** (hi + 1)  # largest with 2^H < N


def test_policy2_small_layers_floor():
    assert policies.h_range(1) == (1, 1)
    assert policies.h_range(4) == (1, 1)
    assert policies.h_range(5) == (1, 2)


def test_l_values_fast_paths():
    # CifarNet conv2: divisors of 64 in [5, 40]
    assert policies.l_values(5, 40, kh=5, kw=5, in_channels=64) == [32, 16, 8]
    # conv1 on digits: L = 5 is one kernel row of one channel (a "row" fast path)
    assert policies.l_values(5, 5, kh=5, kw=5, in_channels=1) == [5]
    # RGB 5x5: nothing in [5, 10] has a fast path -> the range's ends
    assert policies.l_values(5, 10, kh=5, kw=5, in_channels=3) == [10, 5]
    assert policies.l_values(5, 10, kh=5, kw=5, in_channels=3, mode="all") == list(range(10, 4, -1))
    # never above K
    assert policies.l_values(1, 10, kh=1, kw=1, in_channels=4) == [4, 2, 1]


def _walk_is_valid(cands, Ls, Hs):
    assert cands[0] == (Ls[0], Hs[0]) and cands[-1] == (Ls[-1], Hs[-1])
    assert len(cands) == len(Ls) + len(Hs) - 1
    for (l1, h1), (l2, h2) in zip(cands, cands[1:]):
        i1, j1, i2, j2 = Ls.index(l1), Hs.index(h1), Ls.index(l2), Hs.index(h2)
        assert (i2 - i1, j2 - j1) in ((1, 0), (0, 1))


@pytest.mark.parametrize("M", [1, 16, 64, 512])
def test_policy3_takes_the_cheaper_step(M):
    Ls, Hs = [32, 16, 8], [9, 10, 11, 12, 13, 14]
    cands = policies.candidates(Ls, Hs, M)
    _walk_is_valid(cands, Ls, Hs)
    for (l1, h1), (l2, h2) in zip(cands, cands[1:]):
        i, j = Ls.index(l1), Hs.index(h1)
        d_l = 1 / Ls[i + 1] - 1 / Ls[i] if i + 1 < len(Ls) else math.inf
        d_h = (Hs[j + 1] - Hs[j]) / M if j + 1 < len(Hs) else math.inf
        taken = 1 / l2 - 1 / l1 if l2 != l1 else (h2 - h1) / M
        assert taken == min(d_l, d_h)


def test_policy3_cifarnet_conv2_order():
    """With M = 64 an H step costs 1/64 < 1/16 - 1/32: H rises to H_max first, then L falls."""
    cands = policies.candidates([32, 16, 8], list(range(9, 15)), 64)
    assert cands == [(32, 9), (32, 10), (32, 11), (32, 12), (32, 13), (32, 14), (16, 14), (8, 14)]


def test_policy3_wide_layer_moves_l_first():
    """With M = 4 an H step costs 0.25 > 1/16 - 1/32, so L falls first."""
    assert policies.candidates([32, 16], [9, 10], 4) == [(32, 9), (16, 9), (16, 10)]


def test_expected_cost_eq21():
    assert policies.expected_cost(L=40, H=9, M=64, r_c=0.05) == pytest.approx(9 / 64 + 0.05 + 1 / 40)


def test_policy3_exact_ties_take_the_l_step():
    """1/8 - 1/12 = 1/24 = one H step at M = 24: a tie, decided exactly (in floats the H step won)."""
    cands = policies.candidates([24, 12, 8, 6], [5, 6, 7], 24)
    assert cands[:4] == [(24, 5), (12, 5), (8, 5), (6, 5)]
