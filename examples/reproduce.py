"""Reproduce the paper's inference and training experiments (Fig. 7, Fig. 8, Table III,
Table IV) on the 5,000 real MNIST digits with CifarNet, plus a comparison of the two
centroid variants ("mean", the paper's, and "norm").

    python examples/reproduce.py all --out runs/reproduce          # everything, ~30 min on 2 cores
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
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a source checkout

from examples.train import evaluate, load_digits, train_run  # noqa: E402
from reuse_compiler.models import cifarnet  # noqa: E402

COMMANDS = ("train", "fig7", "fig8", "table3", "table4", "norm")
LAYERS = ("conv1", "conv2")
SEED = 0
WEIGHTS = "cifarnet_digits.pt"


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Every size knob of the experiments; ``quick()`` shrinks them for the smoke test."""

    quick: bool = False
    train_epochs: int = 10
    train_subset: int = 0  # 0: all 4,000 training images
    batch_size: int = 128
    lr: float = 1e-3
    # fig7 (k-means)
    fig7_images: int = 500
    fig7_batch: int = 100
    fig7_rc_input: tuple = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
    fig7_rc_batch: tuple = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
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
    table4_epochs: int = 8
    table4_extra: list = field(default_factory=list)  # extra argv for train.py (quick mode)
    # norm (training at a fixed aggressive stage)
    norm_epochs: int = 8
    norm_stage: dict = field(default_factory=lambda: {"conv1": (25, 10), "conv2": (320, 8)})

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            quick=True,
            train_epochs=1,
            train_subset=1000,
            fig7_images=40,
            fig7_batch=20,
            fig7_rc_input=(0.05, 0.3),
            fig7_rc_batch=(0.005, 0.02),
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
            table4_extra=["--test-fraction", "0.9", "--batch-size", "100", "--probe-size", "64"],
            norm_epochs=1,
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
            return f"{v:.4f}"
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
    args = SimpleNamespace(seed=SEED, lr=s.lr, batch_size=s.batch_size, epochs=s.train_epochs, no_progress=True)
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
