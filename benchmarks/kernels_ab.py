"""A/B of the C++ kernels: the source at a git revision against the working tree's, both
built and loaded side by side in one process and timed interleaved on the same inputs
(the chain's real intermediates at CifarNet conv1/conv2 shapes on the digits).

Checks that both builds agree (up to summation order), then prints, per stage, the median
ms of each kernel in each build. Used for the before/after figures of kernel changes in
docs/performance.md.

    python benchmarks/kernels_ab.py --base fae21dc
    python benchmarks/kernels_ab.py --base HEAD~3 --stages conv2:32,8 conv1:25,13 --repeats 15
    python benchmarks/kernels_ab.py --base HEAD~1 --stages conv2:64,8 --hashing pca
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.train import load_digits, tune_malloc  # noqa: E402
from reuse_compiler.runtime import extension, kernels  # noqa: E402
from reuse_compiler.runtime.ops import _padded_geometry  # noqa: E402
from reuse_compiler.runtime.planes import fit_to_input  # noqa: E402
from reuse_compiler.runtime.reference import lsh_planes  # noqa: E402

SRC = "runtime/csrc/reuse_kernels.cpp"


def build(source: str, tag: str):
    from torch.utils import cpp_extension

    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / f"reuse_kernels_ab_{digest}.cpp"
    path.write_text(source)
    return cpp_extension.load(
        name=f"reuse_kernels_ab_{tag}_{digest}",
        sources=[str(path)],
        extra_cflags=extension.CFLAGS,
        extra_ldflags=extension.LDFLAGS,
    )


class Compat:
    """A build of an older source seen through today's calls: arguments that later versions
    appended (with defaults that keep the old behaviour) are dropped for functions that do
    not take them, and functions it lacks are the PyTorch code that ran in their place."""

    # function -> number of arguments of the older signature, when it had fewer
    TRIM = {"centroid_means": 7}  # session 13 added the interior (pt, pl, H, W)
    # functions added later -> what the runtime computed before them (session 13)
    MISSING = {
        "unit_rows": kernels.unit_rows_torch,
        "unit_rows_backward": kernels.unit_rows_backward_torch,
        "pad_nhwc": kernels.pad_nhwc_torch,
    }

    def __init__(self, module):
        self._m = module

    def __getattr__(self, name):
        if not hasattr(self._m, name) and name in self.MISSING:
            return self.MISSING[name]
        fn = getattr(self._m, name)
        n = self.TRIM.get(name)
        # asked once per lookup: a failed pybind call would cost ~15 ms (it formats its tensors)
        if n is None or f"arg{n}" in (fn.__doc__ or ""):
            return fn
        return lambda *args: fn(*args[:n])


def base_and_tree(base: str) -> dict:
    """{"base": the kernels at git revision ``base`` (through :class:`Compat`), "tree": the
    working tree's}, both built and loaded."""
    old_src = subprocess.run(["git", "show", f"{base}:{SRC}"], cwd=ROOT, check=True, capture_output=True, text=True)
    return {"base": Compat(build(old_src.stdout, "base")), "tree": build((ROOT / SRC).read_text(), "tree")}


def inputs(layer: str, L: int, H: int, hashing: str = "random"):
    """The chain's intermediates for one stage on the digits (conv2: on conv1's pooled output),
    hashed with random planes or (``hashing="pca"``) planes fitted to the input as the main job's."""
    (x_tr, _), _ = load_digits(0.2, 0)
    torch.manual_seed(0)
    x = x_tr[:128].contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(64, 1, 5, 5) * 0.2
    if layer == "conv2":
        x = F.max_pool2d(F.relu(F.conv2d(x, w1, padding=2)), 2).contiguous(memory_format=torch.channels_last)
    ops = torch.ops.reuse
    k, s, p, d = [5, 5], [1, 1], [2, 2, 2, 2], [1, 1]
    xp = ops.im2col(x, k, s, p, d)
    planes = lsh_planes(L, H, 0)
    if hashing == "pca":
        planes = fit_to_input(xp, k, s, d, planes)
    ids = ops.lsh_hash(xp, planes, k, s, d)
    g = _padded_geometry(xp.shape, k, s, d, L)
    inv, cnt = kernels.compact(ids, H, "batch")
    keys = kernels.slot_keys(ids, inv, cnt) if g.kind == "chunk" else None
    return xp, inv, cnt, g, keys, (p[0], p[2], x.shape[2], x.shape[3])


def ab_stage(builds: dict, layer: str, L: int, H: int, repeats: int, hashing: str = "random") -> str:
    """One line: each kernel's median ms in the base and the tree build at this stage."""
    xp, inv, cnt, g, keys, interior = inputs(layer, L, H, hashing)
    nb, cmax = cnt.shape
    V = inv.reshape(nb, -1).contiguous()
    gen = torch.Generator().manual_seed(1)
    yc = torch.randn(nb, cmax, 64, generator=gen)
    dy = torch.randn(V.shape[1], 64, generator=gen)
    scales = torch.rand(V.shape, generator=gen)
    dcent = torch.randn(nb, cmax, g.L, generator=gen)
    planes = lsh_planes(L if g.kind == "chunk" else g.C, H, 0)
    units = xp.reshape(-1, planes.shape[0])

    def calls(m):
        def hash_pixels():  # chunk blocks: every pixel chunk hashed (a matmul and packing before hash_rows)
            if hasattr(m, "hash_rows"):
                return m.hash_rows(units, planes)
            return kernels._pack_last(kernels._project(units, planes))

        def means(keys=None, mode=2):  # per-row kernels by default; the chunk path as the chain takes it
            return m.centroid_means(xp, inv, cnt, g.vector(), g.pieces_tensor(), keys, mode, *interior)

        def chunk_means_bwd():  # writing x's gradient, as the chain does for a channels-last x
            return m.centroid_means_backward(dcent, inv, cnt, g.vector(), g.pieces_tensor(), keys, 1, *interior)

        return {
            "hash (chunk)": hash_pixels,
            "chunk sums": lambda: means(keys, 1),
            "chunk sums bwd": chunk_means_bwd,
            "member norms": lambda: m.member_norms(xp, g.vector(), g.pieces_tensor(), g.nb),
            "centroid sums": means,
            "reconstruct": lambda: m.reconstruct(yc, V, None, scales),
            "reconstruct bwd": lambda: m.reconstruct_backward(dy, V, cmax, scales),
            "scaled bwd (2 grads)": lambda: m.reconstruct_backward_scaled(dy, yc, V, scales),
        }

    fns = {tag: calls(m) for tag, m in builds.items()}
    if g.kind != "chunk":
        for f in fns.values():
            del f["hash (chunk)"], f["chunk sums"], f["chunk sums bwd"]
    for name in fns["base"]:
        a, b = fns["base"][name](), fns["tree"][name]()
        for u, v in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
            torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-3, msg=f"{layer} L={L} H={H} {name}: builds disagree")
    times = {(tag, name): [] for tag in fns for name in fns[tag]}
    for _ in range(repeats):
        for tag in fns:
            for name, fn in fns[tag].items():
                t0 = time.perf_counter()
                fn()
                times[(tag, name)].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    cells = "  ".join(f"{name} {med[('base', name)]:.2f} -> {med[('tree', name)]:.2f}" for name in fns["base"])
    return f"{layer} L={L} H={H} (nb={nb}, Cmax={cmax}): {cells}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision whose kernels are the baseline")
    ap.add_argument(
        "--stages",
        nargs="+",
        default=["conv1:25,13", "conv1:5,10", "conv2:1600,8", "conv2:320,8", "conv2:64,8", "conv2:32,8", "conv2:8,14"],
    )
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--hashing", default="random", choices=["random", "pca"], help="pca: planes fitted to the input")
    args = ap.parse_args(argv)
    tune_malloc()
    builds = base_and_tree(args.base)
    print(f"# kernels A/B: {args.base} (base) vs the working tree (tree); medians of {args.repeats}, ms")
    for stage in args.stages:
        layer, lh = stage.split(":")
        L, H = (int(v) for v in lh.split(","))
        print(ab_stage(builds, layer, L, H, args.repeats, args.hashing), flush=True)


if __name__ == "__main__":
    main()
