"""The rewritten conv2 of the main job, op by op and kernel by kernel, inside training steps.

``benchmarks/timeline.py`` splits the whole step into segments; this script splits the one
segment the rewrite owns. It trains the main job's CifarNet (real digits, batch 128,
channels-last, foreach Adam 1e-3) with conv2 compiled alone with the main job's config
(measured policy, extended L values, norm centroid, fitted planes, max error 0.32, norms
constant in the backward; conv1 stays the stock convolution, as in the main job) and times,
in two separate passes over the same steps so that neither timer distorts the other:

- **ops**: every op dispatched while conv2's chain runs forward and backward (the ``reuse::``
  custom ops and the ATen ops they call, such as the centroid GEMMs' ``bmm``), through a
  ``TorchDispatchMode`` that times each call; the backward's part is bracketed by tensor
  hooks on conv2's output and input. The mode's own cost inflates the sum (about
  +25% over the chain without it). The mode does not see the ops a custom op calls inside
  its own implementation: a ``reuse::`` row includes them (``centroid_gemm``'s ``bmm``), and
  the ``aten::`` rows are the ops called outside the custom ops (the backward formulas' two
  ``bmm``, the bias gradient's ``sum``, the planes' refit every 20 steps).
- **kernels**: every call into the C++ extension (``runtime/csrc/reuse_kernels.cpp``), by
  wrapping the extension module's functions with ``time.perf_counter``: the kernels alone,
  without dispatch, in the cache state a real training step leaves them.

Each figure is the mean ms per training step over ``--steps`` steps after ``--warmup``.

    python benchmarks/chain_ops.py
    python benchmarks/chain_ops.py --steps 41
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.layers import machine, machine_phase  # noqa: E402
from benchmarks.step import stages  # noqa: E402
from benchmarks.timeline import _Conv, main_job_conv2  # noqa: E402
from examples.train import make_adam  # noqa: E402
from reuse_compiler import reuse_compile  # noqa: E402
from reuse_compiler.runtime import extension  # noqa: E402


class _OpTimer(TorchDispatchMode):
    """Adds each dispatched op's wall time to ``times[str(op)]`` while ``on`` is set."""

    def __init__(self, times):
        super().__init__()
        self.times = times
        self.on = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.on:
            return func(*args, **(kwargs or {}))
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.times[str(func)].append(time.perf_counter() - t)
        return out


class _KernelTimer:
    """Wraps every function of the C++ extension module with a timer while installed."""

    def __init__(self, module, times):
        self.module, self.times, self.saved = module, times, {}

    def __enter__(self):
        for name in dir(self.module):
            f = getattr(self.module, name)
            if name.startswith("_") or not callable(f):
                continue

            def timed(*args, _f=f, _name=name, **kwargs):
                t = time.perf_counter()
                out = _f(*args, **kwargs)
                self.times[_name].append(time.perf_counter() - t)
                return out

            self.saved[name] = f
            setattr(self.module, name, timed)
        return self

    def __exit__(self, *exc):
        for name, f in self.saved.items():
            setattr(self.module, name, f)


def make_step(model, conv2, x, y, on=None, off=None):
    """One training step of ``model`` with ``conv2`` in place of its conv2. ``on()`` and
    ``off()`` (if given) bracket the chain's forward and, through tensor hooks, its backward:
    from the gradient of conv2's output arriving to the gradient of its input leaving."""
    opt = make_adam(model.parameters(), 1e-3, "foreach")

    def step():
        opt.zero_grad(set_to_none=True)
        b = F.relu(model.pool1(model.conv1(x)))
        if on:
            on()
        c = conv2(b)
        if off:
            off()
            c.register_hook(lambda _g: on())
            b.register_hook(lambda _g: off())
        d = torch.flatten(F.relu(model.pool2(c)), 1)
        loss = F.cross_entropy(model.fc3(F.relu(model.fc2(F.relu(model.fc1(d))))), y)
        loss.backward()
        opt.step()

    return step


def table(times: dict, steps: int, title: str, limit: int = 0) -> list[tuple[str, float, float]]:
    """Print ``times`` as ms per step (and calls per step), largest first; return the rows."""
    rows = sorted(((k, sum(v) * 1e3 / steps, len(v) / steps) for k, v in times.items()), key=lambda r: -r[1])
    print(f"\n{title}\n")
    print("| call | ms per step | calls per step |")
    print("|---|---:|---:|")
    for name, ms, calls in rows[: limit or None]:
        print(f"| `{name}` | {ms:.3f} | {calls:g} |")
    print(f"| **all {len(rows)} rows** | **{sum(r[1] for r in rows):.3f}** | |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=21, help="timed steps per pass")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--limit", type=int, default=25, help="rows of the op table (0: all)")
    args = ap.parse_args(argv)
    x, y, model, conv2_input, config = main_job_conv2(args.batch_size)
    conv2 = reuse_compile(_Conv(copy.deepcopy(model.conv2)), conv2_input, config=config, inplace=True)
    phase = machine_phase()
    print(
        f"# the main job's conv2 chain inside training steps ({stages(conv2)}, batch {args.batch_size}, "
        f"channels-last) on {machine('cpu')}; machine phase (benchmarks/layers.py machine_phase): {phase}"
    )
    print(f"# mean ms per step over {args.steps} steps after {args.warmup} warm-up steps, each pass")

    # the step without timers, for scale
    plain = make_step(model, conv2, x, y)
    for _ in range(args.warmup):
        plain()
    t = time.perf_counter()
    for _ in range(args.steps):
        plain()
    step_ms = (time.perf_counter() - t) * 1e3 / args.steps
    print(f"# the whole training step without timers: {step_ms:.2f} ms")

    op_times: dict = collections.defaultdict(list)
    timer = _OpTimer(op_times)

    def on():
        timer.on = True

    def off():
        timer.on = False

    with timer:
        step = make_step(model, conv2, x, y, on, off)
        for _ in range(args.warmup):
            step()
        op_times.clear()
        for _ in range(args.steps):
            step()
    ops = table(
        op_times,
        args.steps,
        "Ops dispatched in conv2's forward and backward (a reuse:: row includes the ATen ops it calls "
        "inside; the aten:: rows are the ops the chain and its backward formulas call outside them)",
        args.limit,
    )

    kernels = []
    module = extension.get()
    if module is None:
        print("\nC++ kernels off (REUSE_COMPILER_EXTENSION=0 or the build failed): no kernel table")
    else:
        k_times: dict = collections.defaultdict(list)
        step = make_step(model, conv2, x, y)
        for _ in range(args.warmup):
            step()
        with _KernelTimer(module, k_times):
            for _ in range(args.steps):
                step()
        kernels = table(k_times, args.steps, "C++ kernel calls (runtime/csrc/reuse_kernels.cpp), no dispatch")
    return {"step_ms": step_ms, "ops": ops, "kernels": kernels}


if __name__ == "__main__":
    main()
