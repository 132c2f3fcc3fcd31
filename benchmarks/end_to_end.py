"""End-to-end benchmark: time for stock and adaptive-reuse training to reach the stock run's
final test accuracy on the real digits, over several seeds.

Each seed runs the main job (``examples/train.py``: stock and reuse interleaved epoch by
epoch by default, same initial weights and data order) and reads, from its per-epoch
curves, the training wall time at which each run first reaches the stock run's final test
accuracy (exact-convolution evaluation), and the epoch at which each first reaches it. The
ratio reuse/stock of those times is the figure of merit (target <= 0.5); "not reached"
counts as a miss. Extra arguments go to ``examples/train.py``. The report's header and
summary.json's "args" are the training flags read back from the runs' saved arguments
(results.json "args"; flags at examples/train.py's current defaults left out), so a
``--report-only`` rewrite labels the runs it reads, whatever its own command line.

    python benchmarks/end_to_end.py --seeds 0 1 2
    python benchmarks/end_to_end.py --seeds 0 1 2 -- --policy paper --l-values fast
    python benchmarks/end_to_end.py --seeds 0 1 2 --out runs/e2e --report-only   # re-read a run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy_gap import first_epoch  # noqa: E402
from benchmarks.layers import machine_phase  # noqa: E402
from examples.train import DEFAULT_MAX_ERROR, auto_norm_grad, build_parser  # noqa: E402
from examples.train import main as train_main  # noqa: E402

# saved arguments that differ from seed to seed or name the run's output, not its settings
PER_RUN = ("seed", "out", "no_progress")


def saved_flags(saved: dict) -> list[str]:
    """examples/train.py's flags for a run's saved arguments (its results.json "args"):
    every setting not at the script's current default, as it would be typed (the seed and
    the output folder left out). A default resolved at run time (``--max-error``,
    ``--norm-grad auto``) counts as the default; a saved argument the script no longer has
    is shown as ``name=value``."""
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    resolved = {
        "max_error": DEFAULT_MAX_ERROR if saved.get("policy", defaults["policy"]) == "measured" else 0,
        "norm_grad": auto_norm_grad(saved.get("model", defaults["model"])),
    }
    flags, known = [], set()
    for action in parser._actions:
        d = action.dest
        known.add(d)
        if d in PER_RUN or d == "help" or d not in saved:
            continue
        v = saved[d]
        if v == defaults.get(d) or (d in resolved and defaults.get(d) in (None, "auto") and v == resolved[d]):
            continue
        opt = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true / store_false
            flags.append(opt)
        elif isinstance(v, list):
            flags += [opt, *map(str, v)]
        else:
            flags += [opt, str(v)]
    flags += [f"{k}={v}" for k, v in saved.items() if k not in known and k not in PER_RUN]
    return flags


def epoch_to(rec: dict, target: float) -> int | None:
    """The first epoch (counted from 1) whose test accuracy >= target (a run's record;
    ``accuracy_gap.first_epoch`` on its curve)."""
    return first_epoch([e["test_acc"] for e in rec["epochs"]], target)


def time_to(rec: dict, target: float) -> float | None:
    """Training wall time at the end of the first epoch whose test accuracy >= target."""
    i = epoch_to(rec, target)
    return None if i is None else rec["epochs"][i - 1]["time"]


def smoothed(rec: dict, k: int) -> dict:
    """``rec`` with each epoch's test accuracy replaced by the mean over it and the k - 1
    epochs before it (epochs before the k-th dropped): one epoch's accuracy on the
    1,000-digit split moves by +-0.5 points, a k-epoch mean less."""
    accs = [e["test_acc"] for e in rec["epochs"]]
    return {
        **rec,
        "epochs": [
            {**e, "test_acc": sum(accs[i - k + 1 : i + 1]) / k} for i, e in enumerate(rec["epochs"]) if i >= k - 1
        ],
    }


def acc_at(rec: dict, t: float) -> float | None:
    """Best test accuracy among the epochs that ended by training wall time t."""
    accs = [e["test_acc"] for e in rec["epochs"] if e["time"] <= t + 1e-9]
    return max(accs) if accs else None


def row_of(seed: int, stock: dict, reuse: dict, tolerance: float, smooth: int = 3) -> dict:
    target = stock["epochs"][-1]["test_acc"]
    t_stock, t_reuse = time_to(stock, target), time_to(reuse, target)
    stock_hit = epoch_to(stock, target)
    # secondary views (the figure of merit stays "ratio"): the same with the target lowered by
    # `tolerance`, and what stock had reached when the reuse run ended
    t_stock_tol, t_reuse_tol = time_to(stock, target - tolerance), time_to(reuse, target - tolerance)
    # with --reuse-epochs above stock's: the same figure had the reuse run stopped with stock
    hit = epoch_to(reuse, target)
    n_stock = len(stock["epochs"])
    # and with both curves smoothed (k-epoch means): stock's last mean as the target
    s_stock, s_reuse = smoothed(stock, smooth), smoothed(reuse, smooth)
    t_s = time_to(s_reuse, s_stock["epochs"][-1]["test_acc"]) if s_stock["epochs"] and s_reuse["epochs"] else None
    return {
        "seed": seed,
        "target_acc": target,
        "stock_time_to_target": t_stock,
        "reuse_time_to_target": t_reuse,
        "ratio": None if t_reuse is None else t_reuse / t_stock,
        "tolerance": tolerance,
        "ratio_within_tolerance": None if t_reuse_tol is None else t_reuse_tol / t_stock_tol,
        "stock_epoch_to_target": stock_hit,
        "reuse_epoch_to_target": hit,
        "stock_epochs": n_stock,
        "reuse_epochs": len(reuse["epochs"]),
        "ratio_in_stock_epochs": None if hit is None or hit > n_stock else t_reuse / t_stock,
        "smooth": smooth,
        "ratio_smoothed": None if t_s is None else t_s / time_to(s_stock, s_stock["epochs"][-1]["test_acc"]),
        "stock_acc_at_reuse_total": acc_at(stock, reuse["train_time"]),
        "stock_total": stock["train_time"],
        "reuse_total": reuse["train_time"],
        "total_ratio": reuse["train_time"] / stock["train_time"],
        "reuse_final_acc": reuse["epochs"][-1]["test_acc"],
        "reuse_best_acc": max(e["test_acc"] for e in reuse["epochs"]),
        "switches": len(reuse["switches"]),
        "epoch_ratio": epoch_ratio(stock, reuse),
    }


def epoch_ratio(stock: dict, reuse: dict) -> float | None:
    """Median over epochs 2.. of reuse's epoch time over stock's same epoch (the first has the
    warm-up): the speed of a reuse epoch, whichever epoch reaches the target."""

    def times(rec):
        t = [e["time"] for e in rec["epochs"]]
        return [b - a for a, b in zip(t, t[1:])]

    pairs = list(zip(times(stock), times(reuse)))
    return statistics.median(r / s for s, r in pairs) if pairs else None


def run(seeds, extra, out: Path, tolerance: float, report_only: bool = False, smooth: int = 3) -> list[dict]:
    """One row per seed (:func:`row_of`), each with the run's saved training arguments
    (``train_args``: results.json "args")."""
    rows = []
    for seed in seeds:
        path = out / f"seed{seed}"
        phase = None
        if report_only:  # the runs' saved curves (examples/train.py's results.json)
            res = json.loads((path / "results.json").read_text())
        else:
            phase = machine_phase()
            res = train_main([*extra, "--seed", str(seed), "--no-progress", "--out", str(path)])
        rows.append(row_of(seed, res["stock"], res["reuse"], tolerance, smooth))
        rows[-1]["train_args"] = res.get("args", {})
        if phase:
            rows[-1]["machine_phase_before"] = phase
    return rows


def median_with_misses(ratios) -> float | None:
    """Median of time ratios where a miss (None) counts as slower than every reached seed (its
    ratio is beyond its total time); None when that median is a miss."""
    med = statistics.median(x if x is not None else float("inf") for x in ratios)
    return None if med == float("inf") else med


def run_flags(rows) -> list[str] | None:
    """The training flags shared by every row's saved arguments (:func:`saved_flags`);
    None when the seeds' runs differ in them."""
    flags = [saved_flags(r.get("train_args") or {}) for r in rows]
    return flags[0] if flags and all(f == flags[0] for f in flags) else None


def report(rows, extra) -> str:
    """The tables; ``extra``: the training flags that label the runs (:func:`run_flags`), or
    None when the seeds' runs used different ones (then each seed's are listed)."""
    if extra is None:
        per_seed = "; ".join(
            f"seed {r['seed']}: {' '.join(saved_flags(r.get('train_args') or {})) or '(defaults)'}" for r in rows
        )
        head = f"end-to-end: examples/train.py, the seeds' runs with different flags: {per_seed}"
    else:
        head = f"end-to-end: examples/train.py {' '.join(extra) or '(defaults)'}"
    lines = [
        head,
        "| seed | stock final acc (target) | stock reaches it at epoch | reuse reaches it at epoch | "
        "stock time to target (s) | reuse time to target (s) | ratio | "
        "total train time stock / reuse (s) | total ratio | reuse final acc | switches |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tr = "not reached" if r["reuse_time_to_target"] is None else f"{r['reuse_time_to_target']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        se = "-" if r.get("stock_epoch_to_target") is None else str(r["stock_epoch_to_target"])
        re_ = r.get("reuse_epoch_to_target")
        re_ = f"not in {r['reuse_epochs']} (best {r['reuse_best_acc']:.4f})" if re_ is None else str(re_)
        lines.append(
            f"| {r['seed']} | {r['target_acc']:.4f} | {se} | {re_} | {r['stock_time_to_target']:.1f} | {tr} | "
            f"{ratio} | {r['stock_total']:.1f} / {r['reuse_total']:.1f} | {r['total_ratio']:.2f} | "
            f"{r['reuse_final_acc']:.4f} | {r['switches']} |"
        )
    reached = [r["ratio"] for r in rows if r["ratio"] is not None]
    median_all = median_with_misses(r["ratio"] for r in rows)
    epochs = [r["epoch_ratio"] for r in rows if r.get("epoch_ratio") is not None]
    lines.append(
        f"\nmedian total-time ratio {statistics.median(r['total_ratio'] for r in rows):.2f}"
        + (f"; median epoch-time ratio {statistics.median(epochs):.2f}" if epochs else "")
        + f"; target reached in {len(reached)}/{len(rows)} seeds"
        + (f", median time-to-target ratio {statistics.median(reached):.2f} over those" if reached else "")
        + (
            f", {median_all:.2f} counting the misses as failures"
            if median_all is not None
            else ", median over all seeds: not reached"
        )
    )
    phases = [f"seed {r['seed']}: {r['machine_phase_before']}" for r in rows if r.get("machine_phase_before")]
    if phases:
        lines.append("machine phase before each seed (benchmarks/layers.py machine_phase): " + "; ".join(phases))
    longer = [r for r in rows if r.get("reuse_epochs", 0) > r.get("stock_epochs", 0)]
    if longer:  # the same runs, read as if the reuse run had stopped with stock's
        within = [r["ratio_in_stock_epochs"] for r in longer if r["ratio_in_stock_epochs"] is not None]
        med = median_with_misses(r["ratio_in_stock_epochs"] for r in longer)
        lines.append(
            f"within stock's {longer[0]['stock_epochs']} epochs (the reuse run trained up to "
            f"{longer[0]['reuse_epochs']}): reached in {len(within)}/{len(longer)} seeds"
            + (f", median {med:.2f} counting the misses" if med is not None else ", median: not reached")
        )
    tol = rows[0]["tolerance"] if rows else 0.0
    k = rows[0].get("smooth", 3) if rows else 3
    lines += [
        "",
        f"Secondary views (not the target): time ratio to stock's final accuracy minus {tol:g}; the same "
        f"ratio with both runs' accuracy curves smoothed ({k}-epoch means; target: stock's last mean); best "
        "accuracy of each run; stock's best accuracy by the time the reuse run ended.",
        "",
        f"| seed | ratio to target - {tol:g} | reuse epoch reaching the target | ratio, {k}-epoch means | "
        "reuse best acc | stock best acc by the reuse run's total time |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rt = "not reached" if r["ratio_within_tolerance"] is None else f"{r['ratio_within_tolerance']:.2f}"
        sa = "-" if r["stock_acc_at_reuse_total"] is None else f"{r['stock_acc_at_reuse_total']:.4f}"
        ep = "-" if r.get("reuse_epoch_to_target") is None else str(r["reuse_epoch_to_target"])
        rs = "not reached" if r.get("ratio_smoothed") is None else f"{r['ratio_smoothed']:.2f}"
        lines.append(f"| {r['seed']} | {rt} | {ep} | {rs} | {r['reuse_best_acc']:.4f} | {sa} |")
    if rows:
        smooth = [r.get("ratio_smoothed") for r in rows]
        med = median_with_misses(smooth)
        lines.append(
            f"\n{k}-epoch means: reached in {sum(x is not None for x in smooth)}/{len(rows)} seeds, median "
            + (f"{med:.2f} counting the misses" if med is not None else "not reached")
        )
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/end_to_end")
    ap.add_argument(
        "--tolerance", type=float, default=0.005, help="accuracy below stock's final one for the secondary ratio"
    )
    ap.add_argument(
        "--smooth", type=int, default=3, help="epochs per running mean for the smoothed secondary ratio (>= 1)"
    )
    ap.add_argument(
        "--report-only", action="store_true", help="re-read the seeds' results.json under --out instead of training"
    )
    args = ap.parse_args(argv)
    if args.smooth < 1:
        ap.error("--smooth must be >= 1 (1: no smoothing)")
    out = Path(args.out)
    if args.report_only and extra:
        print(f"--report-only: ignoring the training flags {' '.join(extra)} (the runs' saved ones label them)")
    rows = run(args.seeds, extra, out, args.tolerance, args.report_only, args.smooth)
    flags = run_flags(rows)
    text = report(rows, flags)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    # "args": the flags shared by every seed's run, null when they differ (then see "args_per_seed")
    per_seed = {str(r["seed"]): saved_flags(r["train_args"]) for r in rows}
    summary = {"args": flags, "args_per_seed": per_seed, "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
