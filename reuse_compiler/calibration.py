"""The measured policy: order and filter each layer's candidates by time on this device.

Policy 3 orders candidates by the paper's FLOP model (Eq. 21-23). On a CPU, where the
GEMM runs near peak and the gathers do not, that model mispredicts which stages are
cheaper than the exact convolution. With ``ReuseConfig(policy="measured")``,
``reuse_compile`` times, for every rewritable layer, the exact convolution and each
candidate (forward + backward on the layer's real input from the example batch, median of
``calibration_repeats`` runs after one warm-up), keeps the candidates that are faster than
exact (and, with ``max_error``, whose relative output error on that input is at most
``max_error``), and orders them by measured time (fastest, i.e. most aggressive, first). A
layer with no such candidate stays exact and the plan says why. The input gradient is timed
only where training computes one (not for a layer fed by the batch itself). Timings are
cached on disk per device, shape and stage (``$REUSE_COMPILER_CACHE`` or
``~/.cache/reuse_compiler/calibration.json``), so a second compile of the same model is
instant.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx

from reuse_compiler.runtime import extension, kernels
from reuse_compiler.runtime.ops import conv_pool, conv_pool_runs, im2col, reuse_conv2d, zero_skip_conv2d, zero_skip_runs
from reuse_compiler.runtime.planes import fit_to_input
from reuse_compiler.runtime.state import layer_planes

from .policies import expected_cost

__all__ = ["calibrate", "calibrate_block", "capture_conv_inputs", "cache_path"]

# Process settings that change how fast the timed calls run without changing the kernels,
# part of the cache key: a process that sets one (examples/train.py's ``tune_malloc`` adds
# "glibc malloc tuned") does not reuse timings taken without it, nor the other way round.
# (Session 23: an ad hoc process with glibc's default malloc timed conv1's exact convolution at
# 25 ms instead of 9, page-faulting its 25 MB output afresh, so conv1's stages looked faster
# than exact; the main job, tuned, would have read that entry from the cache.)
CACHE_TAGS: set[str] = set()

MAX_ROUNDS = 15  # timed rounds for a short layer (at least `calibration_repeats`)
MIN_EXACT_S = 0.1  # a short layer gets rounds until its exact convolution has run about this long


def cache_path() -> Path:
    root = os.environ.get("REUSE_COMPILER_CACHE") or Path.home() / ".cache" / "reuse_compiler"
    return Path(root) / "calibration.json"


def _device_id(t: torch.Tensor) -> str:
    if t.device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(t.device)}"
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu:{cpu}:{torch.get_num_threads()}t:ext={extension.get() is not None}"


def _cached(key: str):
    """The cache's entry for ``key`` (None if none or no readable cache)."""
    try:
        return json.loads(cache_path().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _store(key: str, result: dict) -> None:
    """Add ``result`` under ``key`` to the on-disk cache (atomically replaced)."""
    path = cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-calibration next time


def capture_conv_inputs(gm: fx.GraphModule, args: tuple, nodes: set[str]) -> dict[str, tuple[torch.Tensor, bool]]:
    """Run the traced source graph once (eval mode) and keep the inputs of ``nodes``, each with
    whether it requires grad in training (it does when it depends on a parameter that
    requires grad; a first layer's input, the batch, does not, and stock PyTorch then skips
    that layer's input gradient)."""
    captured: dict[str, tuple[torch.Tensor, bool]] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            if n.name in nodes:
                a = self.fetch_args_kwargs_from_env(n)[0]
                x = a[0] if a else n.kwargs["input"]
                captured[n.name] = (x.detach(), bool(x.requires_grad))
            return super().run_node(n)

    module = fx.GraphModule(gm, gm._reuse_source)
    was = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.enable_grad():
            Capture(module).run(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    finally:
        for m, mode in was:
            m.training = mode
    return captured


def _chain(x, w, b, row, planes, centroid, norm_grad=True, per_pixel=None):
    y, parts = reuse_conv2d(
        x,
        w,
        b,
        planes,
        row.kernel_size,
        row.stride,
        row.padding,
        row.dilation,
        centroid=centroid,
        keep_parts=False,
        norm_grad=norm_grad,
        per_pixel=per_pixel,
    )
    return y, parts["counts"]


def _trained(b):
    """A fresh leaf of bias ``b`` that requires grad, as a trained layer's bias does (so that the
    timed backward computes its gradient, as training's does), or None."""
    return None if b is None else b.detach().requires_grad_()


def _stage_fn(x, w, b, row, planes, centroid, input_grad=True, norm_grad=True, per_pixel=None):
    def run():
        xx, ww = x.detach().requires_grad_(input_grad), w.detach().requires_grad_()
        y, _ = _chain(xx, ww, _trained(b), row, planes, centroid, norm_grad, per_pixel)
        y.backward(torch.ones_like(y))

    return run


# The per-pixel chain is kept unless the generic chain times at most this fraction of it: a
# tie (within the machine's noise) keeps the per-pixel one, which holds less memory.
GENERIC_MARGIN = 0.95


def _pixel_fits(row, cg: int, L: int) -> bool:
    """Whether the rewrite would emit the per-pixel chain for stage L of ``row`` (scope "batch",
    as the calibration runs it)."""
    return kernels.use_pixel_chain(cg, L, list(row.stride), list(row.kernel_size), "batch")


def _exact_out(x, w, b, row):
    """The exact layer as the model runs it: F.conv2d with its own padding (symmetric), else
    after F.pad. (Until session 13 always after F.pad: on CifarNet conv2, channels-last, that
    took ~1.2x the convolution's own time and made every candidate's ratio look smaller.)"""
    t, bo, left, r = row.padding
    if t == bo and left == r:
        return F.conv2d(x, w, b, stride=row.stride, padding=(t, left), dilation=row.dilation)
    return F.conv2d(F.pad(x, (left, r, t, bo)), w, b, stride=row.stride, dilation=row.dilation)


def _exact_fn(x, w, b, row, input_grad=True):
    def run():
        y = _exact_out(x.detach().requires_grad_(input_grad), w.detach().requires_grad_(), _trained(b), row)
        y.backward(torch.ones_like(y))

    return run


# An exact layer is timed with the zero-skipping weight gradient too where at least this
# fraction of its input (on the example batch) equals its channel's most common value: below
# it the skipped products do not pay for the kernel's per-input loop (docs/policies.md,
# "Zero-skipping exact layers").
ZERO_SKIP_MIN_SHARE = 0.5


def common_values(x: torch.Tensor) -> tuple[list[float], float]:
    """Each channel's most common value in ``x`` (N, C, H, W), and the share of ``x``'s entries
    equal to their channel's: the values the zero-skipping weight gradient skips (zero after a
    ReLU; a normalised digit's blank pixel)."""
    per_channel = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
    values = []
    hits = 0
    for row in per_channel:
        u, counts = torch.unique(row, return_counts=True)
        i = int(counts.argmax())
        values.append(float(u[i]))
        hits += int(counts[i])
    return values, hits / max(x.numel(), 1)


def zero_skip_values(row, x: torch.Tensor) -> list[float] | None:
    """The values the measured policy times ``row``'s zero-skipping weight gradient with on its
    input ``x`` (:func:`common_values`), or None where it is not timed: groups 1, a symmetric
    padding, an input :func:`exact_conv2d` runs it on (:func:`zero_skip_runs`: float32/64 on
    the CPU, outside autocast), the C++ kernels built, and at least ``ZERO_SKIP_MIN_SHARE`` of
    ``x`` equal to its channel's common value."""
    t, bo, left, r = row.padding
    if not (
        row.groups == 1
        and t == bo
        and left == r
        and zero_skip_runs(x)
        and extension.get() is not None
        and x.numel() > 0
    ):
        return None
    values, share = common_values(x)
    return values if share >= ZERO_SKIP_MIN_SHARE else None


def _zero_skip_fn(x, w, b, row, skip, input_grad=True):
    t, _, left, _ = row.padding

    def run():
        xx, ww = x.detach().requires_grad_(input_grad), w.detach().requires_grad_()
        y = zero_skip_conv2d(xx, ww, _trained(b), list(row.stride), [t, left], list(row.dilation), skip)
        y.backward(torch.ones_like(y))

    return run


def _autocast_tag(x: torch.Tensor) -> list:
    """The autocast state the timings were taken under, for the cache key (empty without
    autocast, so float32 keys stay as they were): compiled under ``torch.autocast``, the exact
    convolution is timed in the lower precision, as training under it would run it, while the
    chain runs in float32 and casts its output (docs/architecture.md, "Mixed precision"; the
    "output cast" tag since session 25, when that cast was added: older timings are not reused)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return []
    return [("autocast", str(torch.get_autocast_dtype(dev)), "output cast")]


def _timed_rounds(fns, repeats: int, device: torch.device) -> tuple[list[list[float]], int]:
    """Each of ``fns`` timed in interleaved rounds after a warm-up round: (seconds per fn per
    round, rounds). ``fns[0]`` is the baseline: a short one gets more rounds (a few ms is within
    the machine's noise): at least ``repeats``, up to MAX_ROUNDS, about MIN_EXACT_S of its time
    in all. On CUDA the work is asynchronous: each timing waits for the device before and after."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for fn in fns:  # warm-up round
        fn()
    sync()
    t0 = time.perf_counter()
    fns[0]()
    sync()
    rounds = max(repeats, min(MAX_ROUNDS, math.ceil(MIN_EXACT_S / max(time.perf_counter() - t0, 1e-6))))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - t0)
    return times, rounds


def calibrate(
    row,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias,
    repeats: int = 3,
    centroid: str = "norm",
    input_grad: bool = True,
    seed: int = 0,
    hashing: str = "random",
    norm_grad: bool = True,
    zero_skip: bool = False,
) -> dict:
    """Time exact and every candidate of ``row`` (with the given centroid) on input ``x`` (first
    group only for grouped convs), forward + backward, in ``repeats`` interleaved rounds after a
    warm-up round (more rounds for a short layer: enough for ~0.1 s of the exact convolution,
    at most 15); the backward computes the input gradient only if ``input_grad`` (as training
    does: a first layer's input needs none), and the bias's gradient (since session 26; before,
    the bias was a constant of the timed runs, which training's is not). Returns ``{"exact_ms",
    "input_grad", "candidates": [{"L", "H", "ms", "ratio", "ratio_min", "r_c", "predicted", "error", "chain"}]}`` in the
    row's candidate order (``ms`` and ``ratio``: medians; ``ratio_min``: the fastest runs' ratio;
    ``chain``: "pixel" or "generic", which chain the stage runs: where the per-pixel chain fits
    both are timed and the generic one is kept only if it takes at most ``GENERIC_MARGIN`` of
    the per-pixel one's time, with both medians as ``ms_pixel`` and ``ms_generic``;
    ``error`` is the relative output error ||y - y_exact|| / ||y_exact|| on ``x``,
    with the layer's own hash planes for ``seed``, as are r_c and the timings; with
    ``hashing="pca"`` the planes are fitted to ``x`` as training fits them, and the fits are
    not timed: training refits every ``hash_refresh`` steps; ``norm_grad`` as in ReuseConfig).
    With ``zero_skip`` and where :func:`zero_skip_values` gives values to skip, the exact layer
    with the zero-skipping weight gradient is timed in the same rounds: ``"zero_skip": {"ms",
    "ratio", "ratio_min", "skip"}`` (else ``None``). Uses and updates the on-disk cache."""
    g = row.groups
    cg, mg = row.in_channels // g, row.out_channels // g
    # the layer's input as training sees it: same memory format (channels-last stays so)
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x = x[:, :cg].contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    w = weight.detach()[:mg]
    b = None if bias is None else bias.detach()[:mg]
    skip = zero_skip_values(row, x) if zero_skip else None
    key = json.dumps(
        [
            _device_id(x),
            torch.__version__,
            extension.fingerprint(),
            str(x.dtype),
            list(x.shape),
            "channels_last" if cl else "contiguous",
            list(w.shape),
            row.stride,
            row.padding,
            row.dilation,
            [list(c) for c in row.candidates],
            repeats,
            centroid,
            input_grad,
            seed,
            row.name,
            ("rounds", MAX_ROUNDS, MIN_EXACT_S, "ratio_min", "exact: conv2d's own padding", "bias grad"),
            ("chains", GENERIC_MARGIN),
            sorted(CACHE_TAGS),
            hashing,
            norm_grad,
            *_autocast_tag(x),
            ("zero-skip", skip),
        ]
    )
    cached = _cached(key)
    if cached is not None:
        return cached
    # each stage with the layer's own hash family (the one training will use), so r_c and the
    # error are its own; drawn once, outside the timed runs
    planes = [layer_planes(seed, row.name, L, H).to(x.device) for L, H in row.candidates]
    if hashing == "pca":
        k, st, d = list(row.kernel_size), list(row.stride), list(row.dilation)
        xp = im2col(x, k, st, list(row.padding), d)
        planes = [fit_to_input(xp, k, st, d, p) for p in planes]
    fns = [_exact_fn(x, w, b, row, input_grad)]
    fns += [_stage_fn(x, w, b, row, p, centroid, input_grad, norm_grad) for p in planes]
    # where the per-pixel chain fits, the generic chain too (appended: index -> its fn)
    generic = {}
    for i, ((L, _), p) in enumerate(zip(row.candidates, planes)):
        if _pixel_fits(row, cg, L):
            generic[i] = len(fns)
            fns.append(_stage_fn(x, w, b, row, p, centroid, input_grad, norm_grad, per_pixel=False))
    if skip is not None:  # last: index -> its fn
        zs_index = len(fns)
        fns.append(_zero_skip_fn(x, w, b, row, skip, input_grad))
    times, rounds = _timed_rounds(fns, repeats, x.device)
    exact_ms = statistics.median(times[0]) * 1e3
    out = []
    with torch.no_grad():
        y_exact = _exact_out(x, w, b, row)
        scale = float(y_exact.norm()) or 1.0
        for i, ((L, H), p) in enumerate(zip(row.candidates, planes)):
            t = times[1 + i]
            y, cnt = _chain(x, w, b, row, p, centroid)
            r_c = float(((cnt > 0).sum(1).double() / cnt.sum(1).clamp(min=1)).mean())
            ms = statistics.median(t) * 1e3
            extra = {"chain": "pixel" if i in generic else "generic"}
            if i in generic:
                tg = times[generic[i]]
                ms_generic = statistics.median(tg) * 1e3
                extra.update(ms_pixel=ms, ms_generic=ms_generic)
                if ms_generic <= GENERIC_MARGIN * ms:
                    t, ms, extra["chain"] = tg, ms_generic, "generic"
            out.append(
                {
                    "L": L,
                    "H": H,
                    "ms": ms,
                    "ratio": ms / exact_ms,
                    "ratio_min": min(t) / min(times[0]),
                    "r_c": r_c,
                    "predicted": expected_cost(L, H, mg, r_c),
                    "error": float((y - y_exact).norm()) / scale,
                    **extra,
                }
            )
    zs = None
    if skip is not None:
        t = times[zs_index]
        zs = {"ms": statistics.median(t) * 1e3, "ratio_min": min(t) / min(times[0]), "skip": skip}
        zs["ratio"] = zs["ms"] / exact_ms
    result = {"exact_ms": exact_ms, "input_grad": input_grad, "rounds": rounds, "candidates": out, "zero_skip": zs}
    _store(key, result)
    return result


def block_fits(row, x: torch.Tensor, weight: torch.Tensor, input_grad: bool) -> bool:
    """Whether ``row``'s layer and the max-pool after it can run as one op (:func:`conv_pool`):
    groups 1, stride 1, dilation 1, a symmetric padding, an input that needs no gradient in
    training, on which :func:`conv_pool_runs` (float32/64 on the CPU, outside autocast, the C++
    kernels built)."""
    t, bo, left, r = row.padding
    return (
        row.groups == 1
        and tuple(row.stride) == (1, 1)
        and tuple(row.dilation) == (1, 1)
        and t == bo
        and left == r
        and not input_grad
        and x.numel() > 0
        and conv_pool_runs(x, weight)
    )


def _block_fn(x, w, b, row, block, skip=None, fused=False):
    """Forward + backward (weight and bias gradients) of the block conv -> max-pool (-> ReLU):
    the layers as training runs them unfused (stock's conv2d, or the zero-skipping one with
    ``skip``), or in one op (``fused``)."""
    t, _, left, _ = row.padding
    pool = [block["kernel"], block["stride"], block["padding"]]

    def run():
        ww, bb = w.detach().requires_grad_(), _trained(b)
        if fused:
            y = conv_pool(x, ww, bb, [t, left], pool, block["relu"] is not None, skip)[0]
        else:
            if skip is None:
                y = F.conv2d(x, ww, bb, 1, [t, left])
            else:
                y = zero_skip_conv2d(x, ww, bb, [1, 1], [t, left], [1, 1], skip)
            y = F.max_pool2d(y, *pool)
            if block["relu"] is not None:
                y = F.relu(y)
        y.backward(torch.ones_like(y))

    return run


def calibrate_block(row, x: torch.Tensor, weight: torch.Tensor, bias, block: dict, skip, repeats: int = 3) -> dict:
    """Time ``row``'s first block (its conv, the max-pool ``block`` after it and the ReLU, if
    any; :func:`reuse_compiler.passes.analysis.pool_block`) three ways, forward + backward with
    the weight and bias gradients (the input needs none), interleaved rounds after a warm-up
    round (as :func:`calibrate`): stock's layers, the same with the zero-skipping weight
    gradient (``skip``: the common values, or None: not timed) and the block in one op
    (:func:`conv_pool`, skipping ``skip``'s values where given). Returns ``{"ms", "ms_stock",
    "ms_zero_skip", "ratio", "ratio_min", "rounds", "skip", "pool"}``: ``ratio`` the one op's
    median over stock's, ``ratio_min`` over the fastest runs. Uses and updates the on-disk
    cache."""
    w = weight.detach()
    b = None if bias is None else bias.detach()
    pool = [block["kernel"], block["stride"], block["padding"], block["relu"] is not None]
    key = json.dumps(
        [
            "conv_pool",
            _device_id(x),
            torch.__version__,
            extension.fingerprint(),
            str(x.dtype),
            list(x.shape),
            list(x.stride()),  # the layout
            list(w.shape),
            list(w.stride()),
            row.padding,
            pool,
            repeats,
            row.name,
            (MAX_ROUNDS, MIN_EXACT_S),
            sorted(CACHE_TAGS),
            skip,
        ]
    )
    cached = _cached(key)
    if cached is not None:
        return cached
    fns = [_block_fn(x, w, b, row, block), _block_fn(x, w, b, row, block, skip, fused=True)]
    if skip is not None:
        fns.append(_block_fn(x, w, b, row, block, skip))
    times, rounds = _timed_rounds(fns, repeats, x.device)
    med = [statistics.median(t) * 1e3 for t in times]
    result = {
        "ms": med[1],
        "ms_stock": med[0],
        "ms_zero_skip": med[2] if skip is not None else None,
        "ratio": med[1] / med[0],
        "ratio_min": min(times[1]) / min(times[0]),
        "rounds": rounds,
        "skip": skip,
        "pool": block,
    }
    _store(key, result)
    return result
