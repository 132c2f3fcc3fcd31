"""Where the main job's training step spends its time, without a profiler: stock vs reuse,
segment by segment.

``torch.profiler`` inflates some operators of this step several times over (session 20:
it put pool1's backward, with its zero-fill, at 8-9 ms per step, while the same backward
timed from tensor hooks takes 2.6-4 ms), so its tables mislead about the part of the step
that the rewrite does not touch. This script times the step's segments directly:

- forward: conv1, pool1 + ReLU, conv2, pool2 + ReLU + flatten, the linear layers + loss,
  each between two ``time.perf_counter`` marks;
- backward: the same segments in reverse, each ending when autograd hands the gradient of
  the segment's input to a tensor hook (the last, conv1's weight gradient, ends when
  ``backward()`` returns);
- Adam's step.

The model, batch and optimizer are the main job's (``benchmarks/step.py``: CifarNet on the
real digits, batch 128, channels-last, foreach Adam 1e-3). In the reuse model conv2 is its
own compiled module with the main job's config (measured policy, extended L values, norm
centroid, fitted planes, max error 0.32, norms constant in the backward); conv1 stays the
stock convolution, which is what the main job's compiled model runs there (its measured
policy keeps conv1 exact: no candidate is faster). Since session 29 the main job runs conv1,
pool1 and its ReLU as one op (docs/policies.md, "The first block in one pass"), which has no
segment boundaries inside; this script times them as separate segments, as session 28's main
job ran them (``benchmarks/step.py`` times the whole step with the block). The two steps are timed interleaved,
``--repeats`` rounds of ``--steps`` steps each after warm-up steps; each figure is the median
over all timed steps. The marks are contiguous, so in each step the segments add up to the
step; their medians add up to about the median step.

    python benchmarks/timeline.py
    python benchmarks/timeline.py --repeats 15 --steps 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.layers import machine, machine_phase  # noqa: E402
from benchmarks.ops import time_round_robin  # noqa: E402
from benchmarks.step import main_job_batch, stage_of  # noqa: E402
from examples.train import DEFAULT_MAX_ERROR, MODELS, make_adam, tune_malloc  # noqa: E402
from reuse_compiler import ReuseConfig, reuse_compile  # noqa: E402

# (mark, what the span ending at it is), in step order; forward marks then backward hooks
SEGMENTS = (
    ("f_conv1", "forward: conv1"),
    ("f_pool1", "forward: pool1 + ReLU"),
    ("f_conv2", "forward: conv2"),
    ("f_pool2", "forward: pool2 + ReLU + flatten"),
    ("f_fc", "forward: fc1-fc3 + loss"),
    ("b_fc", "backward: loss + fc3-fc1"),
    ("b_pool2", "backward: ReLU + pool2"),
    ("b_conv2", "backward: conv2 (input and weight gradients)"),
    ("b_pool1", "backward: ReLU + pool1"),
    ("b_conv1", "backward: conv1 (weight and bias gradients)"),
    ("adam", "Adam step"),
)
CONV2 = ("f_conv2", "b_conv2")


class _Conv(nn.Module):
    """One of CifarNet's convolutions alone, so that it can be compiled by itself."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def main_job_conv2(batch_size: int, max_error: float = DEFAULT_MAX_ERROR):
    """The main job's first batch and model, for a step with conv2 compiled alone (glibc malloc
    tuned, seed 0): ``(x, y, model, conv2_input, config)``, with ``x`` the digits in channels-last
    memory, ``model`` a fresh CifarNet in channels-last, ``conv2_input`` conv1's pooled ReLU
    output for ``reuse_compile`` and ``config`` the main job's reuse config (measured policy,
    extended L values, norm centroid, fitted planes, norms constant in the backward)."""
    tune_malloc()
    x, y = main_job_batch(batch_size)
    model = MODELS["cifarnet"]().to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv2_input = F.relu(model.pool1(model.conv1(x)))
    config = ReuseConfig(policy="measured", l_values="extended", hashing="pca", max_error=max_error, norm_grad=False)
    return x, y, model, conv2_input, config


def make_timed_step(model, conv1, conv2, x, y, marks: dict):
    """One training step of ``model`` (CifarNet, ``pool_first``) with ``conv1`` and ``conv2`` in
    place of its own, appending ``time.perf_counter()`` to ``marks[name]`` at every segment boundary."""
    opt = make_adam(model.parameters(), 1e-3, "foreach")

    def mark(name):
        marks.setdefault(name, []).append(time.perf_counter())

    def hook(name):
        def fn(_grad):
            mark(name)

        return fn

    def step():
        opt.zero_grad(set_to_none=True)
        mark("start")
        a = conv1(x)
        mark("f_conv1")
        b = F.relu(model.pool1(a))
        mark("f_pool1")
        c = conv2(b)
        mark("f_conv2")
        d = torch.flatten(F.relu(model.pool2(c)), 1)
        mark("f_pool2")
        loss = F.cross_entropy(model.fc3(F.relu(model.fc2(F.relu(model.fc1(d))))), y)
        mark("f_fc")
        for t, name in ((d, "b_fc"), (c, "b_pool2"), (b, "b_conv2"), (a, "b_pool1")):
            t.register_hook(hook(name))
        loss.backward()
        mark("b_conv1")
        opt.step()
        mark("adam")

    return step


def segment_ms(marks: dict, skip: int) -> dict:
    """Per segment, the median ms over the steps after the first ``skip``; "step": the whole."""
    names = ["start"] + [m for m, _ in SEGMENTS]
    out = {}
    for prev, name in zip(names, names[1:]):
        out[name] = statistics.median((b - a) * 1e3 for a, b in zip(marks[prev][skip:], marks[name][skip:]))
    out["step"] = statistics.median((b - a) * 1e3 for a, b in zip(marks["start"][skip:], marks["adam"][skip:]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each run first")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-error", type=float, default=DEFAULT_MAX_ERROR, help="the reuse config's max_error")
    args = ap.parse_args(argv)
    x, y, base, conv2_input, config = main_job_conv2(args.batch_size, args.max_error)
    runs, marks = {}, {}
    for name in ("stock", "reuse"):
        model = copy.deepcopy(base)
        conv1, conv2 = _Conv(model.conv1), _Conv(model.conv2)
        if name == "reuse":  # each compiled alone, with the main job's config
            conv1 = reuse_compile(conv1, x, config=config, inplace=True)
            conv2 = reuse_compile(conv2, conv2_input, config=config, inplace=True)
            row1, row2 = conv1.reuse_plan["conv"], conv2.reuse_plan["conv"]
            stage = f"conv1 {stage_of(row1)}; conv2 {stage_of(row2)}"
        marks[name] = {}
        runs[name] = make_timed_step(model, conv1, conv2, x, y, marks[name])
    phase = machine_phase()
    # the benchmarks' interleaving loop; its per-round spans are not used: the steps' marks are
    time_round_robin(runs, args.repeats, args.steps, args.warmup)
    ms = {name: segment_ms(marks[name], args.warmup) for name in runs}
    s, r = ms["stock"], ms["reuse"]
    print(
        f"# training step of examples/train.py's CifarNet (batch {args.batch_size}, channels-last, foreach Adam), "
        f"segments timed without a profiler, on {machine('cpu')}; reuse: {stage}"
    )
    print(
        f"# medians over {args.repeats} interleaved rounds of {args.steps} steps; machine phase "
        f"(benchmarks/layers.py machine_phase): {phase} before, {machine_phase()} after"
    )
    print("| segment | stock ms | reuse ms | stock share | reuse / stock step |")
    print("|---|---:|---:|---:|---:|")
    for mark, what in SEGMENTS:
        print(f"| {what} | {s[mark]:.2f} | {r[mark]:.2f} | {s[mark] / s['step']:.3f} | {r[mark] / s['step']:.3f} |")
    print(f"| **step** | {s['step']:.2f} | {r['step']:.2f} | 1.000 | **{r['step'] / s['step']:.3f}** |")
    shared = {name: sum(ms[name][m] for m, _ in SEGMENTS if m not in CONV2) for name in ms}
    conv = {name: sum(ms[name][m] for m in CONV2) for name in ms}
    print()
    print(
        f"conv2 forward+backward: stock {conv['stock']:.2f} ms, reuse {conv['reuse']:.2f} ms "
        f"({conv['reuse'] / conv['stock']:.3f}x). Everything else: stock {shared['stock']:.2f} ms, "
        f"reuse {shared['reuse']:.2f} ms, {shared['stock'] / s['step']:.3f} of stock's step: with a conv2 "
        f"that took no time at all, the reuse step would still be {shared['reuse'] / s['step']:.3f}x stock's."
    )
    return ms


if __name__ == "__main__":
    main()
