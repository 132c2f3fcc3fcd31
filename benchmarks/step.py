"""Training-step benchmark: one whole step of the main job's model (forward, loss, backward,
Adam), stock vs reuse, time and peak memory measured in one run.

The model and data are the main job's (``examples/train.py``: CifarNet on the real digits,
batch 128, channels-last, Adam 1e-3). Variants, timed interleaved round-robin after
warm-up steps, medians of ``--repeats`` rounds of ``--steps`` steps each:

- stock fp32 (the baseline every ratio divides by), and stock fp32 with the model and batch
  in NCHW memory (the default layout: it shows whether channels-last, the main job's layout
  for both runs, is stock's faster one here);
- stock and the main job's reuse model with the forward under bfloat16 autocast (mixed
  precision; the reuse chain itself runs in float32 there, docs/architecture.md);
- reuse with the main job's default config at its first stages (measured policy, extended
  L values, norm centroid, fitted hash planes, max error 0.32, the member norms constant in
  the backward; since session 29 its first block, conv1 + pool1 + ReLU, in one op), the
  same without that fused block (session 28's main job), the same with the norms' gradient;
  the same with random planes
  and no error filter (session 10's main job), and with the paper's L values
  (``--l-values fast``);
- the random-planes model with every layer set exact (the rewrite's cost when it does not
  reuse).

With fitted planes a step refits each reused layer's planes every 20 steps (~2-9 ms); the
timed rounds include the refits that fall in them.

"peak" is the peak memory one step allocates above what was allocated before it
(``benchmarks.layers.memory_peaks``, from the profiler's memory timeline): parameters,
Adam's state, the batch and anything else that existed before the step are excluded; the
previous step's gradients are cleared before the measured step, so the step's own
gradients count. It is the figure the issue's "peak training memory" target is about;
unlike the per-layer benchmark it includes every layer and the optimizer. "peak incl.
pre-existing" adds the pre-existing tensors the step uses (parameters, Adam's state, the
batch; what this benchmark printed as its peak before).

    python benchmarks/step.py
    python benchmarks/step.py --repeats 9 --steps 4
    python benchmarks/step.py --device cuda --malloc default   # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/step.py --force 32,8 32,13   # also conv2 at later candidates of its walk

With ``--device cuda`` each timed step ends with a device synchronisation, the stages are
the ones the measured policy times on that device, and one more variant forces the CPU main
job's stages (conv1 exact, conv2 L=64 H=8) to show what reuse costs there when it runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.layers import machine, machine_phase, memory_peaks  # noqa: E402
from benchmarks.ops import time_round_robin  # noqa: E402
from examples.train import DEFAULT_MAX_ERROR, MODELS, load_digits, make_adam, tune_malloc  # noqa: E402
from reuse_compiler import ReuseConfig, reuse_compile, set_stage  # noqa: E402
from reuse_compiler.plan import exact_stage  # noqa: E402


def parse_stage(ap, option: str, text: str) -> tuple[int, int]:
    """A stage ``L,H`` given to ``option`` as ``(L, H)``; otherwise a usage error of ``ap``."""
    try:
        L, H = (int(v) for v in text.split(","))
    except ValueError:
        ap.error(f"{option}: expected L,H (two integers), got {text!r}")
    return L, H


def stage_of(row) -> str:
    """A plan row's stage: ``exact``, ``exact, zero-skip`` (its weight gradient skipping its
    input's common value, docs/policies.md), ``exact, fused with pool1`` (in one op with the
    max-pool after it) or ``L=64 H=8``."""
    if row.exact:
        return exact_stage(row)
    return f"L={row.L} H={row.H}"


def stages(gm) -> str:
    """A compiled model's stages, one per layer: ``conv1 exact, zero-skip; conv2 L=64 H=8``."""
    return "; ".join(f"{r.name} {stage_of(r)}" for r in gm.reuse_plan)


def time_interleaved(steps: dict, repeats: int, n: int, warmup: int = 2) -> dict:
    """Call each of ``steps`` (name -> callable) ``warmup`` times (Adam's state, the kernels'
    first calls), then time them round-robin: ``repeats`` rounds of ``n`` calls each. Returns
    name -> ms per call, one value per round (``benchmarks.ops.time_round_robin``)."""
    return time_round_robin(steps, repeats, n, warmup)


def make_step(model, x, y, adam: str = "foreach", sync: bool = False, autocast: bool = False):
    """One training step of the main job (its Adam, ``examples.train.make_adam``); with
    ``sync`` it waits for the device at its end (so a timed step is the step's whole work);
    with ``autocast`` the forward and loss run under bfloat16 autocast (the backward after it,
    as PyTorch's mixed-precision recipe has it)."""
    opt = make_adam(model.parameters(), 1e-3, adam)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sync:
            torch.cuda.synchronize()

    step.optimizer = opt  # for clearing the gradients before a measured step
    return step


def main_job_batch(batch_size: int = 128, device: str = "cpu"):
    """The main job's first batch of seed 0 ``(x, y)``, ``x`` in channels-last memory, after
    ``torch.manual_seed(0)`` (the benchmarks then build their models from that state)."""
    torch.manual_seed(0)
    (x_tr, y_tr), _ = load_digits(0.2, 0)
    x = x_tr[:batch_size].to(device).contiguous(memory_format=torch.channels_last)
    return x, y_tr[:batch_size].to(device)


def main_job_compiled(batch_size: int = 128, norm_grad: bool = False):
    """The main job's first batch (seed 0, channels-last), a fresh stock CifarNet and a copy
    compiled with the main job's reuse config (``norm_grad=True``: with the norms' gradient,
    the library's default): ``(x, y, stock, gm)``, for the A/B scripts."""
    x, y = main_job_batch(batch_size)
    stock = MODELS["cifarnet"]().to(memory_format=torch.channels_last)
    config = ReuseConfig(
        policy="measured", l_values="extended", hashing="pca", max_error=DEFAULT_MAX_ERROR, norm_grad=norm_grad
    )
    return x, y, stock, reuse_compile(copy.deepcopy(stock), x, config=config)


def print_ab(times: dict, title: str, phase: str, base: str, new: str, label: str) -> dict:
    """The A/B scripts' report of ``time_interleaved``'s ``times`` (a "stock" variant among
    them): a table of median step ms and ratios to stock, then ``new`` against ``base`` (the
    medians' ratio, and per round, paired). ``title`` heads it; ``phase`` is the machine's
    before the timing. Returns the medians."""
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"# {title}")
    print(f"# machine phase: {phase} before, {machine_phase()} after")
    print("| variant | step ms | x stock |")
    print("|---|---:|---:|")
    for name in times:
        print(f"| {name} | {med[name]:.1f} | {med[name] / med['stock']:.3f} |")
    a, b = med[base], med[new]
    paired = sorted(t / s for t, s in zip(times[new], times[base]))
    q = len(paired) // 4
    print(
        f"# reuse step, {label}: {b / a:.3f}x ({a - b:+.1f} ms per step); per round, paired: "
        f"median {statistics.median(paired):.3f}x, quartiles {paired[q]:.3f}-{paired[-1 - q]:.3f}"
    )
    return med


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--malloc", default="tuned", choices=["tuned", "default"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--force",
        nargs="+",
        default=None,
        metavar="L,H",
        help="also the main job's model with conv2 forced to each of these stages (the stages its "
        "controller could walk to, e.g. 32,8 32,13; conv1 as the measured policy keeps it); on cuda "
        "default 64,8, the CPU main job's stage (the measured policy keeps no stage there)",
    )
    args = ap.parse_args(argv)
    dev = args.device
    force = [parse_stage(ap, "--force", f) for f in args.force or (["64,8"] if dev == "cuda" else [])]
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    malloc = "tuned" if args.malloc == "tuned" and tune_malloc() else "default"
    x, y = main_job_batch(args.batch_size, dev)
    base = MODELS["cifarnet"]().to(dev, memory_format=torch.channels_last)

    models = {"stock fp32": copy.deepcopy(base)}
    # the baseline's layout is stock's faster one: the same stock model and batch in NCHW memory
    nchw = "stock fp32, NCHW (model and batch; every other row channels-last)"
    models[nchw] = copy.deepcopy(base).to(memory_format=torch.contiguous_format)
    # mixed precision: stock under bfloat16 autocast (its convolutions and linear layers in
    # bfloat16), and below the main job's reuse model under it (its chain runs in float32, its output in bfloat16)
    bf16 = "stock under bfloat16 autocast"
    models[bf16] = copy.deepcopy(base)
    autocast_rows = {bf16}
    configs = (
        (
            "reuse (main job: fitted planes, max error 0.32, norms constant in the backward)",
            dict(hashing="pca", max_error=DEFAULT_MAX_ERROR, norm_grad=False),
            False,
        ),
        (
            "reuse (the main job without the fused first block, session 28's)",
            dict(hashing="pca", max_error=DEFAULT_MAX_ERROR, norm_grad=False, fuse_pool=False),
            False,
        ),
        ("reuse (the same with the norms' gradient)", dict(hashing="pca", max_error=DEFAULT_MAX_ERROR), False),
        ("reuse (random planes, session 10's main job)", dict(), True),
        ("reuse (random planes, --l-values fast)", dict(l_values="fast"), False),
    )
    for name, kw, with_exact in configs:
        config = ReuseConfig(**{"policy": "measured", "l_values": "extended", **kw})
        gm = reuse_compile(copy.deepcopy(base), x, config=config)
        models[f"{name}: {stages(gm)}"] = gm
        if name.startswith("reuse (main job"):
            main_job = gm
            auto = f"{name}, under bfloat16 autocast"
            models[auto] = copy.deepcopy(gm)
            autocast_rows.add(auto)
        if with_exact:
            exact = copy.deepcopy(gm)
            set_stage(exact, exact=True)
            models[f"{name}, every layer exact"] = exact
    for L, H in force:  # conv2 forced (on cuda the measured policy may keep no stage at all)
        if dev == "cpu":  # a copy of the main job's model (its conv2 runs with reuse: any stage can be set)
            gm = copy.deepcopy(main_job)
        else:  # the paper's policy: the measured one keeps conv2 exact there, with no stage to set
            gm = reuse_compile(copy.deepcopy(base), x, config=ReuseConfig(hashing="pca", norm_grad=False))
            set_stage(gm, exact=True)
        set_stage(gm, "conv2", L=L, H=H, exact=False)
        models[f"reuse (fitted planes, norms constant), forced: {stages(gm)}"] = gm

    phase_before = machine_phase()
    steps = {
        name: make_step(m, x.contiguous() if name == nchw else x, y, sync=dev == "cuda", autocast=name in autocast_rows)
        for name, m in models.items()
    }
    times = time_interleaved(steps, args.repeats, args.steps)
    peaks, peaks_pre = {}, {}
    for name, fn in steps.items():
        fn.optimizer.zero_grad(set_to_none=True)  # the previous step's gradients: not part of "before"
        peaks[name], peaks_pre[name] = memory_peaks(fn, dev)

    base_ms = statistics.median(times["stock fp32"])
    print(
        f"# training step of examples/train.py's CifarNet (batch {args.batch_size}, channels-last, Adam) on "
        f"{machine(dev)}; malloc {malloc}; medians of {args.repeats} interleaved rounds of {args.steps} steps"
    )
    print(f"# machine phase (benchmarks/layers.py machine_phase): {phase_before} before, {machine_phase()} after")
    print(
        "# peak: the peak memory one step allocates above what was allocated before it (parameters, Adam's "
        "state and the batch excluded; the step's gradients included); incl. pre-existing: plus the "
        "pre-existing tensors the step uses"
    )
    print("| variant | step ms | step x | peak MB | peak x | peak incl. pre-existing MB | x |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in steps:
        ms = statistics.median(times[name])
        print(
            f"| {name} | {ms:.1f} | {ms / base_ms:.2f} | {peaks[name] / 2**20:.1f} | "
            f"{peaks[name] / peaks['stock fp32']:.2f} | {peaks_pre[name] / 2**20:.1f} | "
            f"{peaks_pre[name] / peaks_pre['stock fp32']:.2f} |"
        )


if __name__ == "__main__":
    main()
