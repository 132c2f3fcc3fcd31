"""onnxruntime latency of CifarNet exported as "reuse" and as "exact", side by side.

    .venv/bin/python benchmarks/onnx_latency.py [--batches 1,128] [--repeats 7] [--threads 0]

Compiles CifarNet (3 x 32 x 32, the paper's CIFAR-10 setting) on a batch of --compile-batch
images, runs it once (this fixes the stage: the plan's first candidate per layer), exports
both variants with a dynamic batch, and times ``InferenceSession.run`` for every batch size:
a warm-up run each, then --repeats rounds that alternate reuse and exact (so both see the
same machine load); it prints the medians, their ratio, the onnxruntime-vs-PyTorch
difference of each variant and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reuse_compiler  # noqa: E402
from reuse_compiler.export import export_module, export_onnx, ort_session  # noqa: E402
from reuse_compiler.models import cifarnet  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,128", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per batch size (median reported)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--compile-batch", type=int, default=128, help="batch the plan (L, H) is chosen for")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be >= 5")
    batches = [int(b) for b in args.batches.split(",")]

    import onnxruntime as ort

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.compile_batch, 3, 32, 32, generator=gen)
    gm = reuse_compiler.reuse_compile(cifarnet(), x)
    gm.eval()
    with torch.no_grad():
        gm(x)  # fixes the stage and fills the plan's r_c column
    stages = ", ".join(f"{r.name} L={r.L} H={r.H} r_c={r.r_c:.4f}" for r in gm.reuse_plan if not r.exact)

    tmp = tempfile.mkdtemp(prefix="onnx_latency_")
    sessions, modules = {}, {}
    for variant in ("reuse", "exact"):
        path = os.path.join(tmp, f"cifarnet_{variant}.onnx")
        export_onnx(gm, x[:8], path, variant=variant, check=False)
        sessions[variant] = ort_session(path, threads=args.threads or None)
        modules[variant] = export_module(gm, variant).eval()

    threads = args.threads or "default"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; onnxruntime {ort.__version__} "
        f"{sessions['reuse'].get_providers()[0]}, intra-op threads {threads}; torch {torch.__version__}; "
        f"load average {load}"
    )
    print(f"model: CifarNet 3x32x32, plan for batch {args.compile_batch}: {stages}")
    print(f"median of {args.repeats} interleaved runs after one warm-up run each\n")
    print(f"{'batch':>5}  {'reuse ms':>10}  {'exact ms':>10}  {'reuse/exact':>11}  {'max|ort-torch| reuse, exact':>28}")
    for B in batches:
        xb = torch.randn(B, 3, 32, 32, generator=gen)
        feed = {"x": xb.numpy()}
        diffs = []
        for variant in ("reuse", "exact"):
            got = sessions[variant].run(None, feed)[0]  # warm-up
            with torch.no_grad():
                ref = modules[variant](xb).numpy()
            diffs.append(float(np.abs(got - ref).max()))
        times = {"reuse": [], "exact": []}
        for _ in range(args.repeats):
            for variant in ("reuse", "exact"):
                t0 = time.perf_counter()
                sessions[variant].run(None, feed)
                times[variant].append((time.perf_counter() - t0) * 1e3)
        r, e = statistics.median(times["reuse"]), statistics.median(times["exact"])
        print(f"{B:>5}  {r:>10.2f}  {e:>10.2f}  {r / e:>11.2f}  {diffs[0]:>13.1e}, {diffs[1]:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
