"""``AdaptiveReuse``: walks each layer through its reuse stages during training (Section V).

Used like an LR scheduler::

    ctl = AdaptiveReuse(gm, strategy="lh", probe=(x_probe, y_probe))
    for x, y in loader:
        loss = loss_fn(gm(x), y); loss.backward(); opt.step(); opt.zero_grad()
        ctl.step(loss.item())

Strategies:

- ``"lh"`` (Strategy 1): every layer starts at its first Policy-3 candidate. When the loss
  stops decreasing, each layer in turn is probed: A_cur is the probe accuracy at the
  current stages, A_j the accuracy with the layer moved to its candidate j > i, and the
  layer moves to the first j passing Amendment 3.1 (A_cur < 0.5: A_j / A_cur >= 1.5) or
  3.2 (A_cur >= 0.5: A_j - A_cur >= 0.1); if none does, to the first j passing 3.3
  (A_j / A_cur >= 1.1). If no candidate passes even 3.3, or the layer is at its last
  candidate, the layer's walk ends: with ``finish="exact"`` it runs exact from then on,
  otherwise it keeps its stage.
- ``"cr"`` (Strategy 2): the layers keep their (L, H) with cluster reuse on; at the first
  plateau cluster reuse goes off (and, with ``finish="exact"``, the layers go exact at the
  next plateau).
- ``"fixed"``: (L, H) fixed throughout (Table IV's strategy 1); with ``finish="exact"`` the
  layers go exact at the first plateau.

Plateaus follow ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode "min"): a value
improves on the best if it is below ``best * (1 - threshold)`` ("rel") or
``best - threshold`` ("abs"); after more than ``patience`` values without improvement it
is a plateau; then ``cooldown`` values are ignored. With ``window > 1`` the detector sees
the mean of every ``window`` consecutive ``step`` values (per-batch losses are noisy).
Under ``torch.distributed`` the loss is averaged over ranks and rank 0's decision is
broadcast, so every rank switches identically at the same step.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import fx

from reuse_compiler.passes.conv_rewrite import state_path
from reuse_compiler.runtime.dist import collective_device
from reuse_compiler.runtime.dist import group as distributed_group

from .api import _compiled, set_stage

__all__ = ["AdaptiveReuse", "STRATEGIES"]

log = logging.getLogger("reuse_compiler")

STRATEGIES = ("lh", "cr", "fixed")


def _stage_of(row) -> dict:
    return {"L": row.L, "H": row.H, "exact": row.exact, "cluster_reuse": row.cluster_reuse}


def _fmt(stage: dict) -> str:
    if stage["exact"]:
        return "exact"
    return f"L={stage['L']} H={stage['H']}" + (" CR" if stage["cluster_reuse"] else "")


class AdaptiveReuse:
    """Adaptive deep reuse controller. See the module docstring for the strategies.

    Args:
        gm: a module returned by :func:`reuse_compile`.
        strategy: "lh", "cr" or "fixed".
        probe: ``(x, y)`` tensors (probe accuracy = argmax(gm(x)) == y in eval mode), or a
            callable ``probe(gm) -> accuracy``. Required for "lh".
        patience, threshold, threshold_mode, cooldown: plateau detection as in
            ``ReduceLROnPlateau``.
        window: number of ``step`` values averaged into one plateau-detector value.
        finish: None, or "exact" to end each layer's walk at the exact convolution.

    >>> import torch
    >>> from reuse_compiler import reuse_compile
    >>> from reuse_compiler.models import cifarnet
    >>> gm = reuse_compile(cifarnet(in_channels=1, image_size=28), torch.randn(8, 1, 28, 28))
    >>> ctl = AdaptiveReuse(gm, "fixed", patience=0, finish="exact")
    >>> [ctl.step(loss) for loss in [1.0, 0.9, 0.95]]  # True: a plateau at the third value
    [False, False, True]
    >>> [h["new"] for h in ctl.history]
    ['exact', 'exact']
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        strategy: str = "lh",
        probe=None,
        *,
        patience: int = 2,
        threshold: float = 1e-3,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        window: int = 1,
        finish: str | None = None,
    ):
        self.plan = _compiled(gm)
        if strategy not in STRATEGIES:
            raise ValueError(f"AdaptiveReuse: strategy must be one of {STRATEGIES}, got {strategy!r}")
        if finish not in (None, "exact"):
            raise ValueError(f"AdaptiveReuse: finish must be None or 'exact', got {finish!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"AdaptiveReuse: threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        for name, v in (("patience", patience), ("cooldown", cooldown)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"AdaptiveReuse: {name} must be an int >= 0, got {v!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"AdaptiveReuse: window must be an int >= 1, got {window!r}")
        if strategy == "lh" and probe is None:
            raise ValueError("AdaptiveReuse: strategy 'lh' needs probe=(x, y) or a callable probe(gm) -> accuracy")
        self.gm = gm
        self.strategy = strategy
        self.probe = probe
        self.patience, self.threshold, self.threshold_mode = patience, threshold, threshold_mode
        self.cooldown, self.window, self.finish = cooldown, window, finish
        self.layers = [r.name for r in self.plan.rows() if r.rewritable]
        self.steps = 0
        self._buffer: list[float] = []
        self.best = math.inf
        self.num_bad = 0
        self.cooldown_counter = 0
        self.plateaus = 0
        self.settled: set[str] = set()
        self.history: list[dict] = []
        if strategy == "lh":
            for name in self.layers:
                L, H = self.plan[name].candidates[0]
                set_stage(gm, name, L=L, H=H, cluster_reuse=False, exact=False)
        elif strategy == "cr":
            set_stage(gm, cluster_reuse=True, exact=False)
        else:  # "fixed": Table IV's strategy 1, without cluster reuse (as "lh")
            for name in self.layers:
                if self.plan[name].cluster_reuse:
                    set_stage(gm, name, cluster_reuse=False)

    # ------------------------------------------------------------------ plateaus

    def _improves(self, value: float) -> bool:
        if self.threshold_mode == "rel":
            return value < self.best * (1 - self.threshold)
        return value < self.best - self.threshold

    def step(self, loss: float) -> bool:
        """Feed one loss value; returns True if a plateau was detected at this step (the
        stages change at it unless :attr:`done`)."""
        self.steps += 1
        value = float(loss)
        d = distributed_group()
        if d is not None:
            t = torch.tensor([value], dtype=torch.float64, device=collective_device())
            d.all_reduce(t)
            value = t.item() / d.get_world_size()
        self._buffer.append(value)
        if len(self._buffer) < self.window:
            return False
        value = sum(self._buffer) / len(self._buffer)
        self._buffer = []
        if self._improves(value):
            self.best, self.num_bad = value, 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad <= self.patience:
            return False
        self.cooldown_counter, self.num_bad = self.cooldown, 0
        self.plateaus += 1
        if not self.done:
            self._on_plateau()
        return True

    @property
    def done(self) -> bool:
        """True when no plateau can change anything any more."""
        rows = [self.plan[n] for n in self.layers]
        if self.strategy == "lh":
            return len(self.settled) == len(self.layers)
        if self.strategy == "cr":
            if any(r.cluster_reuse for r in rows):
                return False
        return self.finish is None or all(r.exact for r in rows)

    # ------------------------------------------------------------------ decisions

    def _on_plateau(self) -> None:
        d = distributed_group()
        if d is None or d.get_rank() == 0:
            changes = self._decide()
        else:
            changes = None
        if d is not None:
            box = [changes]
            d.broadcast_object_list(box, src=0)
            changes = box[0]
        for change in changes:
            new = change["new_stage"]
            set_stage(self.gm, change["layer"], **new)
            if change.get("settled"):
                self.settled.add(change["layer"])
            entry = {k: v for k, v in change.items() if k not in ("new_stage", "settled")}
            entry.update(step=self.steps, plateau=self.plateaus)
            self.history.append(entry)
            log.info(
                "reuse: step %d plateau %d: %s %s -> %s (%s)",
                self.steps,
                self.plateaus,
                change["layer"],
                change["old"],
                change["new"],
                change["rule"],
            )

    def _change(self, name: str, old: dict, new: dict, rule: str, **extra) -> dict:
        return {"layer": name, "old": _fmt(old), "new": _fmt(new), "rule": rule, "new_stage": new, **extra}

    def _decide(self) -> list[dict]:
        changes = []
        if self.strategy == "lh":
            for name in self.layers:
                if name not in self.settled:
                    changes.append(self._decide_lh(name))
            return changes
        for name in self.layers:
            row = self.plan[name]
            old = _stage_of(row)
            if self.strategy == "cr" and row.cluster_reuse:
                changes.append(self._change(name, old, {**old, "cluster_reuse": False}, "cluster reuse off"))
            elif self.finish == "exact" and not row.exact:
                changes.append(self._change(name, old, {**old, "exact": True}, "finish"))
        return changes

    def _decide_lh(self, name: str) -> dict:
        row = self.plan[name]
        old = _stage_of(row)
        cands = row.candidates
        i = row.stage if row.stage is not None else 0
        a_cur = self._probe()
        trials = []
        chosen = rule = None
        # The built-in probe's accuracy is at most 1: above A_cur = 1/1.1 not even a perfect
        # candidate could pass an amendment, so none is probed (same decision, no probe
        # forwards). A callable probe may return any score: its candidates are all probed.
        reachable = callable(self.probe) or _passes_31_32(1.0, a_cur) or _passes_33(1.0, a_cur)
        # the probes' set_stage calls empty the layer's measurements: kept, and restored with
        # the stage (the plan's r_c stays the training batches', as _probe keeps the others')
        state = self.gm.get_submodule(state_path(name))
        kept = (dict(state.last_counts), row.r_c, row.reuse_rate, row.flop_ratio)

        def back() -> None:
            set_stage(self.gm, name, L=old["L"], H=old["H"])
            state.last_counts = dict(kept[0])
            row.r_c, row.reuse_rate, row.flop_ratio = kept[1:]

        try:
            for j in range(i + 1, len(cands) if reachable else i + 1):
                set_stage(self.gm, name, L=cands[j][0], H=cands[j][1])
                a_j = self._probe()
                trials.append((j, a_j))
                if _passes_31_32(a_j, a_cur):
                    chosen, rule = j, "amendment 3.1" if a_cur < 0.5 else "amendment 3.2"
                    break
        except BaseException:  # a failed probe (an error, Ctrl-C) leaves the layer where it was
            back()
            raise
        if chosen is None:
            for j, a_j in trials:
                if _passes_33(a_j, a_cur):
                    chosen, rule = j, "amendment 3.3"
                    break
        probes = [{"L": cands[j][0], "H": cands[j][1], "acc": a} for j, a in trials]
        if chosen is not None:
            new = {**old, "L": cands[chosen][0], "H": cands[chosen][1], "exact": False}
            a_new = dict(trials)[chosen]
            back()  # applied with the others
            return self._change(name, old, new, rule, A_cur=a_cur, A_new=a_new, probes=probes)
        # 3.3 found nothing (or no candidate is left): the layer's walk ends here
        back()
        new = {**old, "exact": True} if self.finish == "exact" else old
        why = "last candidate" if i == len(cands) - 1 else "no candidate passes 3.3"
        extra = {} if reachable else {"unreachable": True}
        return self._change(
            name, old, new, f"end: {why}", A_cur=a_cur, A_new=None, probes=probes, settled=True, **extra
        )

    def _probe(self) -> float:
        """Probe accuracy at the current stages, in eval mode, leaving the plan's
        training measurements as they were."""
        gm = self.gm
        states = [gm.get_submodule(f"reuse_state.{m}") for m, _ in gm.reuse_state.named_children()]
        saved = [dict(s.last_counts) for s in states]
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                if callable(self.probe):
                    acc = float(self.probe(gm))
                else:
                    x, y = self.probe
                    acc = (gm(x).argmax(1) == y).float().mean().item()
        finally:
            gm.train(was_training)
            for s, c in zip(states, saved):
                s.last_counts = c
        return acc

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to resume with the same stages and the same later decisions."""
        return {
            "strategy": self.strategy,
            "steps": self.steps,
            "buffer": list(self._buffer),
            "best": self.best,
            "num_bad": self.num_bad,
            "cooldown_counter": self.cooldown_counter,
            "plateaus": self.plateaus,
            "settled": sorted(self.settled),
            "history": [dict(h) for h in self.history],
            "stages": {n: _stage_of(self.plan[n]) for n in self.layers},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["strategy"] != self.strategy:
            raise ValueError(
                f"AdaptiveReuse.load_state_dict: saved strategy {state['strategy']!r} != {self.strategy!r}"
            )
        unknown = sorted(set(state["stages"]) - set(self.layers))
        if unknown:
            raise ValueError(f"AdaptiveReuse.load_state_dict: layers {unknown} are not in this module's plan")
        self.steps = state["steps"]
        self._buffer = list(state["buffer"])
        self.best, self.num_bad = state["best"], state["num_bad"]
        self.cooldown_counter, self.plateaus = state["cooldown_counter"], state["plateaus"]
        self.settled = set(state["settled"])
        self.history = [dict(h) for h in state["history"]]
        for name, stage in state["stages"].items():
            set_stage(self.gm, name, **stage)


# The amendments' thresholds are met with a rounding allowance: accuracies are ratios of
# counts in floating point, and 0.7 - 0.6 is 0.09999999999999998 (an exact gain of 0.1 failed).
_EPS = 1e-9


def _passes_31_32(a_j: float, a_cur: float) -> bool:
    """Amendment 3.1 (A_cur < 0.5: A_j / A_cur >= 1.5) or 3.2 (A_cur >= 0.5: A_j - A_cur >= 0.1)."""
    return (a_cur < 0.5 and _ratio(a_j, a_cur) >= 1.5 - _EPS) or (a_cur >= 0.5 and a_j - a_cur >= 0.1 - _EPS)


def _passes_33(a_j: float, a_cur: float) -> bool:
    """Amendment 3.3: A_j / A_cur >= 1.1."""
    return _ratio(a_j, a_cur) >= 1.1 - _EPS


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return math.inf if a > 0 else 1.0
    return a / b
