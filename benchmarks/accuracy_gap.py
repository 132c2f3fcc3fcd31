"""Accuracy benchmark: where the reuse run's accuracy gap to stock comes from.

The main job's data, model, initial weights, data order and optimizer (``examples/train.py``:
4,000 real digits, batch 128, channels-last, Adam 1e-3, the main job's reuse config) trained
under several variants, one after the other, with the reused layers' stages fixed (no
controller: the main job's controller keeps its first stage on CifarNet anyway). Variants:

- ``stock``: the uncompiled model;
- ``reuse``: the compiled model as the main job trains it;
- ``fwd``: the reuse chain's output values, the exact convolution's gradients
  (``y = exact + (reuse - exact).detach()`` at every reused layer);
- ``bwd``: the exact convolution's output values, the reuse chain's gradients
  (``y = reuse + (exact - reuse).detach()``);
- ``sumscale``: the norm centroid's outputs scaled per cluster by |mean| / mean ||x||, so that
  a cluster's outputs sum to those of its members' mean (as the paper's mean centroid);
- ``stunit``: the norm centroid's unit centroids with the centroid norm a constant of the
  backward (the input gradient is not projected off the centroid's direction);
- ``stage:L:H``: ``reuse`` with ``--layer`` fixed at (L, H), reused even where the measured
  policy keeps it exact (then compiled with the paper's policy, the other layers pinned at
  their measured stages);
- ``refresh:N``: ``reuse`` with the hash planes refitted every N training steps (the main
  job's default: 20);
- ``warmup:S``: ``reuse`` with the reused layers exact for the first S training steps (an
  epoch is 31 steps);
- ``vq``: ``reuse`` with the cluster ids from a codebook instead of sign bits (an experiment,
  session 16; :func:`vector_quantised`): a sub-vector's id is its nearest of 2^H - 1 k-means
  centroids in the space of the H leading principal directions of the unit sub-vectors
  (zero sub-vectors keep id 0), refitted with the planes (warm-started). At the same table
  size it lowers conv2's output error about as much as 3 more hash bits; only layers on the
  chunk path (one pixel's channel chunk, as the main job's conv2) use it.
- ``tail:E``: ``reuse`` for the first E epochs, then every reused layer exact (an
  experiment, session 19): whether a few exact epochs at the end lift the reuse run to stock's
  accuracy sooner than more reuse epochs do (the time is estimated from the epochs' costs).
- ``dither:E``: ``reuse`` with the fitted planes turned by a fresh random rotation of their
  own span at every training forward (an experiment, session 18; :func:`dithered`): the
  cells move from step to step, so the quantisation error changes every step instead of
  staying fixed between refits. E = 0: a uniformly random rotation; E > 0: orth(I + E * G),
  G Gaussian, a smaller turn.

Accuracy is the test accuracy of the trained weights in the stock model (exact
convolutions), after every epoch. The figure of merit is its mean over the second half of
training (epochs 6-12 of 12), which is less noisy than one epoch on a 1,000-digit test split.
With ``--epochs`` above 12 the report adds, against ``stock`` (or the first variant): each
variant's mean per epoch window (6-12, then 6 epochs each: 13-18, 19-24, ...) with its
difference and the number of seeds below; the median training loss at each window's end;
and per seed the first epoch at which each run reaches stock's epoch-12 accuracy. With
``--epoch-ratios REUSE EXACT`` (any number of epochs) it also estimates, for ``reuse`` and ``tail:E``, the
end-to-end figure (time to stock's epoch-12 accuracy over stock's) from those epoch counts,
with a reuse epoch REUSE and an exact one EXACT of a stock epoch: arithmetic on measured
epoch ratios, not a timing (benchmarks/end_to_end.py times it).
``--report-only`` prints the report of a saved ``--out`` JSON without training.
Timing is not measured here (the variants with an exact convolution beside the chain are
slower by construction). Deterministic: a variant's curves repeat exactly.

    python benchmarks/accuracy_gap.py --seeds 7 1 5 2 --variants stock reuse fwd bwd
    python benchmarks/accuracy_gap.py --seeds 7 1 5 --variants stage:64:9 stage:64:10
    python benchmarks/accuracy_gap.py --seeds 7 1 5 2 0 3 4 6 8 --variants dither:0 dither:0.3
    python benchmarks/accuracy_gap.py --model alexnet --epochs 4 --variants stock reuse --norm-grad on
    python benchmarks/accuracy_gap.py --model alexnet --epochs 4 --variants stock reuse --freeze features.0 features.3
    python benchmarks/accuracy_gap.py --out runs/gap_s16/long24.json --report-only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pixel_ab import generic_copy  # noqa: E402
from examples.train import DEFAULT_MAX_ERROR, MODELS, evaluate, load_digits, make_adam, train_steps  # noqa: E402
from reuse_compiler import ReuseConfig, reuse_compile, set_stage  # noqa: E402
from reuse_compiler.runtime import kernels as _kernels  # noqa: E402
from reuse_compiler.runtime import planes as _planes  # noqa: E402
from reuse_compiler.runtime.ops import UNIT_EPS  # noqa: E402


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def _replace_uses(gm, node, build) -> None:
    """Insert ``build(graph)`` before ``node``'s first user and make every user read it."""
    g = gm.graph
    users = list(node.users)
    order = {n: i for i, n in enumerate(g.nodes)}
    with g.inserting_before(min(users, key=order.__getitem__)):
        out = build(g)
    for u in users:
        u.replace_input_with(node, out)


def _mix(gm, base: str, values: str) -> None:
    """At the chain ``base``: output values of ``values`` ("reuse" or "exact"), gradients of
    the other."""
    xp, y, yc = _node(gm, f"{base}_xp"), _node(gm, f"{base}_y"), _node(gm, f"{base}_yc")
    x, (_, stride, pad, dil) = xp.args[0], xp.args[1:]
    padding = [pad[0], pad[2]]  # im2col's (top, bottom, left, right); symmetric for Conv2d

    def build(g):
        ex = g.call_function(F.conv2d, (x, yc.args[1], y.args[2], stride, padding, dil))
        keep, other = (y, ex) if values == "reuse" else (ex, y)
        delta = g.call_method("detach", (g.call_function(torch.sub, (keep, other)),))
        return g.call_function(torch.add, (other, delta))

    _replace_uses(gm, y, build)


def _sum_scale(centroids, inverse, counts, norms):
    """Per cluster |mean| / mean ||x|| (<= 1), a constant of the backward."""
    nb, cmax, _ = centroids.shape
    s = torch.zeros(nb, cmax, dtype=norms.dtype).scatter_add_(1, inverse.reshape(nb, -1).long(), norms.reshape(nb, -1))
    mean_norm = s / counts.reshape(nb, cmax).clamp_min(1)
    return (centroids.norm(dim=2) / mean_norm.clamp_min(1e-12)).clamp(max=1).unsqueeze(-1).detach()


def _scale_sums(gm, base: str) -> None:
    """The ``sumscale`` edit; needs the generic chain's per-row inverse (``build`` rebuilds a
    per-pixel chain as the generic one first: ``pixel_ab.generic_copy``)."""
    if not any(n.name == f"{base}_inverse" for n in gm.graph.nodes):
        raise ValueError(f"sumscale: the chain {base!r} has no per-row inverse (a per-pixel chain); rebuild it generic")
    yc = _node(gm, f"{base}_yc")
    args = tuple(_node(gm, f"{base}_{k}") for k in ("centroids", "inverse", "counts", "norms"))
    _replace_uses(gm, yc, lambda g: g.call_function(torch.mul, (yc, g.call_function(_sum_scale, args))))


def _unit_norm_constant(c):
    """unit_rows with the centroid's norm a constant of the backward: no projection."""
    return c / c.norm(dim=-1, keepdim=True).clamp_min(UNIT_EPS).detach()


@contextlib.contextmanager
def vector_quantised(iters: int = 10, first_iters: int = 15):
    """While active, chunk-path cluster ids come from a k-means codebook (the ``vq`` variant).

    A fit (``planes.fit_planes``, as often as the layer refits its planes) returns the H
    leading principal directions P of the sample's unit sub-vectors as the "planes" and runs
    Lloyd's k-means on the projections u @ P: ``first_iters`` iterations from a seeded
    sample the first time, then ``iters`` from the previous codebook (carried into the new
    basis). The hash (``kernels._hash_rows``) gives a non-zero sub-vector x id
    1 + argmin_j ||x / ||x|| @ P - c_j|| and a zero one id 0, so ids stay in [0, 2^H) and
    zero padding keeps its exact cluster. Yields a dict whose "calls" counts hashes done."""
    books: dict = {}
    state = {"calls": 0}
    fit0, hash0 = _planes.fit_planes, _kernels._hash_rows

    def nearest(z, c):  # the fit's assignment and the hash: index of the nearest codeword
        return (z @ c.T - 0.5 * (c * c).sum(1)).argmax(1)

    def fit(rows, H, fallback, seed=0):
        L = rows.shape[1]
        nz = rows[rows.abs().amax(1) > 0]
        if L < H or nz.shape[0] < 2**H:
            return fit0(rows, H, fallback, seed)
        unit = nz / nz.norm(dim=1, keepdim=True)
        P = _planes.largest_entry_positive(_planes._directions(unit, H, seed))
        z, k = unit @ P, 2**H - 1
        if (L, H) in books:
            old_p, c = books[L, H]
            c, n = c @ (old_p.T @ P), iters
        else:
            g = torch.Generator().manual_seed(seed)
            c, n = z[torch.randperm(len(z), generator=g)[:k]].clone(), first_iters
        for _ in range(n):
            a = nearest(z, c)
            sums = torch.zeros(k, H, dtype=z.dtype).index_add_(0, a, z)
            cnt = torch.bincount(a, minlength=k).to(z.dtype)[:, None]
            c = torch.where(cnt > 0, sums / cnt.clamp_min(1), c)
        books[L, H] = (P, c)
        return P.contiguous()

    def hash_rows(rows, planes):
        L, H = planes.shape
        if (L, H) not in books:
            return hash0(rows, planes)
        state["calls"] += 1
        P, c = (t.to(rows.dtype) for t in books[L, H])
        n = rows.norm(dim=1, keepdim=True)
        ids = 1 + nearest((rows @ P) / n.clamp_min(1e-12), c)
        return torch.where(n[:, 0] > 0, ids, torch.zeros_like(ids))

    _planes.fit_planes, _kernels._hash_rows = fit, hash_rows
    try:
        yield state
    finally:
        _planes.fit_planes, _kernels._hash_rows = fit0, hash0


@contextlib.contextmanager
def dithered(eps: float, seed: int):
    """While active, every training forward of a fitted hash hashes with its planes turned by
    a fresh random rotation Q of their own span (planes @ Q; Q = orth(I + eps * G), G Gaussian
    H x H; eps <= 0: a uniformly random rotation), so that the cells move from step to step
    (the ``dither:E`` variant, session 18)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    fwd0 = _planes.LayerHash.forward

    def forward(self, xp, kernel_size, stride, dilation, group: int = 0):
        p = fwd0(self, xp, kernel_size, stride, dilation, group)
        if not self.training or self.hashing != "pca":
            return p
        H = p.shape[1]
        g = torch.randn(H, H, generator=gen, dtype=torch.float64)
        q = torch.linalg.qr(g if eps <= 0 else torch.eye(H, dtype=torch.float64) + eps * g)[0]
        return (p.double() @ q).to(p.dtype).contiguous()

    _planes.LayerHash.forward = forward
    try:
        yield
    finally:
        _planes.LayerHash.forward = fwd0


def variant_arg(variant: str, kind: str, default: int | None = None) -> int | None:
    """N of a ``kind:N`` variant (``tail:E``, ``warmup:S``, ``refresh:N``), else ``default``."""
    name, _, n = variant.partition(":")
    return int(n) if name == kind else default


def build(variant: str, base, example, args, seed: int):
    if variant == "stock":
        return copy.deepcopy(base)
    LH = {}
    refresh = variant_arg(variant, "refresh", 20)
    if variant.startswith("stage:"):
        _, L, H = variant.split(":")
        LH = {"L": {args.layer: int(L)}, "H": {args.layer: int(H)}}
    config = ReuseConfig(
        seed=seed,
        policy="measured",
        l_values="extended",
        centroid=args.centroid,
        max_error=DEFAULT_MAX_ERROR,
        hashing="pca",
        hash_refresh=refresh,
        norm_grad=args.norm_grad == "on",
        exclude=args.exclude,
        **LH,
    )
    gm = reuse_compile(copy.deepcopy(base), example, config=config)
    row = gm.reuse_plan[args.layer] if LH else None
    if row is not None and row.exact:
        # the measured policy keeps --layer exact (no candidate faster, or none within max_error):
        # compile again with the paper's policy, every other layer pinned at the measured stage
        pinned = {r.name: (r.L, r.H) for r in gm.reuse_plan if not r.exact}
        pinned[args.layer] = (LH["L"][args.layer], LH["H"][args.layer])
        config = dataclasses.replace(
            config,
            policy="paper",
            max_error=None,  # the measured policy's filter; the stages are given
            L={k: v[0] for k, v in pinned.items()},
            H={k: v[1] for k, v in pinned.items()},
        )
        gm = reuse_compile(copy.deepcopy(base), example, config=config)
        for r in gm.reuse_plan:
            if r.rewritable and r.name not in pinned:
                set_stage(gm, r.name, exact=True)
        row = gm.reuse_plan[args.layer]
        if row.exact:
            raise SystemExit(f"{variant}: layer {args.layer!r} cannot run with reuse: {row.reason}")
    if variant == "sumscale":  # the edit reads the generic chain's inverse (the same values)
        gm = generic_copy(gm)
    # every chain (one per rewritten conv, one per group of a grouped one), by its reconstruct node
    bases = [n.name.removesuffix("_y") for n in gm.graph.nodes if n.target is torch.ops.reuse.reconstruct.default]
    for b in bases:
        if variant in ("fwd", "bwd"):
            _mix(gm, b, "reuse" if variant == "fwd" else "exact")
        elif variant == "stunit":
            _node(gm, f"{b}_unit_centroids").target = _unit_norm_constant
        elif variant == "sumscale":
            _scale_sums(gm, b)
    gm.graph.lint()
    gm.recompile()
    return gm


def run(variant: str, seed: int, args) -> dict:
    if variant.startswith("dither:"):
        with dithered(float(variant.split(":")[1]), seed):
            return run("reuse", seed, args)
    if variant == "vq":
        with vector_quantised() as vq:
            out = run("reuse", seed, args)
        if not vq["calls"]:
            raise SystemExit("the vq variant needs a reused layer on the chunk path (L dividing its input channels)")
        return out
    (x_tr, y_tr), (x_te, y_te) = (
        (xs.contiguous(memory_format=torch.channels_last), ys) for xs, ys in load_digits(0.2, seed)
    )
    torch.manual_seed(seed)
    base = MODELS[args.model]().to(memory_format=torch.channels_last)
    model = build(variant, base, x_tr[: args.batch_size], args, seed)
    stages = (
        {r.name: "exact" if r.exact else f"L={r.L} H={r.H}" for r in model.reuse_plan} if variant != "stock" else {}
    )
    for name, p in model.named_parameters():  # --freeze: these layers keep their initial weights
        if any(name.startswith(f"{layer}.") for layer in args.freeze):
            p.requires_grad_(False)
    # the main job's steps (examples/train.py); not its train_epochs, whose evaluation of a
    # compiled model rebuilds the graph and would drop this variant's edits
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    opt = make_adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    warm = variant_arg(variant, "warmup", 0)
    warm_layers = [r.name for r in model.reuse_plan if not r.exact] if warm else []
    for name in warm_layers:  # warmup:S: exact until step S (set_stage keeps parameters and Adam's state)
        set_stage(model, name, exact=True)
    tail = variant_arg(variant, "tail")
    losses, accs, steps = [], [], 0
    for epoch in range(args.epochs):
        if epoch == tail:  # tail:E: exact from epoch E+1 on (every layer, one rebuild)
            set_stage(model, exact=True)
        perm = torch.randperm(len(x_tr), generator=order)
        model.train()
        total = 0.0
        for loss in train_steps(model, opt, x_tr, y_tr, perm, args.batch_size):
            total, steps = total + loss, steps + 1
            if steps == warm:
                for name in warm_layers:
                    set_stage(model, name, exact=False)
        losses.append(total / (len(x_tr) // args.batch_size))
        ev = copy.deepcopy(base)  # the trained weights in the stock model: exact convolutions
        ev.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
        accs.append(evaluate(ev, x_te, y_te)[1])
    return {"train_loss": losses, "test_acc": accs, "stages": stages}


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


REF_EPOCH = 12  # the main job's epochs (examples/train.py --epochs)


def windows(epochs: int) -> list[tuple[int, int]]:
    """Epoch windows (first, last; counted from 1) of the long-run tables: the 12-epoch
    figure of merit's epochs 6-12, then 6 epochs each (13-18, 19-24, ...; the last one
    shorter where the run ends inside it)."""
    return [(REF_EPOCH // 2, REF_EPOCH)] + [(a, min(a + 5, epochs)) for a in range(REF_EPOCH + 1, epochs + 1, 6)]


def seed_line(v: str, seed: int, r: dict, epochs: int) -> str:
    half = max(1, epochs // 2)
    return (
        f"seed {seed} {v:>12}: mean acc epochs {half}-{epochs} "
        f"{statistics.mean(r['test_acc'][half - 1 :]):.4f}  final loss {r['train_loss'][-1]:.3f}  "
        f"acc {' '.join(f'{a:.3f}' for a in r['test_acc'])}  {r['stages'] or ''}"
    )


def report(results: dict, seeds, variants, epochs: int, epoch_ratios=None) -> str:
    """The summary table (each variant's mean accuracy over the second half of training,
    per seed, against the first variant) and, for runs longer than 12 epochs, the long-run
    tables (:func:`long_report`); with ``epoch_ratios`` (reuse, exact) and a ``stock`` variant,
    :func:`time_to_target` for the ``reuse`` and ``tail:E`` variants."""
    half = max(1, epochs // 2)
    lines = [
        f"\nmean test accuracy over epochs {half}-{epochs}:",
        f"| variant | {' | '.join(f'seed {s}' for s in seeds)} | mean | vs {variants[0]} |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    ref = None
    for v in variants:
        m = [statistics.mean(results[f"{v}/{s}"]["test_acc"][half - 1 :]) for s in seeds]
        ref = statistics.mean(m) if ref is None else ref
        diff = 100 * (statistics.mean(m) - ref)
        lines.append(f"| {v} | {' | '.join(f'{a:.4f}' for a in m)} | {statistics.mean(m):.4f} | {diff:+.2f} pts |")
    if epochs > REF_EPOCH:
        lines += ["", long_report(results, seeds, variants, epochs)]
    timed = [v for v in variants if v == "reuse" or v.startswith("tail:")]
    if epoch_ratios and "stock" in variants and timed:
        lines += ["", time_to_target(results, seeds, timed, *epoch_ratios)]
    return "\n".join(lines)


def first_epoch(accs, target: float) -> int | None:
    """The first epoch (counted from 1) whose accuracy >= target."""
    return next((i for i, a in enumerate(accs, 1) if a >= target - 1e-9), None)


def long_report(results: dict, seeds, variants, epochs: int) -> str:
    """For runs longer than 12 epochs, against ``stock`` (or the first variant where there
    is no ``stock``): each variant's mean test accuracy per epoch window (:func:`windows`),
    its difference to the reference and the number of seeds below the reference's mean in
    that window; the median training loss over the seeds at each window's last epoch; and
    per seed the first epoch at which each variant reaches the reference's epoch-12
    accuracy."""
    ref = "stock" if "stock" in variants else variants[0]
    others = [v for v in variants if v != ref]
    wins = windows(epochs)

    def wmean(v, s, a, b):
        return statistics.mean(results[f"{v}/{s}"]["test_acc"][a - 1 : b])

    head = f"| epochs | {ref} |" + "".join(f" {v} | {v} - {ref} | {v}: seeds below {ref} |" for v in others)
    lines = [
        f"mean test accuracy per epoch window over {len(seeds)} seeds, against {ref}:",
        head,
        "|---|---:|" + "---:|---:|---:|" * len(others),
    ]
    for a, b in wins:
        r = [wmean(ref, s, a, b) for s in seeds]
        row = f"| {a}-{b} | {statistics.mean(r):.4f} |"
        for v in others:
            m = [wmean(v, s, a, b) for s in seeds]
            below = sum(x < y for x, y in zip(m, r))
            diff = 100 * (statistics.mean(m) - statistics.mean(r))
            row += f" {statistics.mean(m):.4f} | {diff:+.2f} pts | {below} of {len(seeds)} |"
        lines.append(row)
    lines += [
        "",
        "median training loss over the seeds at the end of each window:",
        "| epoch | " + " | ".join(variants) + " |",
        "|---:|" + "---:|" * len(variants),
    ]
    for _, b in wins:
        meds = [statistics.median(results[f"{v}/{s}"]["train_loss"][b - 1] for s in seeds) for v in variants]
        lines.append(f"| {b} | " + " | ".join(f"{float(f'{m:.2g}'):f}".rstrip("0") for m in meds) + " |")
    lines += [
        "",
        f"first epoch at which each run reaches {ref}'s epoch-{REF_EPOCH} accuracy (-: not within {epochs}):",
        f"| seed | {ref}'s epoch-{REF_EPOCH} acc | " + " | ".join(variants) + " |",
        "|---:|---:|" + "---:|" * len(variants),
    ]
    reached = dict.fromkeys(variants, 0)
    for s in seeds:
        target = results[f"{ref}/{s}"]["test_acc"][REF_EPOCH - 1]
        hits = [first_epoch(results[f"{v}/{s}"]["test_acc"], target) for v in variants]
        for v, h in zip(variants, hits):
            reached[v] += h is not None
        lines.append(f"| {s} | {target:.4f} | " + " | ".join("-" if h is None else str(h) for h in hits) + " |")
    lines.append("reached in: " + ", ".join(f"{v} {reached[v]} of {len(seeds)} seeds" for v in variants))
    return "\n".join(lines)


def time_to_target(results: dict, seeds, variants, reuse_ratio: float, exact_ratio: float) -> str:
    """The end-to-end figure (benchmarks/end_to_end.py's) *estimated* from epoch counts: the
    time at which each run first reaches stock's epoch-12 accuracy over the time stock
    first does, with a stock epoch 1, a reuse epoch ``reuse_ratio`` and an exact epoch of
    the compiled model ``exact_ratio`` (``tail:E``: reuse for E epochs, exact after). Not a
    timing: the ratios are what the end-to-end runs measured (``--epoch-ratios``)."""
    lines = [
        f"time to stock's epoch-{REF_EPOCH} accuracy, estimated from the epoch counts (a reuse epoch "
        f"{reuse_ratio:g}, an exact one {exact_ratio:g} of a stock epoch; not timed):",
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | reached | median, counting misses |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    for v in variants:
        tail = variant_arg(v, "tail")
        ratios = []
        for s in seeds:
            stock_acc = results[f"stock/{s}"]["test_acc"]
            k_stock = first_epoch(stock_acc, stock_acc[REF_EPOCH - 1])
            k = first_epoch(results[f"{v}/{s}"]["test_acc"], stock_acc[REF_EPOCH - 1])
            if k is None:
                ratios.append(math.inf)
                continue
            reuse_epochs = k if tail is None else min(k, tail)
            ratios.append((reuse_ratio * reuse_epochs + exact_ratio * (k - reuse_epochs)) / k_stock)
        med = statistics.median(ratios)
        cells = " | ".join("-" if math.isinf(r) else f"{r:.2f}" for r in ratios)
        reached = sum(not math.isinf(r) for r in ratios)
        lines.append(f"| {v} | {cells} | {reached} of {len(seeds)} | {'-' if math.isinf(med) else f'{med:.2f}x'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifarnet", choices=sorted(MODELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 1, 5])
    ap.add_argument("--variants", nargs="+", default=["stock", "reuse", "fwd", "bwd"])
    ap.add_argument(
        "--epochs", type=int, default=12, help="above 12: also the per-window tables against stock (see above)"
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--layer", default="conv2", help="the layer a stage:L:H variant fixes")
    ap.add_argument("--exclude", nargs="*", default=[], help="layers kept exact")
    ap.add_argument("--freeze", nargs="*", default=[], help="layers (module names) not trained")
    ap.add_argument(
        "--norm-grad", choices=["off", "on"], default="off", help="as examples/train.py's (off: cifarnet's)"
    )
    ap.add_argument("--centroid", choices=["norm", "mean"], default="norm", help="mean needs --norm-grad on")
    ap.add_argument("--out", default=None, help="write the curves as JSON here")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="re-read the --out JSON of an earlier run and print its report (its own saved seeds, variants and "
        "epochs; the other flags but --epoch-ratios are ignored)",
    )
    ap.add_argument(
        "--epoch-ratios",
        type=float,
        nargs=2,
        metavar=("REUSE", "EXACT"),
        default=None,
        help="also estimate each reuse and tail:E run's time to stock's epoch-12 "
        "accuracy from its epoch counts, a reuse epoch REUSE and an exact one EXACT of a stock epoch (e.g. "
        "0.42 0.97, session 26's; not a timing). Read with --report-only too",
    )
    args = ap.parse_args(argv)
    if args.epoch_ratios and not all(0 < r for r in args.epoch_ratios):
        ap.error("--epoch-ratios: both ratios must be positive")
    if args.report_only:
        if not args.out:
            ap.error("--report-only reads the JSON that --out names")
        saved = json.loads(Path(args.out).read_text())
        sa, results = saved["args"], saved["results"]
        settings = ", ".join(f"{k} {sa[k]}" for k in ("model", "layer", "centroid", "norm_grad") if k in sa)
        settings += "".join(f", {k} {' '.join(sa[k])}" for k in ("exclude", "freeze") if sa.get(k))
        print(
            f"# {args.out}: saved run of --seeds {' '.join(map(str, sa['seeds']))} --variants "
            f"{' '.join(sa['variants'])} --epochs {sa['epochs']} ({settings})"
        )
        for seed in sa["seeds"]:
            for v in sa["variants"]:
                print(seed_line(v, seed, results[f"{v}/{seed}"], sa["epochs"]))
        print(report(results, sa["seeds"], sa["variants"], sa["epochs"], args.epoch_ratios))
        return
    if args.centroid == "mean" and args.norm_grad == "off":
        ap.error("--centroid mean has no member norms: use --norm-grad on")
    if args.centroid == "mean" and {"stunit", "sumscale"} & set(args.variants):
        ap.error("the stunit and sumscale variants change the norm centroid: use --centroid norm")
    for v in args.variants:
        parts = v.split(":")
        ok = (
            v in ("stock", "reuse", "fwd", "bwd", "sumscale", "stunit", "vq")
            or (parts[0] == "stage" and len(parts) == 3 and all(p.isdigit() for p in parts[1:]))
            or (parts[0] == "dither" and len(parts) == 2 and _is_number(parts[1]))
            or (
                parts[0] in ("refresh", "warmup", "tail")
                and len(parts) == 2
                and parts[1].isdigit()
                and int(parts[1]) >= 1
            )
        )
        if not ok:
            ap.error(
                f"unknown variant {v!r}: stock, reuse, fwd, bwd, sumscale, stunit, vq, stage:L:H, refresh:N, "
                "warmup:S, tail:E (N, S, E >= 1) or dither:E (E a number)"
            )
    logging.getLogger("reuse_compiler").setLevel(logging.ERROR)
    results = {}
    for seed in args.seeds:
        for v in args.variants:
            r = results[f"{v}/{seed}"] = run(v, seed, args)
            print(seed_line(v, seed, r, args.epochs), flush=True)
    print(report(results, args.seeds, args.variants, args.epochs, args.epoch_ratios))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
