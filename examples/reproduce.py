"""Reproduce the paper's inference and training experiments (Fig. 7, Fig. 8, Table III,
Table IV) on the 5,000 real MNIST digits with CifarNet, plus a comparison of the two
centroid variants ("mean", the paper's, and "norm").

    python examples/reproduce.py all --out runs/reproduce          # everything, ~19 min on 2 shared cores
    python examples/reproduce.py fig8 --out runs/reproduce         # one experiment
    python examples/reproduce.py all --quick --out /tmp/repro      # smoke run, well under a minute

Commands (each writes ``<out>/<command>.png``, ``<out>/<command>.md`` and
``<out>/<command>.json`` and prints its table):

- ``train``: CifarNet on the digits (Adam 1e-3, batch 128, seed 0), ``<out>/cifarnet_digits.pt``.
  The other commands load it (and train it first if it is missing).
- ``fig7``: k-means (scikit-learn) on whole im2col rows (L = K) of conv1 or conv2, the other
  conv exact; test accuracy vs r_c = |C| / N_scope in the single-input and single-batch scopes.
- ``fig8``: the library's LSH clustering; per layer and fast-path L, a sweep over H; test
  accuracy vs r_c (mean over test batches), for centroid "mean" and "norm".
- ``table3``: cluster reuse (across-batch store) off/on at a fixed (L, H) per layer, with
  the reuse rate R per batch.
- ``table4``: training-time savings of the strategies "fixed", "lh", "cr" against stock, by
  calling ``examples/train.py``'s ``main`` (its own stock run in every call).
- ``norm``: centroid "mean" vs "norm": paired accuracies from fig8 and a training run at a
  fixed aggressive stage with each.
- ``all``: all of the above in this order.

The test set (1,000 images, stored class by class) is shuffled once with a fixed seed so
that every batch mixes classes, as in the paper ("input images are randomly shuffled").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a source checkout

from examples.train import evaluate, load_digits, train_run  # noqa: E402
from examples.train import main as train_main  # noqa: E402
from reuse_compiler import AdaptiveReuse, ReuseConfig, reuse_compile, set_stage  # noqa: E402
from reuse_compiler.models import cifarnet  # noqa: E402

COMMANDS = ("train", "fig7", "fig8", "table3", "table4", "norm")
LAYERS = ("conv1", "conv2")
SEED = 0
WEIGHTS = "cifarnet_digits.pt"


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Every size knob of the experiments; ``quick_settings()`` shrinks them for the smoke test."""

    quick: bool = False
    train_epochs: int = 10
    train_subset: int = 0  # 0: all 4,000 training images
    batch_size: int = 128
    lr: float = 1e-3
    # fig7 (k-means)
    fig7_images: int = 500
    fig7_batch: int = 100
    # k/N grids per layer and scope (conv1 on digits needs very few clusters to degrade at all;
    # k-means on conv2's 1600-long rows is the slow part, so its grids stop where it saturates)
    fig7_rc: dict = field(
        default_factory=lambda: {
            "conv1 input": (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3),
            "conv1 batch": (0.0001, 0.0002, 0.0005, 0.001, 0.005, 0.02),
            "conv2 input": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
            "conv2 batch": (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02),
        }
    )
    fig7_max_iter: int = 30
    # fig8 (LSH sweep)
    fig8_images: int = 0  # 0: the whole test set
    fig8_batch: int = 250
    fig8_L: dict = field(default_factory=lambda: {"conv1": [25, 5], "conv2": [1600, 320, 64, 32, 16, 8]})
    fig8_H: dict = field(default_factory=lambda: {"conv1": list(range(2, 31, 2)), "conv2": list(range(2, 25, 2))})
    fig8_H_more: dict = field(
        default_factory=lambda: {"conv1": [34, 40, 48, 56, 62], "conv2": [28, 32, 40, 48, 56, 62]}
    )
    saturation: float = 0.002  # "saturated": accuracy within this of the exact accuracy
    centroids: tuple = ("mean", "norm")
    # table3
    table3_images: int = 0
    table3_batch: int = 50  # 1,000 test images -> 20 batches (the paper: R ~0.98 after 20)
    table3_stages: tuple = (("conv1", 5, 15), ("conv2", 16, 10), ("conv2", 10, 10))
    # table4
    table4_epochs: int = 12  # train.py's default (the main job)
    table4_extra: list = field(default_factory=list)  # extra argv for train.py (quick mode)
    # norm (training at a fixed aggressive stage)
    norm_epochs: int = 10
    norm_seeds: tuple = (0, 1)
    norm_stage: dict = field(default_factory=lambda: {"conv1": (25, 10), "conv2": (320, 8)})

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            quick=True,
            train_epochs=1,
            train_subset=1000,
            fig7_images=20,
            fig7_batch=10,
            fig7_rc={
                "conv1 input": (0.05, 0.3),
                "conv1 batch": (0.005, 0.02),
                "conv2 input": (0.05, 0.3),
                "conv2 batch": (0.005, 0.02),
            },
            fig7_max_iter=10,
            fig8_images=200,
            fig8_batch=100,
            fig8_L={"conv1": [25], "conv2": [320]},
            fig8_H={"conv1": [4, 12], "conv2": [4, 12]},
            fig8_H_more={"conv1": [], "conv2": []},
            table3_images=200,
            table3_batch=50,
            table3_stages=(("conv1", 5, 15), ("conv2", 16, 10)),
            table4_epochs=1,
            table4_extra=["--batch-size", "100", "--probe-size", "64"],
            norm_epochs=1,
            norm_seeds=(0,),
        )


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, flush=True)


class Ctx:
    """Shared state of one invocation: settings, output folder, data, trained weights."""

    def __init__(self, out: Path, settings: Settings):
        self.out = out
        self.s = settings
        out.mkdir(parents=True, exist_ok=True)
        self._data = None
        self._state = None
        self.t0 = time.perf_counter()

    @property
    def data(self):
        """(x_tr, y_tr), (x_te, y_te) with the test set shuffled once (seed 0)."""
        if self._data is None:
            (x_tr, y_tr), (x_te, y_te) = load_digits(test_fraction=0.2, seed=SEED)
            perm = torch.randperm(len(x_te), generator=torch.Generator().manual_seed(SEED))
            self._data = (x_tr, y_tr), (x_te[perm], y_te[perm])
        return self._data

    def test(self, n: int = 0):
        x, y = self.data[1]
        return (x[:n], y[:n]) if n else (x, y)

    def model(self) -> nn.Module:
        """The trained CifarNet (eval mode); trains it first if the weights are missing."""
        if self._state is None:
            path = self.out / WEIGHTS
            if not path.exists():
                log(f"{path} missing: training it first")
                cmd_train(self)
            self._state = torch.load(path, map_location="cpu", weights_only=True)
        m = cifarnet(in_channels=1, image_size=28)
        m.load_state_dict(self._state)
        return m.eval()

    def elapsed(self) -> str:
        return f"{time.perf_counter() - self.t0:.0f}s"

    def write(self, name: str, md: str, record: dict) -> None:
        (self.out / f"{name}.md").write_text(md)
        (self.out / f"{name}.json").write_text(json.dumps(record, indent=2, default=_json_default))
        log(md)
        log(f"wrote {self.out / name}.md/.json/.png  [{self.elapsed()}]")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def accuracy(model, x, y, batch: int) -> float:
    return evaluate(model, x, y, batch=batch)[1]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- train


def cmd_train(ctx: Ctx) -> dict:
    s = ctx.s
    (x_tr, y_tr), (x_te, y_te) = ctx.data
    if s.train_subset:
        g = torch.Generator().manual_seed(SEED)
        idx = torch.randperm(len(x_tr), generator=g)[: s.train_subset]
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    log(f"== train: CifarNet on {len(x_tr)} digits, {s.train_epochs} epochs, Adam lr {s.lr}, batch {s.batch_size}")
    torch.manual_seed(SEED)
    model = cifarnet(in_channels=1, image_size=28)
    args = SimpleNamespace(
        seed=SEED, lr=s.lr, adam="foreach", batch_size=s.batch_size, epochs=s.train_epochs, no_progress=True
    )
    rec = train_run("stock", model, ((x_tr, y_tr), (x_te, y_te)), args)
    torch.save(model.state_dict(), ctx.out / WEIGHTS)
    ctx._state = None
    acc = rec["epochs"][-1]["test_acc"]
    rows = [[e["epoch"], e["train_loss"], e["test_loss"], e["test_acc"], e["time"]] for e in rec["epochs"]]
    md = (
        f"# CifarNet on the digits (train)\n\n{len(x_tr)} train / {len(x_te)} test images, seed {SEED}, "
        f"Adam lr {s.lr}, batch {s.batch_size}. Final test accuracy **{acc:.4f}**.\n\n"
        + md_table(["epoch", "train loss", "test loss", "test acc", "time (s)"], rows)
    )
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [e["epoch"] for e in rec["epochs"]]
    a1.plot(ep, [e["train_loss"] for e in rec["epochs"]], "o-", label="train")
    a1.plot(ep, [e["test_loss"] for e in rec["epochs"]], "s--", label="test")
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a1.legend()
    a2.plot(ep, [e["test_acc"] for e in rec["epochs"]], "o-")
    a2.set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
    fig.tight_layout()
    fig.savefig(ctx.out / "train.png", dpi=110)
    plt.close(fig)
    record = {"test_acc": acc, "weights": str(ctx.out / WEIGHTS), "record": rec, "settings": asdict(s)}
    ctx.write("train", md, record)
    return record


# --------------------------------------------------------------------------- fig7 (k-means)


def kmeans_replace(rows: np.ndarray, k: int, seed: int, max_iter: int, minibatch: bool) -> tuple[np.ndarray, int]:
    """Replace each row by its k-means centroid; returns (rows, |C|).

    Identical rows are merged first (weighted k-means on the distinct rows): digits have
    large constant backgrounds. If k is at least the number of distinct rows, every
    distinct row is its own cluster and the result is exact (|C| = distinct rows < k)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    uniq, inv, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    if k >= len(uniq):
        return rows, len(uniq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: we cap iterations on purpose
        if minibatch:
            km = MiniBatchKMeans(k, n_init=1, random_state=seed, batch_size=2048, max_iter=max_iter)
        else:
            km = KMeans(k, n_init=1, max_iter=max_iter, random_state=seed)
        km.fit(uniq, sample_weight=counts.astype(np.float32))
    labels = km.labels_[inv]
    return km.cluster_centers_.astype(rows.dtype)[labels], len(np.unique(labels))


class KMeansConv(nn.Module):
    """A conv whose im2col rows (whole rows, L = K) are replaced by their k-means centroids
    before the GEMM: y = centroid @ W + b. ``scope`` "input" clusters each image's rows,
    "batch" all rows of the forward's batch; k = round(ratio * rows in the scope)."""

    def __init__(self, conv: nn.Conv2d, scope: str, ratio: float, max_iter: int, minibatch: bool):
        super().__init__()
        self.conv, self.scope, self.ratio = conv, scope, ratio
        self.max_iter, self.minibatch = max_iter, minibatch
        self.clusters = 0  # sum over scope units of |C|
        self.rows = 0  # sum over scope units of N
        self.units = []  # per scope unit |C| / N

    def forward(self, x):
        c = self.conv
        cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # (B, K, P)
        B, K, P = cols.shape
        rows = cols.transpose(1, 2).detach().numpy()  # (B, P, K): row n = window n
        units = [rows[i] for i in range(B)] if self.scope == "input" else [rows.reshape(B * P, K)]
        out = []
        for u in units:
            k = max(1, round(self.ratio * len(u)))
            cent, n_c = kmeans_replace(u, k, SEED, self.max_iter, self.minibatch and self.scope == "batch")
            out.append(cent)
            self.units.append(n_c / len(u))
        xc = torch.from_numpy(np.concatenate(out).reshape(B * P, K))
        y = xc @ c.weight.reshape(c.out_channels, K).T
        if c.bias is not None:
            y = y + c.bias
        oh = (x.shape[2] + 2 * c.padding[0] - c.dilation[0] * (c.kernel_size[0] - 1) - 1) // c.stride[0] + 1
        ow = (x.shape[3] + 2 * c.padding[1] - c.dilation[1] * (c.kernel_size[1] - 1) - 1) // c.stride[1] + 1
        return y.view(B, P, -1).permute(0, 2, 1).reshape(B, -1, oh, ow)


def cmd_fig7(ctx: Ctx) -> dict:
    s = ctx.s
    x, y = ctx.test(s.fig7_images)
    base = ctx.model()
    exact = accuracy(base, x, y, s.fig7_batch)
    log(
        f"== fig7: k-means on whole im2col rows (L = K), {len(x)} test images, batches of {s.fig7_batch}; "
        f"exact accuracy {exact:.4f}"
    )
    points = []
    for layer in LAYERS:
        for scope in ("input", "batch"):
            for ratio in s.fig7_rc[f"{layer} {scope}"]:
                t = time.perf_counter()
                model = copy.deepcopy(base)
                kconv = KMeansConv(getattr(base, layer), scope, ratio, s.fig7_max_iter, minibatch=True)
                setattr(model, layer, kconv)
                acc = accuracy(model, x, y, s.fig7_batch)
                rc = float(np.mean(kconv.units))
                points.append(
                    {
                        "layer": layer,
                        "scope": scope,
                        "ratio": ratio,
                        "r_c": rc,
                        "accuracy": acc,
                        "seconds": time.perf_counter() - t,
                    }
                )
                log(
                    f"  {layer} {scope:>5} k/N={ratio:<6} r_c={rc:.4f} acc={acc:.4f} "
                    f"({time.perf_counter() - t:.1f}s) [{ctx.elapsed()}]"
                )
    rows = [
        [p["layer"], "single-" + p["scope"], p["ratio"], p["r_c"], p["accuracy"], p["accuracy"] - exact] for p in points
    ]
    md = (
        "# Fig. 7: k-means on whole row vectors (L = K)\n\n"
        f"Trained CifarNet on the digits, {len(x)} shuffled test images (the same subset for every point), "
        f"batches of {s.fig7_batch} images. Exact (unclustered) accuracy on this subset: **{exact:.4f}**. "
        "One conv clustered at a time, the other exact. k = round(k/N * rows in the scope); "
        "r_c = |C| / N averaged over scope units, |C| the clusters actually used: it is below k/N when a scope "
        "has fewer distinct rows than k (every distinct row is then its own cluster: exact) or when "
        "MiniBatchKMeans leaves clusters empty. Single-input: KMeans per image "
        f"(k-means++, n_init 1, at most {s.fig7_max_iter} iterations); single-batch: MiniBatchKMeans over "
        f"all rows of a batch (batch_size 2048, at most {s.fig7_max_iter} epochs).\n\n"
        + md_table(["layer", "scope", "k/N", "r_c", "accuracy", "vs exact"], rows)
    )
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, layer in zip(axes, LAYERS):
        for scope, style in (("input", "o-"), ("batch", "s-")):
            pts = sorted((p["r_c"], p["accuracy"]) for p in points if p["layer"] == layer and p["scope"] == scope)
            if pts:
                ax.plot(*zip(*pts), style, label=f"single-{scope}")
        ax.axhline(exact, color="gray", ls="--", label=f"exact ({exact:.3f})")
        ax.set(xlabel="remaining ratio r_c = |C| / N", ylabel="test accuracy", title=f"CifarNet {layer} (k-means, L=K)")
        ax.set_xscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out / "fig7.png", dpi=110)
    plt.close(fig)
    record = {"exact_accuracy": exact, "images": len(x), "batch": s.fig7_batch, "points": points}
    ctx.write("fig7", md, record)
    return record


# --------------------------------------------------------------------------- fig8 (LSH sweep)


def compile_for_inference(ctx: Ctx, centroid: str = "mean", scope: str = "batch", batch: int = 250):
    """The trained CifarNet through reuse_compile, every layer exact, eval mode."""
    x, _ = ctx.test()
    gm = reuse_compile(ctx.model(), x[:batch], config=ReuseConfig(seed=SEED, scope=scope, centroid=centroid))
    set_stage(gm, exact=True)
    return gm.eval()


def lsh_point(gm, layer: str, L: int, H: int, x, y, batch: int) -> dict:
    """Accuracy and r_c (mean over batches) with only ``layer`` at (L, H), batch scope."""
    set_stage(gm, exact=True)
    set_stage(gm, layer, L=L, H=H, exact=False, cluster_reuse=False)
    correct, rcs = 0, []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (gm(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
            rcs.append(gm.reuse_plan[layer].r_c)
    return {"accuracy": correct / len(x), "r_c": float(np.mean(rcs)), "r_c_batches": rcs}


def run_fig8_sweep(ctx: Ctx) -> dict:
    s = ctx.s
    x, y = ctx.test(s.fig8_images)
    exact = accuracy(ctx.model(), x, y, s.fig8_batch)
    log(f"== fig8: LSH sweep, {len(x)} test images, batches of {s.fig8_batch}; exact accuracy {exact:.4f}")
    points = []
    for centroid in s.centroids:
        gm = compile_for_inference(ctx, centroid, batch=s.fig8_batch)
        for layer in LAYERS:
            for L in s.fig8_L[layer]:
                t = time.perf_counter()
                last = None
                for H in [*s.fig8_H[layer], *s.fig8_H_more[layer]]:
                    if H not in s.fig8_H[layer] and last is not None and last >= exact - s.saturation:
                        break  # saturated: no higher H needed
                    p = lsh_point(gm, layer, L, H, x, y, s.fig8_batch)
                    last = p["accuracy"]
                    points.append({"centroid": centroid, "layer": layer, "L": L, "H": H, **p})
                mine = [p for p in points if (p["centroid"], p["layer"], p["L"]) == (centroid, layer, L)]
                log(
                    f"  {centroid:>4} {layer} L={L:<4} H={mine[0]['H']}..{mine[-1]['H']}: r_c "
                    f"{mine[0]['r_c']:.4f}..{mine[-1]['r_c']:.4f}, acc {mine[0]['accuracy']:.3f}.."
                    f"{mine[-1]['accuracy']:.3f} ({time.perf_counter() - t:.0f}s) [{ctx.elapsed()}]"
                )
    return {"exact_accuracy": exact, "images": len(x), "batch": s.fig8_batch, "points": points}


def fig8_summary(rec: dict, tolerance: float = 0.01) -> list[list]:
    """Per layer, L and centroid: the smallest r_c whose accuracy is within ``tolerance`` of
    exact, and the best accuracy of the sweep."""
    exact = rec["exact_accuracy"]
    out = []
    keys = sorted({(p["layer"], p["L"]) for p in rec["points"]}, key=lambda k: (k[0], -k[1]))
    for layer, L in keys:
        row = [layer, L]
        for centroid in ("mean", "norm"):
            pts = [p for p in rec["points"] if (p["layer"], p["L"], p["centroid"]) == (layer, L, centroid)]
            ok = [p for p in pts if p["accuracy"] >= exact - tolerance]
            best = min(ok, key=lambda p: p["r_c"]) if ok else None
            row += [
                None if best is None else f"{best['r_c']:.4f} (H={best['H']})",
                None if not pts else max(p["accuracy"] for p in pts),
            ]
        out.append(row)
    return out


def plot_fig8(rec: dict, path: Path) -> None:
    """Accuracy vs r_c, one curve per L; columns: layers, rows: centroid mean / norm."""
    plt = _plt()
    exact = rec["exact_accuracy"]
    centroids = [c for c in ("mean", "norm") if any(p["centroid"] == c for p in rec["points"])]
    fig, axes = plt.subplots(len(centroids), 2, figsize=(12, 4.2 * len(centroids)), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    for row, centroid in zip(axes, centroids):
        for ax, layer in zip(row, LAYERS):
            Ls = sorted({p["L"] for p in rec["points"] if p["layer"] == layer}, reverse=True)
            for i, L in enumerate(Ls):
                pts = sorted(
                    (p["r_c"], p["accuracy"], p["H"])
                    for p in rec["points"]
                    if (p["layer"], p["L"], p["centroid"]) == (layer, L, centroid)
                )
                if pts:
                    ax.plot(
                        [q[0] for q in pts],
                        [q[1] for q in pts],
                        "o-",
                        color=cmap(i),
                        ms=3.5,
                        lw=1.2,
                        label=f"L={L} (H {min(q[2] for q in pts)}..{max(q[2] for q in pts)})",
                    )
            ax.axhline(exact, color="gray", ls=":", label=f"exact ({exact:.3f})")
            what = "mean (paper)" if centroid == "mean" else "norm (ours)"
            ax.set(
                xscale="log",
                xlabel="remaining ratio r_c",
                ylabel="test accuracy",
                title=f"CifarNet {layer}, LSH, centroid {what}",
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_fig8(ctx: Ctx) -> dict:
    rec = run_fig8_sweep(ctx)
    exact = rec["exact_accuracy"]
    by = {(p["centroid"], p["layer"], p["L"], p["H"]): p for p in rec["points"]}
    full = []
    for layer, L, H in sorted({(p["layer"], p["L"], p["H"]) for p in rec["points"]}, key=lambda k: (k[0], -k[1], k[2])):
        m, n = by.get(("mean", layer, L, H)), by.get(("norm", layer, L, H))
        full.append(
            [
                layer,
                L,
                H,
                (m or n)["r_c"],
                None if m is None else m["accuracy"],
                None if n is None else n["accuracy"],
            ]
        )
    md = (
        "# Fig. 8: LSH (the library's clustering), accuracy vs r_c\n\n"
        f"Trained CifarNet, {rec['images']} shuffled test images in batches of {rec['batch']} (eval mode, scope "
        f"'batch'); exact accuracy **{exact:.4f}**. One layer at (L, H), the other exact. r_c = mean over the "
        "test batches of the plan's r_c (mean over sub-matrices of |C_b| / N). The hash ids, hence r_c, are "
        "the same for both centroids; only the reconstruction differs. H beyond the regular grid was added "
        f"only until the accuracy came within {ctx.s.saturation} of exact.\n\n"
        "## Summary: smallest r_c within 0.01 of exact accuracy\n\n"
        + md_table(
            ["layer", "L", "mean: min r_c (H)", "mean: best acc", "norm: min r_c (H)", "norm: best acc"],
            fig8_summary(rec),
        )
        + "\n## Every point\n\n"
        + md_table(["layer", "L", "H", "r_c", "acc (mean)", "acc (norm)"], full)
    )
    plot_fig8(rec, ctx.out / "fig8.png")
    ctx.write("fig8", md, rec)
    return rec


# --------------------------------------------------------------------------- table3 (cluster reuse)

PAPER_TABLE3 = {"conv1": (5, 15, 0.813, 0.799), "conv2": (10, 10, 0.813, 0.784)}


def cmd_table3(ctx: Ctx) -> dict:
    s = ctx.s
    x, y = ctx.test(s.table3_images)
    b = s.table3_batch
    exact = accuracy(ctx.model(), x, y, b)
    n_batches = math.ceil(len(x) / b)
    log(f"== table3: cluster reuse off/on, {len(x)} test images in {n_batches} batches of {b}; exact {exact:.4f}")
    gm_batch = compile_for_inference(ctx, scope="batch", batch=b)
    gm_cr = compile_for_inference(ctx, scope="across-batch", batch=b)
    results = []
    for layer, L, H in s.table3_stages:
        t = time.perf_counter()
        off = lsh_point(gm_batch, layer, L, H, x, y, b)
        set_stage(gm_cr, exact=True)
        set_stage(gm_cr, layer, L=L, H=H, exact=False, cluster_reuse=False)  # empties the store
        set_stage(gm_cr, layer, cluster_reuse=True)
        correct, per_batch = 0, []
        # the store learns in train mode only (as BatchNorm's statistics do); CifarNet has no
        # BatchNorm or dropout, so train mode under no_grad is inference that fills the store
        gm_cr.train()
        with torch.no_grad():
            for i in range(0, len(x), b):
                hit = (gm_cr(x[i : i + b]).argmax(1) == y[i : i + b]).sum().item()
                correct += hit
                row = gm_cr.reuse_plan[layer]
                per_batch.append({"R": row.reuse_rate, "r_c": row.r_c, "accuracy": hit / len(x[i : i + b])})
        gm_cr.eval()
        on_acc = correct / len(x)
        Rs = [p["R"] for p in per_batch]
        results.append(
            {
                "layer": layer,
                "L": L,
                "H": H,
                "acc_cr0": off["accuracy"],
                "acc_cr1": on_acc,
                "r_c": off["r_c"],
                "R": Rs,
                "R_mean": float(np.mean(Rs)),
                "per_batch": per_batch,
            }
        )
        log(
            f"  {layer} L={L} H={H}: CR=0 {off['accuracy']:.4f}  CR=1 {on_acc:.4f}  r_c {off['r_c']:.4f}  "
            f"R {Rs[0]:.3f} -> {Rs[-1]:.3f} ({time.perf_counter() - t:.0f}s)"
        )
    marks = sorted({m for m in (2, 5, 10, 20) if m <= n_batches} | {n_batches})
    rows = []
    for r in results:
        paper = PAPER_TABLE3[r["layer"]]
        rows.append(
            [r["layer"], r["L"], r["H"], r["r_c"], r["acc_cr0"], r["acc_cr1"], r["acc_cr1"] - r["acc_cr0"]]
            + [round(r["R"][m - 1], 3) for m in marks]
            + [round(r["R_mean"], 3), f"L={paper[0]} H={paper[1]}: {paper[2]} / {paper[3]}"]
        )
    md = (
        "# Table III: cluster reuse (CR) off and on\n\n"
        f"Trained CifarNet, {len(x)} shuffled test images run in sequence as {n_batches} batches of {b} through one "
        f"compiled module (eval mode); one layer at (L, H), the other exact. Exact accuracy **{exact:.4f}**. "
        "CR=0: scope 'batch'; CR=1: scope 'across-batch' (Algorithm 1), the store starts empty and fills. "
        "R after batch j: share of batch j's clusters found in the store. The paper's conv2 used L=10, which has "
        "no fast path here; L=16 (a nearby fast-path value; L=8 is nearer) is the main row, L=10 (general path) "
        "is added where run.\n\n"
        + md_table(
            ["layer", "L", "H", "r_c (CR=0)", "acc CR=0", "acc CR=1", "CR=1 - CR=0"]
            + [f"R batch {m}" for m in marks]
            + ["mean R", "paper: acc CR=0 / CR=1"],
            rows,
        )
    )
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        lab = f"{r['layer']} L={r['L']} H={r['H']}"
        a1.plot(range(1, len(r["R"]) + 1), r["R"], "o-", ms=3, label=lab)
        a2.plot(range(1, len(r["R"]) + 1), [p["accuracy"] for p in r["per_batch"]], "o-", ms=3, label=lab + " CR=1")
    a1.axhline(0.98, color="gray", ls=":", label="paper: ~0.98 after 20 batches")
    a1.set(xlabel="batch", ylabel="reuse rate R", title="cluster reuse rate per batch", ylim=(0, 1.02))
    a2.axhline(exact, color="gray", ls="--", label=f"exact ({exact:.3f}, all batches)")
    a2.set(xlabel="batch", ylabel="batch accuracy", title="per-batch accuracy with CR=1")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.out / "table3.png", dpi=110)
    plt.close(fig)
    record = {"exact_accuracy": exact, "images": len(x), "batch": b, "rows": results}
    ctx.write("table3", md, record)
    return record


# --------------------------------------------------------------------------- table4 (training strategies)

PAPER_TABLE4 = {"fixed": "38%", "lh": "63%", "cr": "46%"}
# The paper's strategies as the paper runs them: random hash planes, no error filter, and
# each layer's walk ending at the exact convolution (the main job's defaults differ since
# session 11: fitted planes, max error 0.32, last stage kept, norms constant in the
# backward; docs/results.md)
PAPER_SETTINGS = ["--hashing", "random", "--max-error", "0", "--finish", "exact", "--norm-grad", "on"]
TABLE4_RUNS = (
    ("fixed", "fixed", PAPER_SETTINGS),
    ("lh", "lh", PAPER_SETTINGS),
    ("cr", "cr", PAPER_SETTINGS),
    ("lh-paper-fast", "lh", [*PAPER_SETTINGS, "--policy", "paper", "--l-values", "fast"]),
)


@contextmanager
def small_digits(n_train: int, n_test: int):
    """--quick only: make examples.train.main see a small stratified subset of the digits
    (its own data loader, wrapped for the duration of the call)."""
    import examples.train as train_mod

    original = train_mod.load_digits

    def subset(test_fraction, seed):
        (x_tr, y_tr), (x_te, y_te) = original(test_fraction, seed)
        return (x_tr[::10][:n_train], y_tr[::10][:n_train]), (x_te[::10][:n_test], y_te[::10][:n_test])

    train_mod.load_digits = subset
    try:
        yield
    finally:
        train_mod.load_digits = original


def initial_stages(run: dict) -> dict:
    """Each layer's stage at the start: the ``old`` of its first switch, else its last stage."""
    stages = dict(run["reuse_epochs"][-1].get("stages", {}))
    for sw in reversed(run["switches"]):
        stages[sw["layer"]] = sw["old"]
    return stages


def reuse_phase_ratio(run: dict) -> tuple[float, int] | None:
    """(mean reuse-epoch duration / mean stock duration of the same epochs, number of such
    epochs): epochs with no switch inside and every layer that started with reuse still
    reusing at their end (a layer the plan keeps exact from the start, e.g. the measured
    policy's conv1, does not disqualify every epoch)."""

    def durations(epochs):
        t = [e["time"] for e in epochs]
        return [b - a for a, b in zip([0.0] + t[:-1], t)]

    switched = {sw["epoch"] for sw in run["switches"]}
    reusing = {k for k, v in initial_stages(run).items() if v != "exact"}
    idx = [
        i
        for i, e in enumerate(run["reuse_epochs"])
        if e["epoch"] not in switched and reusing and all(e.get("stages", {}).get(k) != "exact" for k in reusing)
    ]
    if not idx:
        return None
    dr, ds = durations(run["reuse_epochs"]), durations(run["stock_epochs"])
    return sum(dr[i] for i in idx) / sum(ds[i] for i in idx), len(idx)


def cmd_table4(ctx: Ctx) -> dict:
    s = ctx.s
    log(f"== table4: training strategies vs stock via examples/train.py, {s.table4_epochs} epochs, seed {SEED}")
    results = []
    for name, strategy, extra in TABLE4_RUNS:
        out = ctx.out / "table4" / name
        argv = ["--strategy", strategy, "--epochs", str(s.table4_epochs), "--seed", str(SEED), "--no-progress"]
        argv += ["--out", str(out), *extra, *s.table4_extra]
        log(f"-- table4 {name}: python examples/train.py {' '.join(argv)}  [{ctx.elapsed()}]")
        t = time.perf_counter()
        with small_digits(300, 100) if s.quick else nullcontext():
            res = train_main(argv)
        summ = res["summary"]
        results.append(
            {
                "name": name,
                "argv": argv,
                "args": res["args"],
                "summary": summ,
                "switches": res["reuse"]["switches"],
                "stock_epochs": res["stock"]["epochs"],
                "reuse_epochs": res["reuse"]["epochs"],
                "wall_s": time.perf_counter() - t,
            }
        )
    record = {"epochs": s.table4_epochs, "runs": results, "shared_machine_note": "timings noisy: shared 2-core CPU"}
    report_table4(ctx, record)
    return record


def report_table4(ctx: Ctx, record: dict) -> None:
    """table4.md/.png/.json from the runs' records."""
    results = record["runs"]
    rows, rows_sw = [], []
    for r in results:
        sm, a = r["summary"], r["args"]
        ratio = sm["reuse_train_time_s"] / sm["stock_train_time_s"]
        phase = reuse_phase_ratio(r)
        first = initial_stages(r)
        rows.append(
            [
                r["name"],
                f"{a['policy']}/{a['l_values']}",
                ", ".join(f"{k}: {v}" for k, v in first.items()),
                "-" if phase is None else f"{phase[0]:.3f} ({phase[1]} ep.)",
                f"{sm['stock_train_time_s']:.1f}",
                f"{sm['reuse_train_time_s']:.1f}",
                f"{ratio:.3f}",
                f"{sm['time_saved'] * 100:.1f}%",
                sm["stock_final_test_acc"],
                sm["reuse_final_test_acc_exact"],
                sm["reuse_final_test_acc_at_stage"],
                sm["switches"],
                ", ".join(f"{k}: {v}" for k, v in sm["final_stages"].items()),
                ", ".join(f"{k}: {v:.4f}" for k, v in sm["r_c_mean"].items()),
                PAPER_TABLE4.get(r["args"]["strategy"], "-") if r["name"] in PAPER_TABLE4 else "-",
            ]
        )
        for sw in r["switches"]:
            best = max(sw.get("probes") or [], key=lambda p: p["acc"], default=None)
            rows_sw.append(
                [
                    r["name"],
                    sw["epoch"],
                    sw["step"],
                    sw["layer"],
                    f"{sw['old']} -> {sw['new']}",
                    sw["rule"],
                    sw.get("A_cur"),
                    None if best is None else f"{best['acc']:.4f} (L={best['L']} H={best['H']})",
                ]
            )
    a0 = results[0]["args"]
    md = (
        "# Table IV: training-time savings of the strategies\n\n"
        f"Each row is one call of `examples/train.py` (CifarNet, {a0['epochs']} epochs, batch {a0['batch_size']}, "
        f"Adam lr {a0['lr']}, seed {a0['seed']}, finish '{a0['finish']}', patience {a0['patience']}, window "
        f"{a0['window'] or 'half an epoch'}, probe {a0['probe_size']} training images, both runs in "
        f"{a0['memory_format']}); every call runs its own stock baseline, and time saved = 1 - reuse/stock of "
        "that call. Policy/L values: the main job's default is measured/extended. **Timings are wall-clock "
        "on a shared 2-core CPU and are noisy (another user's jobs can slow either run); compare the ratio "
        "within a row, not times across rows.** Accuracy: test accuracy after the last epoch (exact inference, "
        "and at the final stage). mean r_c: train.py's summary value, r_c on the training batches that ran "
        "with reuse, averaged per epoch and over epochs. Paper (CifarNet on CIFAR-10, GTX1080): "
        "38% / 63% / 46% for strategies 1 / 2 / 3 with no accuracy loss.\n\n"
        + md_table(
            [
                "run",
                "policy/L values",
                "first stages",
                "reuse-epoch / stock-epoch time",
                "stock time (s)",
                "reuse time (s)",
                "reuse/stock",
                "time saved",
                "stock acc",
                "reuse acc (exact)",
                "reuse acc (stage)",
                "switches",
                "final stages",
                "mean r_c",
                "paper saving",
            ],
            rows,
        )
        + "\nreuse-epoch / stock-epoch time: mean duration of the epochs run entirely at a reuse stage (no "
        "switch inside, no layer that started with reuse exact at its end) over the stock run's mean "
        "duration of the same epochs, "
        "in the same call (how much faster a reuse epoch is, independent of when the controller stops "
        "reusing).\n\n## Stage switches\n\nA_cur: probe accuracy at the current stages; best probe: the "
        "best later candidate tried (strategy lh).\n\n"
        + md_table(["run", "epoch", "step", "layer", "switch", "rule", "A_cur", "best probe"], rows_sw)
    )
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in results]
    xs = np.arange(len(results))
    a1.bar(xs - 0.2, [r["summary"]["stock_train_time_s"] for r in results], 0.4, label="stock (same call)")
    a1.bar(xs + 0.2, [r["summary"]["reuse_train_time_s"] for r in results], 0.4, label="reuse")
    for i, r in enumerate(results):
        a1.text(
            i + 0.2,
            r["summary"]["reuse_train_time_s"],
            f"{r['summary']['time_saved'] * 100:.0f}%",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a1.set(xticks=xs, xticklabels=names, ylabel="training wall time (s)", title="time (label: time saved)")
    a1.legend(fontsize=8)
    for r in results:
        a2.plot(
            [e["time"] for e in r["reuse_epochs"]],
            [e["test_acc"] for e in r["reuse_epochs"]],
            "o-",
            ms=3,
            label=r["name"],
        )
    st = results[0]["stock_epochs"]
    a2.plot([e["time"] for e in st], [e["test_acc"] for e in st], "k--", label="stock (run of 'fixed')")
    a2.set(xlabel="training wall time (s)", ylabel="test accuracy (exact)", title="test accuracy during training")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "table4.png", dpi=110)
    plt.close(fig)
    ctx.write("table4", md, record)


# --------------------------------------------------------------------------- norm vs mean


def paired_norm_mean(rec: dict) -> list[dict]:
    """Pairs of fig8 points at the same (layer, L, H): same clusters, different centroid."""
    by = {(p["centroid"], p["layer"], p["L"], p["H"]): p for p in rec["points"]}
    pairs = []
    for (c, layer, L, H), m in by.items():
        n = by.get(("norm", layer, L, H))
        if c == "mean" and n is not None:
            pairs.append(
                {"layer": layer, "L": L, "H": H, "r_c": m["r_c"], "mean": m["accuracy"], "norm": n["accuracy"]}
            )
    return pairs


def train_fixed(ctx: Ctx, centroid: str | None, epochs: int, seed: int) -> dict:
    """One training run with train.py's loop (train_run): stock (centroid None) or reuse at
    the fixed stage ``norm_stage`` with the given centroid, no controller decisions. The seed
    sets the initial weights, the data order and the hash planes."""
    s = ctx.s
    data = ctx.data
    (x_tr, _), _ = data
    if s.quick:
        data = ((data[0][0][::10][:300], data[0][1][::10][:300]), (data[1][0][:100], data[1][1][:100]))
        x_tr = data[0][0]
    args = SimpleNamespace(seed=seed, lr=s.lr, adam="foreach", batch_size=s.batch_size, epochs=epochs, no_progress=True)
    torch.manual_seed(seed)
    base = cifarnet(in_channels=1, image_size=28)
    if centroid is None:
        return train_run(f"stock s{seed}", base, data, args)
    cfg = ReuseConfig(
        seed=seed,
        L={k: v[0] for k, v in s.norm_stage.items()},
        H={k: v[1] for k, v in s.norm_stage.items()},
        centroid=centroid,
    )
    gm = reuse_compile(base, x_tr[: s.batch_size], config=cfg)
    return train_run(f"{centroid} s{seed}", gm, data, args, lambda m: AdaptiveReuse(m, "fixed", finish=None))


def cmd_norm(ctx: Ctx) -> dict:
    s = ctx.s
    path = ctx.out / "fig8.json"
    if path.exists():
        rec8 = json.loads(path.read_text())
        log(f"== norm: (a) paired accuracies from {path}")
    else:
        log("== norm: (a) no fig8.json: running the fig8 sweep")
        rec8 = run_fig8_sweep(ctx)
    pairs = paired_norm_mean(rec8)
    bins = [(0.0, 0.01, "r_c < 0.01"), (0.01, 0.1, "0.01 <= r_c < 0.1"), (0.1, 2.0, "r_c >= 0.1"), (0.0, 2.0, "all")]
    rows_a, stats_a = [], []
    for layer in LAYERS:
        for lo, hi, label in bins:
            ps = [p for p in pairs if p["layer"] == layer and lo <= p["r_c"] < hi]
            if not ps:
                continue
            d = np.array([p["norm"] - p["mean"] for p in ps])
            st = {
                "layer": layer,
                "bin": label,
                "points": len(ps),
                "norm_better": int((d > 0).sum()),
                "equal": int((d == 0).sum()),
                "mean_better": int((d < 0).sum()),
                "mean_diff": float(d.mean()),
                "max_diff": float(d.max()),
                "min_diff": float(d.min()),
            }
            stats_a.append(st)
            rows_a.append(list(st.values()))
    log(
        f"== norm: (b) training at a fixed stage {s.norm_stage}, {s.norm_epochs} epochs, stock / mean / norm, "
        f"seeds {list(s.norm_seeds)}"
    )
    runs = {}  # "<name> s<seed>" -> train_run record
    for seed in s.norm_seeds:
        for centroid in (None, "mean", "norm"):
            runs[f"{centroid or 'stock'} s{seed}"] = train_fixed(ctx, centroid, s.norm_epochs, seed)
            log(f"   [{ctx.elapsed()}]")

    def last3(rec, key):
        return float(np.mean([e[key] for e in rec["epochs"][-3:]]))

    rows_b = []
    for name, rec in runs.items():
        last = rec["epochs"][-1]
        rc = last.get("r_c", {})
        rows_b.append(
            [
                name,
                last["test_acc"],
                last["test_acc_at_stage"],
                last3(rec, "test_acc"),
                last3(rec, "test_acc_at_stage"),
                max(e["test_acc"] for e in rec["epochs"]),
                last["train_loss"],
                f"{rec['train_time']:.1f}",
                ", ".join(f"{k}: {v:.4f}" for k, v in rc.items() if v is not None) or "-",
            ]
        )
    for name in ("stock", "mean", "norm"):
        recs = [runs[f"{name} s{seed}"] for seed in s.norm_seeds]
        if len(recs) > 1:
            rows_b.append(
                [
                    f"**{name}, mean of {len(recs)} seeds**",
                    float(np.mean([r["epochs"][-1]["test_acc"] for r in recs])),
                    float(np.mean([r["epochs"][-1]["test_acc_at_stage"] for r in recs])),
                    float(np.mean([last3(r, "test_acc") for r in recs])),
                    float(np.mean([last3(r, "test_acc_at_stage") for r in recs])),
                    float(np.mean([max(e["test_acc"] for e in r["epochs"]) for r in recs])),
                    float(np.mean([r["epochs"][-1]["train_loss"] for r in recs])),
                    f"{np.mean([r['train_time'] for r in recs]):.1f}",
                    "",
                ]
            )
    s0 = s.norm_seeds[0]
    epochs = [e["epoch"] for e in runs[f"stock s{s0}"]["epochs"]]
    rows_c = [
        [ep, seed]
        + [runs[f"stock s{seed}"]["epochs"][i]["test_acc"]]
        + [runs[f"{c} s{seed}"]["epochs"][i][k] for c in ("mean", "norm") for k in ("test_acc", "test_acc_at_stage")]
        for seed in s.norm_seeds
        for i, ep in enumerate(epochs)
    ]
    stage = ", ".join(f"{k} L={v[0]} H={v[1]}" for k, v in s.norm_stage.items())
    md = (
        "# Centroid 'mean' (paper) vs 'norm' (ours)\n\n"
        "## (a) Inference: paired fig8 points\n\n"
        f"Each pair is one (layer, L, H) of the fig8 sweep ({rec8['images']} test images, exact accuracy "
        f"{rec8['exact_accuracy']:.4f}): identical clusters and r_c, only the centroid differs. "
        "diff = accuracy(norm) - accuracy(mean).\n\n"
        + md_table(
            ["layer", "r_c range", "pairs", "norm better", "equal", "mean better", "mean diff", "max diff", "min diff"],
            rows_a,
        )
        + "\n## (b) Training at a fixed aggressive stage\n\n"
        f"Stage: {stage}, no cluster reuse, for the whole run (strategy 'fixed' without a finish); "
        f"{s.norm_epochs} epochs with train.py's loop (train_run: Adam lr {s.lr}, batch {s.batch_size}); per "
        f"seed ({', '.join(map(str, s.norm_seeds))}) the three runs share initial weights, data order and (mean, "
        "norm) hash planes. Last 3: mean over the last three epochs (less noisy than the last one). "
        "Test accuracy with exact inference "
        "and at the training stage (both on the shuffled test set, batches of 500). Times are wall-clock on a "
        "shared 2-core CPU (noisy). r_c: as train_run records it, from the last forward of its end-of-epoch "
        "evaluation at stage (the last batch of 500 test images), not from training batches.\n\n"
        + md_table(
            [
                "run",
                "final acc (exact)",
                "final acc (stage)",
                "last 3 (exact)",
                "last 3 (stage)",
                "best acc (exact)",
                "final train loss",
                "train time (s)",
                "r_c (last epoch)",
            ],
            rows_b,
        )
        + "\nPer epoch (test accuracy):\n\n"
        + md_table(["epoch", "seed", "stock", "mean exact", "mean stage", "norm exact", "norm stage"], rows_c)
    )
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for layer, mk in zip(LAYERS, ("o", "s")):
        ps = [p for p in pairs if p["layer"] == layer]
        a1.scatter([p["r_c"] for p in ps], [p["norm"] - p["mean"] for p in ps], marker=mk, s=14, label=layer)
    a1.axhline(0, color="gray", lw=0.8)
    a1.set(xscale="log", xlabel="r_c", ylabel="acc(norm) - acc(mean)", title="(a) same clusters, norm vs mean")
    a1.legend(fontsize=8)
    for name, color in (("stock", "k"), ("mean", "tab:blue"), ("norm", "tab:orange")):
        for j, seed in enumerate(s.norm_seeds):
            ep = runs[f"{name} s{seed}"]["epochs"]
            xs = [e["epoch"] for e in ep]
            a2.plot(
                xs,
                [e["test_acc"] for e in ep],
                "o-",
                color=color,
                ms=3,
                alpha=1 - 0.45 * j,
                label=f"{name} exact" if j == 0 else None,
            )
            if name != "stock":
                a2.plot(
                    xs,
                    [e["test_acc_at_stage"] for e in ep],
                    "x--",
                    color=color,
                    ms=3,
                    alpha=1 - 0.45 * j,
                    label=f"{name} at stage" if j == 0 else None,
                )
    seeds = ", ".join(map(str, s.norm_seeds))
    a2.set(
        xlabel="epoch", ylabel="test accuracy", title=f"(b) training at {stage}\n(seeds {seeds}; paler: later seeds)"
    )
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "norm.png", dpi=110)
    plt.close(fig)
    record = {"paired": stats_a, "pairs": pairs, "stage": s.norm_stage, "runs": runs}
    ctx.write("norm", md, record)
    return record


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=[*COMMANDS, "all"])
    p.add_argument("--out", default="runs/reproduce", help="output folder (weights, PNGs, tables)")
    p.add_argument("--quick", action="store_true", help="tiny version of every experiment (smoke test)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.quick_settings() if args.quick else Settings()
    ctx = Ctx(Path(args.out), settings)
    todo = COMMANDS if args.command == "all" else (args.command,)
    log(
        f"reproduce {args.command} -> {ctx.out} ({'quick' if args.quick else 'full'}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    results = {}
    for name in todo:
        t = time.perf_counter()
        results[name] = globals()[f"cmd_{name}"](ctx)
        log(f"== {name} done in {time.perf_counter() - t:.0f}s (total {ctx.elapsed()})\n")
    return results


if __name__ == "__main__":
    main()
