"""Per-op timing of the reuse chain on CifarNet conv2's shape in the main job (for kernel work).

Times each ``reuse`` op on its own (the forward ops, the backward ops, and the centroid
GEMM's forward+backward) for the given (L, H) stages, the whole chain's forward+backward
(``reuse_conv2d``, mean and norm centroid), and the stock convolution's forward and
forward+backward. Every one of them is called once (warm-up), then all are timed
round-robin in the same ``--repeats`` rounds (each round calls each of them once); the
figures are medians over the rounds, and every ratio divides by stock's median from those
same rounds. The mean-centroid chain's op sum adds its ops' times within each round, then
takes the median. Input: conv2's input in the main job (``examples/train.py``: 28x28
digits, conv1 padded, 3x3/2 max-pool), (128, 64, 14, 14), here post-ReLU Gaussian; 5x5
kernel, 64 outputs, padding 2.

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
from reuse_compiler.runtime.ops import reuse_conv2d  # noqa: E402
from reuse_compiler.runtime.reference import lsh_planes  # noqa: E402

SHAPE = (128, 64, 14, 14)  # CifarNet conv2's input in the main job (benchmarks/layers.py LAYERS)
K, S, P, D = [5, 5], [1, 1], [2, 2, 2, 2], [1, 1]
# the ops of the mean-centroid chain's forward+backward, summed per round
CHAIN_OPS = ("im2col", "lsh_hash", "cluster", "gemm fwd+bwd", "reconstruct", "reconstruct_grad", "cluster_grad")


def median_ms(fn, repeats: int) -> float:
    """Median ms of ``repeats`` calls of ``fn`` after one warm-up call (one function alone;
    for side-by-side figures use :func:`time_round_robin`)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_round_robin(fns: dict, repeats: int, n: int = 1, warmup: int = 1, sync=None) -> dict:
    """Call each of ``fns`` (name -> callable) ``warmup`` times, then ``repeats`` rounds that
    call each ``n`` times, in order. Returns name -> ms per call, one value per round. (The
    benchmarks' one interleaving loop: ``step.time_interleaved`` is this with two warm-ups.)
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before and after each timed span."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    return times


def chain_ms(t: dict) -> float:
    """Forward+backward of the mean-centroid chain: the sum of its ops' times in ``t``
    (one round's times, or medians)."""
    return sum(t[p] for p in CHAIN_OPS)


def stage_ops(x, w, b, L: int, H: int):
    """The chain's ops at (L, H) as callables on prepared inputs, and the whole chain's
    forward+backward; returns (name -> callable, nb, Cmax)."""
    ops = torch.ops.reuse
    planes = lsh_planes(L, H, 0)
    xp = ops.im2col(x, K, S, P, D)
    ids = ops.lsh_hash(xp, planes, K, S, D)
    cent, inv, cnt = ops.cluster(xp, ids, K, S, D, L, H, "batch")
    yc = ops.centroid_gemm(cent, w)
    y = ops.reconstruct(yc, inv, b)
    gy, gc = torch.ones_like(y), torch.randn_like(cent)
    g = Geometry.of(xp.shape, K, S, D, L)
    keys = kernels.chunk_keys(ids, inv, cnt, g, "batch")  # what cluster's autograd saves
    cr, wr = cent.clone().requires_grad_(), w.clone().requires_grad_()
    norms = ops.member_norms(xp, K, S, D, L)
    gn = torch.randn_like(norms)

    def gemm_fb():
        o = ops.centroid_gemm(cr, wr)
        o.backward(torch.ones_like(o))

    def chain_fb(centroid):
        def run():
            xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
            out, _ = reuse_conv2d(
                xx, ww, b, planes, K, S, P, D, scope="batch", centroid=centroid, keep_parts=False, norm_grad=False
            )
            out.backward(torch.ones_like(out))

        return run

    fns = {
        "im2col": lambda: ops.im2col(x, K, S, P, D),
        "lsh_hash": lambda: ops.lsh_hash(xp, planes, K, S, D),
        "cluster": lambda: ops.cluster(xp, ids, K, S, D, L, H, "batch"),
        "centroid_gemm": lambda: ops.centroid_gemm(cent, w),
        "reconstruct": lambda: ops.reconstruct(yc, inv, b),
        "reconstruct_grad": lambda: ops.reconstruct_grad(gy, inv, cnt.shape[1]),
        "cluster_grad": lambda: ops.cluster_grad(gc, inv, cnt, list(xp.shape), K, S, D, keys),
        "member_norms": lambda: ops.member_norms(xp, K, S, D, L),
        "member_norms_grad": lambda: ops.member_norms_grad(gn, norms, xp, K, S, D, L),
        "gemm fwd+bwd": gemm_fb,
        "chain fwd+bwd, mean centroid (reuse_conv2d)": chain_fb("mean"),
        "chain fwd+bwd, norm centroid, norms constant (reuse_conv2d)": chain_fb("norm"),
    }
    return fns, cnt.shape[0], cnt.shape[1]


def time_stage(x, w, b, L: int, H: int, r: int):
    """Median ms of every op of the chain at (L, H), the ops timed round-robin in ``r``
    rounds; returns (times, nb, Cmax)."""
    fns, nb, cmax = stage_ops(x, w, b, L, H)
    times = time_round_robin(fns, r)
    return {name: statistics.median(t) for name, t in times.items()}, nb, cmax


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="+", help="L,H pairs, e.g. 32,9")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (>= 1), after one warm-up call")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.manual_seed(0)
    x = F.relu(torch.randn(*SHAPE))
    w = torch.randn(64, 64, 5, 5) * 0.02
    b = torch.zeros(64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def stock_fb():
        y = F.conv2d(xr, wr, b, padding=2)
        y.backward(torch.ones_like(y))

    fns = {("stock", "fwd"): lambda: F.conv2d(x, w, b, padding=2), ("stock", "fwd+bwd"): stock_fb}
    info = {}
    for stage in args.stages:
        L, H = (int(v) for v in stage.split(","))
        ops_, nb, cmax = stage_ops(x, w, b, L, H)
        info[stage] = (L, H, nb, cmax, list(ops_))
        fns.update({(stage, name): fn for name, fn in ops_.items()})
    times = time_round_robin(fns, args.repeats)
    med = {key: statistics.median(t) for key, t in times.items()}
    fwd, fb = med["stock", "fwd"], med["stock", "fwd+bwd"]
    print(
        f"# per-op timing, input {SHAPE} (CifarNet conv2's in the main job), 5x5, 64 outputs, padding 2; "
        f"{torch.get_num_threads()} threads; medians of {args.repeats} rounds, every op of every stage and stock "
        "timed once per round (round-robin, after one warm-up call each); ratios against stock's medians from the "
        "same rounds"
    )
    print(f"stock conv2d: fwd {fwd:.2f} ms, fwd+bwd {fb:.2f} ms")
    for stage, (L, H, nb, cmax, names) in info.items():
        print(f"\n| L={L} H={H} (nb={nb}, Cmax={cmax}) | ms | x stock fwd | x stock fwd+bwd |")
        print("|---|---:|---:|---:|")
        for name in names:
            m = med[stage, name]
            print(f"| {name} | {m:.2f} | {m / fwd:.2f} | {m / fb:.2f} |")
        per_round = [chain_ms({p: times[stage, p][i] for p in CHAIN_OPS}) for i in range(args.repeats)]
        m = statistics.median(per_round)
        print(f"| mean-centroid chain fwd+bwd, sum of its ops per round | {m:.2f} | {m / fwd:.2f} | {m / fb:.2f} |")


if __name__ == "__main__":
    main()
