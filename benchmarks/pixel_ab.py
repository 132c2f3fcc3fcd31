"""A/B of the per-pixel chain on the whole training step: the main job's model and batch
(``benchmarks/step.py``) compiled with its config, its reuse step run once with the generic
chain (``kernels.PIXEL_CHAIN = False`` when the graph is built) and once with the per-pixel
chain (the default where it fits: conv2 at L = 64), interleaved with the stock step, medians.

First checks that both chains give the same bits: one step's loss, every parameter's gradient
and the parameters after Adam's step, from the same weights. Then times. With ``--norm-grad
on`` (the member norms take a gradient, the library's default) the per-pixel chain sums the
norms' share of the input gradient per pixel instead of per (tap, row): the same values up to
rounding, so the check prints the largest relative difference of each tensor instead.

    python benchmarks/pixel_ab.py
    python benchmarks/pixel_ab.py --repeats 21 --steps 3
    python benchmarks/pixel_ab.py --repeats 21 --norm-grad on
    python benchmarks/pixel_ab.py --repeats 7 --stage 32,8   # conv2 forced: two chains on channel slices

``--stage L,H`` forces conv2 to a stage (the per-pixel chain pinned, whatever the calibration
chose; where L divides C it runs on channel slices, and the check then prints the largest
relative differences: the slices' outputs are added after their own sums). The table adds
each step's peak memory (``benchmarks.layers.memory_peaks``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.layers import machine, machine_phase, memory_peaks  # noqa: E402
from benchmarks.step import main_job_compiled, make_step, parse_stage, print_ab, stages, time_interleaved  # noqa: E402
from examples.train import make_adam, tune_malloc  # noqa: E402
from reuse_compiler import set_stage  # noqa: E402
from reuse_compiler.passes import rebuild  # noqa: E402
from reuse_compiler.runtime import kernels  # noqa: E402


def generic_copy(gm):
    """A copy of the compiled ``gm`` whose graph is rebuilt with the generic chain."""
    other = copy.deepcopy(gm)
    was = kernels.PIXEL_CHAIN
    kernels.PIXEL_CHAIN = False
    try:
        rebuild(other)
    finally:
        kernels.PIXEL_CHAIN = was
    return other


def chain_ops(gm) -> set[str]:
    """The reuse ops in ``gm``'s graph (which chain it runs)."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "reuse." in str(n.target)}


def same_step(a, b, x, y, rel: dict | None = None) -> list[str]:
    """One training step (loss, backward, Adam) of two copies from the same weights: the names
    of whatever differs, bit for bit (empty: the same). ``rel``, if given, receives each
    differing tensor's largest difference relative to its largest entry."""
    diffs = []
    losses, grads, params = [], [], []
    for m in (a, b):
        opt = make_adam(m.parameters(), 1e-3, "foreach")
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        opt.step()
        params.append({n: p.detach().clone() for n, p in m.named_parameters()})
        opt.zero_grad(set_to_none=True)
    pairs = {"loss": (losses[0], losses[1])}
    pairs.update({f"grad {n}": (grads[0][n], grads[1][n]) for n in grads[0]})
    pairs.update({f"param {n}": (params[0][n], params[1][n]) for n in params[0]})
    for name, (u, v) in pairs.items():
        if not torch.equal(u, v):
            diffs.append(name)
            if rel is not None:
                rel[name] = float((u - v).abs().max() / u.abs().max().clamp_min(1e-30))
    return diffs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument(
        "--norm-grad",
        choices=["off", "on"],
        default="off",
        help="off: the main job's config (norms constant); on: with the norms' gradient (the library's default)",
    )
    ap.add_argument("--stage", help="conv2 forced to this stage, L,H (default: the main job's stage)")
    args = ap.parse_args(argv)
    stage = parse_stage(ap, "--stage", args.stage) if args.stage else None
    tune_malloc()
    x, y, stock, gm = main_job_compiled(norm_grad=args.norm_grad == "on")
    if stage:
        set_stage(gm, "conv2", L=stage[0], H=stage[1], exact=False)
        for c in gm.reuse_plan["conv2"].calibration["candidates"]:
            c["chain"] = "pixel"  # the per-pixel chain, whichever the calibration timed faster
        rebuild(gm)
    generic = generic_copy(gm)
    ops_pixel, ops_generic = chain_ops(gm), chain_ops(generic)
    print(f"# per-pixel graph: {sorted(ops_pixel - ops_generic)}; generic graph: {sorted(ops_generic - ops_pixel)}")
    rel = {}
    diffs = same_step(copy.deepcopy(generic), copy.deepcopy(gm), x, y, rel)
    same = "the same bits" if not diffs else "; ".join(f"{n} differs (max rel. {r:.1e})" for n, r in rel.items())
    print(f"# one step from the same weights, generic vs per-pixel chain: {same}")
    steps = {
        "stock": make_step(stock, x, y),
        "reuse, generic chain": make_step(copy.deepcopy(generic), x, y),
        "reuse, per-pixel chain": make_step(copy.deepcopy(gm), x, y),
    }
    phase = machine_phase()
    times = time_interleaved(steps, args.repeats, args.steps)
    title = (
        f"training step A/B, generic vs per-pixel chain, norms' gradient {args.norm_grad}, on {machine('cpu')}; "
        f"{stages(gm)}; "
        f"medians of {args.repeats} interleaved rounds of {args.steps} steps"
    )
    med = print_ab(times, title, phase, "reuse, generic chain", "reuse, per-pixel chain", "per-pixel vs generic")
    peaks = {name: memory_peaks(step, "cpu")[0] for name, step in steps.items()}
    print(
        "\npeak memory one step allocates (MB; x stock): "
        + ", ".join(f"{name} {p / 2**20:.1f} ({p / peaks['stock']:.2f})" for name, p in peaks.items())
    )
    return {"diffs": diffs, "medians": med, "peaks": peaks}


if __name__ == "__main__":
    main()
