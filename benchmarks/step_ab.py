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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.kernels_ab import base_and_tree  # noqa: E402
from benchmarks.layers import machine, machine_phase  # noqa: E402
from benchmarks.step import main_job_compiled, make_step, print_ab, stages, time_interleaved  # noqa: E402
from examples.train import tune_malloc  # noqa: E402
from reuse_compiler.runtime import extension  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision whose kernels are the baseline")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    args = ap.parse_args(argv)
    tune_malloc()
    builds = base_and_tree(args.base)

    x, y, stock, gm = main_job_compiled()
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
    title = (
        f"training step A/B of the kernels, {args.base} (base) vs the working tree, on {machine('cpu')}; "
        f"{stages(gm)}; medians of {args.repeats} interleaved rounds of {args.steps} steps"
    )
    print_ab(times, title, phase, "reuse, base kernels", "reuse, tree kernels", "tree vs base")


if __name__ == "__main__":
    main()
