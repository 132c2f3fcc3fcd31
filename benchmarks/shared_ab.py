"""A/B of the work the reuse rewrite does not touch, on the whole training step: the main job's
model and batch (``benchmarks/step.py``), stock and reuse, each with the shared part as
before session 15 (CifarNet's ReLU before its max-pool, Adam's for-loop) and as the main job
now runs it (ReLU after the max-pool, Adam's foreach kernels; also fused Adam), all timed
interleaved in one process, medians.

Both orders give the same values and gradients and both Adams the for-loop's results (fused
Adam rounds differently), so the variants train alike; what changes is the time of the part
of a step that both runs share, and with it the reuse/stock ratio (Amdahl: the smaller the
shared part, the more the rewritten convolution's saving weighs).

    python benchmarks/shared_ab.py
    python benchmarks/shared_ab.py --repeats 21 --steps 3
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

from benchmarks.layers import machine, machine_phase  # noqa: E402
from benchmarks.step import main_job_batch, make_step, time_interleaved  # noqa: E402
from benchmarks.step import stages as plan_stages  # noqa: E402
from examples.train import DEFAULT_MAX_ERROR, tune_malloc  # noqa: E402
from reuse_compiler import ReuseConfig, reuse_compile  # noqa: E402
from reuse_compiler.models import cifarnet  # noqa: E402

SHARED = {  # name -> (CifarNet's pool_first, Adam's implementation)
    "before (ReLU then pool, for-loop Adam)": (False, "for-loop"),
    "now (pool then ReLU, foreach Adam)": (True, "foreach"),
    "pool then ReLU, fused Adam": (True, "fused"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    args = ap.parse_args(argv)
    tune_malloc()
    x, y = main_job_batch()
    torch.manual_seed(0)
    weights = cifarnet(in_channels=1, image_size=28).state_dict()
    config = ReuseConfig(
        policy="measured", l_values="extended", hashing="pca", max_error=DEFAULT_MAX_ERROR, norm_grad=False
    )
    steps, stages = {}, {}
    for shared, (pool_first, adam) in SHARED.items():
        base = cifarnet(in_channels=1, image_size=28, pool_first=pool_first)
        base.load_state_dict(weights)
        base = base.to(memory_format=torch.channels_last)
        gm = reuse_compile(copy.deepcopy(base), x, config=config)
        stages[shared] = plan_stages(gm)
        steps[(shared, "stock")] = make_step(base, x, y, adam)
        steps[(shared, "reuse")] = make_step(gm, x, y, adam)
    phase = machine_phase()
    times = time_interleaved(steps, args.repeats, args.steps)
    med = {key: statistics.median(v) for key, v in times.items()}
    first = next(iter(SHARED))
    print(
        f"# training step of the main job's CifarNet (batch 128, channels-last) on {machine('cpu')}; "
        f"medians of {args.repeats} interleaved rounds of {args.steps} steps"
    )
    print(f"# machine phase: {phase} before, {machine_phase()} after")
    print("| shared part | reuse stages | stock ms | reuse ms | reuse / stock | stock / stock before |")
    print("|---|---|---:|---:|---:|---:|")
    for shared in SHARED:
        s, r = med[(shared, "stock")], med[(shared, "reuse")]
        print(f"| {shared} | {stages[shared]} | {s:.1f} | {r:.1f} | {r / s:.3f} | {s / med[(first, 'stock')]:.3f} |")


if __name__ == "__main__":
    main()
