"""A/B of the C++ kernels on the whole training step: the main job's model and batch
(``benchmarks/step.py``), its reuse step run once with the kernels of a git revision and once
with the working tree's, both builds loaded in one process, interleaved with the stock step,
medians. The figure that says what a kernel change buys the main job (``kernels_ab.py``
times the kernels alone).

    python benchmarks/step_ab.py --base HEAD
    python benchmarks/step_ab.py --base 8088f75 --repeats 21 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.kernels_ab import base_and_tree  # noqa: E402
from benchmarks.layers import machine, machine_phase  # noqa: E402
from benchmarks.step import make_step, stages, time_interleaved  # noqa: E402
from examples.train import DEFAULT_MAX_ERROR, MODELS, load_digits, tune_malloc  # noqa: E402
from reuse_compiler import ReuseConfig, reuse_compile  # noqa: E402
from reuse_compiler.runtime import extension  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision whose kernels are the baseline")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    args = ap.parse_args(argv)
    tune_malloc()
    builds = base_and_tree(args.base)

    torch.manual_seed(0)
    (x_tr, y_tr), _ = load_digits(0.2, 0)
    x = x_tr[:128].contiguous(memory_format=torch.channels_last)
    y = y_tr[:128]
    stock = MODELS["cifarnet"]().to(memory_format=torch.channels_last)
    config = ReuseConfig(
        policy="measured", l_values="extended", hashing="pca", max_error=DEFAULT_MAX_ERROR, norm_grad=False
    )
    gm = reuse_compile(copy.deepcopy(stock), x, config=config)
    steps = {
        "stock": make_step(stock, x, y),
        "reuse, base kernels": make_step(copy.deepcopy(gm), x, y),
        "reuse, tree kernels": make_step(copy.deepcopy(gm), x, y),
    }
    uses = {"stock": None, "reuse, base kernels": builds["base"], "reuse, tree kernels": builds["tree"]}
    real_get = extension.get

    def with_kernels(name):  # the step, run with its build's kernels
        module, step = uses[name], steps[name]

        def run():
            extension.get = (lambda: module) if module is not None else real_get
            try:
                step()
            finally:
                extension.get = real_get

        return run

    phase = machine_phase()
    times = time_interleaved({name: with_kernels(name) for name in steps}, args.repeats, args.steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(
        f"# training step A/B of the kernels, {args.base} (base) vs the working tree, on {machine('cpu')}; "
        f"{stages(gm)}; medians of {args.repeats} interleaved rounds of {args.steps} steps"
    )
    print(f"# machine phase: {phase} before, {machine_phase()} after")
    print("| variant | step ms | x stock |")
    print("|---|---:|---:|")
    for name in steps:
        print(f"| {name} | {med[name]:.1f} | {med[name] / med['stock']:.3f} |")
    base, tree = med["reuse, base kernels"], med["reuse, tree kernels"]
    paired = sorted(t / b for t, b in zip(times["reuse, tree kernels"], times["reuse, base kernels"]))
    q = len(paired) // 4
    print(
        f"# reuse step, tree vs base: {tree / base:.3f}x ({base - tree:+.1f} ms per step); per round, paired: "
        f"median {statistics.median(paired):.3f}x, quartiles {paired[q]:.3f}-{paired[-1 - q]:.3f}"
    )


if __name__ == "__main__":
    main()
