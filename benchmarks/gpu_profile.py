"""Where the reuse chain's time goes on a GPU, for CifarNet's conv2 shape: (1) stock cuDNN
vs reuse forward+backward as the batch grows, with the GPU's busy time against the wall time
(a chain bound by launches and host waits would keep its wall time as the batch grows, one
bound by its kernels grows with it); (2) a torch.profiler table of one
reuse forward+backward (the ops by self CUDA time and by self CPU time, and the host syncs).

    python benchmarks/gpu_profile.py                 # on a GPU machine (benchmarks/gpu_check.sh)

Synthetic post-ReLU inputs, channels-last, random planes; medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ops import time_round_robin  # noqa: E402
from reuse_compiler.runtime.ops import reuse_conv2d  # noqa: E402
from reuse_compiler.runtime.reference import lsh_planes  # noqa: E402

C, M, HW, K = 64, 64, 14, 5  # CifarNet conv2: 64 -> 64 channels, 14x14, 5x5, padding 2


def inputs(batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = F.relu(torch.randn(batch, C, HW, HW, generator=g)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(M, C, K, K, generator=g) * (2 / (C * K * K)) ** 0.5).to(device)
    return x, w, torch.zeros(M, device=device)


def step(x, w, b, planes=None):
    """One forward+backward (input and weight gradients); stock F.conv2d without planes."""

    def run():
        xx = x.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        if planes is None:
            y = F.conv2d(xx, ww, b, padding=2)
        else:
            y, _ = reuse_conv2d(xx, ww, b, planes, [K, K], [1, 1], [2, 2, 2, 2], [1, 1], keep_parts=False)
        y.backward(torch.ones_like(y))

    return run


def profiled(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def gpu_busy_ms(ka) -> float:
    """The device time of one call's kernels and copies (the profiler table's "Self CUDA time
    total": device-side events only, so an op and the kernel it launched count once)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in ka if e.device_type == DeviceType.CUDA) / 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default="128,512,2048")
    ap.add_argument("--stages", default="64,8;1600,8;8,14", help="'L,H;L,H;...' reuse stages to time")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    sync = torch.cuda.synchronize if dev == "cuda" else None
    stages = [tuple(int(v) for v in s.split(",")) for s in args.stages.split(";")]
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"# gpu_profile on {name}, torch {torch.__version__}; CifarNet conv2 shape, medians of {args.repeats}")
    print("\n| batch | variant | fwd+bwd ms | x stock | GPU busy ms | busy / wall |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in (int(v) for v in args.batches.split(",")):
        x, w, b = inputs(batch, dev)
        fns = {"stock fp32": step(x, w, b)}
        for L, H in stages:
            fns[f"reuse L={L},H={H}"] = step(x, w, b, lsh_planes(L, H, seed=1).to(dev))
        ms = {k: statistics.median(v) for k, v in time_round_robin(fns, args.repeats, sync=sync).items()}
        for key, t in ms.items():
            busy = gpu_busy_ms(profiled(fns[key])) if dev == "cuda" else float("nan")
            print(f"| {batch} | {key} | {t:.2f} | {t / ms['stock fp32']:.2f} | {busy:.2f} | {busy / t:.2f} |")
        sys.stdout.flush()
    if dev != "cuda":
        return
    for batch, (L, H), cpu_too in ((128, stages[0], True), (2048, stages[1 % len(stages)], False)):
        x, w, b = inputs(batch, dev)
        ka = profiled(step(x, w, b, lsh_planes(L, H, seed=1).to(dev)))
        print(f"\n## one reuse forward+backward, L={L}, H={H}, batch {batch}: top ops by self CUDA time")
        print(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=48))
        if cpu_too:
            print("## top ops by self CPU time")
            print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))
        syncs = {e.key: e.count for e in ka if "Synchronize" in e.key or "Memcpy" in e.key or "item" in e.key}
        print("host syncs and copies:", syncs)


if __name__ == "__main__":
    main()
