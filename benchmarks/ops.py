"""Per-op timing of the reuse chain on CifarNet conv2's shape (for kernel work).

Times each ``reuse`` op on its own (forward ops, the backward ops, and the centroid GEMM's
forward+backward) for the given (L, H) stages, next to the stock convolution's forward and
forward+backward; medians of ``--repeats`` runs after a warm-up. Input: post-ReLU Gaussian
(128, 64, 16, 16), 5x5 kernel, 64 outputs, padding 2.

    python benchmarks/ops.py 32,9 1600,9 8,14
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reuse_compiler  # noqa: E402,F401
from reuse_compiler.runtime import kernels  # noqa: E402
from reuse_compiler.runtime.geometry import Geometry  # noqa: E402
from reuse_compiler.runtime.reference import lsh_planes  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="+", help="L,H pairs, e.g. 32,9")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = F.relu(torch.randn(128, 64, 16, 16))
    w = torch.randn(64, 64, 5, 5) * 0.02
    b = torch.zeros(64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def stock_fb():
        y = F.conv2d(xr, wr, b, padding=2)
        y.backward(torch.ones_like(y))

    r = args.repeats
    print(
        f"stock conv2d: fwd {median_ms(lambda: F.conv2d(x, w, b, padding=2), r):.1f} ms, "
        f"fwd+bwd {median_ms(stock_fb, r):.1f} ms"
    )
    for stage in args.stages:
        L, H = (int(v) for v in stage.split(","))
        t, nb, cmax = time_stage(x, w, b, L, H, r)
        print(
            f"L={L} H={H} (nb={nb}, Cmax={cmax}): "
            + "  ".join(f"{name} {v:.1f}" for name, v in t.items())
            + f"  [mean-centroid fwd+bwd chain {chain_ms(t):.1f} ms]"
        )


def chain_ms(t: dict) -> float:
    """Forward+backward of the mean-centroid chain from the per-op medians."""
    parts = ("im2col", "lsh_hash", "cluster", "gemm fwd+bwd", "reconstruct", "reconstruct_grad", "cluster_grad")
    return sum(t[p] for p in parts)


def time_stage(x, w, b, L: int, H: int, r: int):
    """Median ms of every op of the chain at (L, H); returns (times, nb, Cmax)."""
    ops = torch.ops.reuse
    k, s, p, d = [5, 5], [1, 1], [2, 2, 2, 2], [1, 1]
    planes = lsh_planes(L, H, 0)
    xp = ops.im2col(x, k, s, p, d)
    ids = ops.lsh_hash(xp, planes, k, s, d)
    cent, inv, cnt = ops.cluster(xp, ids, k, s, d, L, H, "batch")
    yc = ops.centroid_gemm(cent, w)
    y = ops.reconstruct(yc, inv, b)
    gy, gc = torch.ones_like(y), torch.randn_like(cent)
    g = Geometry.of(xp.shape, k, s, d, L)
    keys = kernels.chunk_keys(ids, inv, cnt, g, "batch")  # what cluster's autograd saves
    cr, wr = cent.clone().requires_grad_(), w.clone().requires_grad_()

    norms = ops.member_norms(xp, k, s, d, L)
    gn = torch.randn_like(norms)

    def gemm_fb():
        o = ops.centroid_gemm(cr, wr)
        o.backward(torch.ones_like(o))

    times = {
        "im2col": median_ms(lambda: ops.im2col(x, k, s, p, d), r),
        "lsh_hash": median_ms(lambda: ops.lsh_hash(xp, planes, k, s, d), r),
        "cluster": median_ms(lambda: ops.cluster(xp, ids, k, s, d, L, H, "batch"), r),
        "centroid_gemm": median_ms(lambda: ops.centroid_gemm(cent, w), r),
        "reconstruct": median_ms(lambda: ops.reconstruct(yc, inv, b), r),
        "reconstruct_grad": median_ms(lambda: ops.reconstruct_grad(gy, inv, cnt.shape[1]), r),
        "cluster_grad": median_ms(lambda: ops.cluster_grad(gc, inv, cnt, list(xp.shape), k, s, d, keys), r),
        "member_norms": median_ms(lambda: ops.member_norms(xp, k, s, d, L), r),
        "member_norms_grad": median_ms(lambda: ops.member_norms_grad(gn, norms, xp, k, s, d, L), r),
        "gemm fwd+bwd": median_ms(gemm_fb, r),
    }
    return times, cnt.shape[0], cnt.shape[1]


if __name__ == "__main__":
    main()
