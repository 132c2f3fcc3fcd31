"""The per-layer reuse plan attached to a compiled module as ``gm.reuse_plan``.

>>> plan = ReusePlan([LayerPlan(name="conv1", in_channels=1, out_channels=64, kernel_size=(5, 5),
...                             stride=(1, 1), padding=(2, 2, 2, 2), K=25, N=8192)])
>>> plan["conv1"].exact, len(plan)
(False, 1)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .policies import expected_cost

__all__ = ["LayerPlan", "ReusePlan"]


@dataclass
class LayerPlan:
    """One convolution's row of the plan: its shape, its Policy 1-3 parameters, its
    current stage, and what the last forward measured."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, bottom, left, right
    K: int
    N: int
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    L_range: tuple[int, int] | None = None
    H_range: tuple[int, int] | None = None
    L_values: list[int] = field(default_factory=list)
    candidates: list[tuple[int, int]] = field(default_factory=list)
    # current stage
    L: int | None = None
    H: int | None = None
    cluster_reuse: bool = False
    exact: bool = False
    reason: str | None = None
    # measured by the last forward (None before one)
    r_c: float | None = None
    reuse_rate: float | None = None
    flop_ratio: float | None = None
    # measured policy: compile-time timings of exact and every candidate
    calibration: dict | None = None
    node: str = ""  # the conv node in the traced source graph
    # how the layer runs when exact: "stock" (F.conv2d) or "zero-skip" (the same forward, a weight
    # gradient that skips its input's common values, calibration["zero_skip"]["skip"]; the measured
    # policy picks it where it times faster)
    exact_kernel: str = "stock"
    # ... or "conv-pool": the layer, the max-pool after it and its ReLU in one op (reuse.conv_pool;
    # calibration["conv_pool"]: its timings, the pool's node and the skipped values), a first
    # layer's input needing no gradient; the measured policy picks it where it times faster

    @property
    def rewritable(self) -> bool:
        """False when the layer can never run with reuse (``reason`` says why)."""
        return self.reason is None

    @property
    def zero_skipping(self) -> bool:
        """Whether the layer runs exact with the zero-skipping weight gradient now."""
        return self.exact and self.exact_kernel == "zero-skip"

    @property
    def fused_block(self) -> bool:
        """Whether the layer runs exact, in one op with the max-pool (and ReLU) after it, now."""
        return self.exact and self.exact_kernel == "conv-pool"

    @property
    def M(self) -> int:
        """Output channels per group (the M of the GEMM)."""
        return self.out_channels // self.groups

    @property
    def stage(self) -> int | None:
        """Index of the current (L, H) in ``candidates``, or None if it is not one."""
        try:
            return self.candidates.index((self.L, self.H))
        except ValueError:
            return None

    def _calibrated(self) -> dict | None:
        """The measured policy's calibration entry of the current stage (None if none)."""
        if self.calibration is None or self.exact:
            return None
        return next((c for c in self.calibration["candidates"] if (c["L"], c["H"]) == (self.L, self.H)), None)

    @property
    def generic_chain(self) -> bool:
        """Whether the current stage runs the generic chain where the per-pixel chain would fit:
        the measured policy's calibration timed the generic chain clearly faster there (its
        entry's ``chain``). False without a calibration (the per-pixel chain is the default)."""
        c = self._calibrated()
        return c is not None and c.get("chain") == "generic"

    @property
    def time_ratio(self) -> float | None:
        """Measured forward+backward time of the current stage / exact (measured policy); for an
        exact layer with the zero-skipping weight gradient, its time / stock's."""
        if self.zero_skipping and self.calibration is not None:
            return self.calibration["zero_skip"]["ratio"]
        if self.fused_block and self.calibration is not None:  # the block's time / stock block's
            return self.calibration["conv_pool"]["ratio"]
        c = self._calibrated()
        return None if c is None else c["ratio"]

    @property
    def output_error(self) -> float | None:
        """Measured relative output error of the current stage on the example batch (measured
        policy): ||y - y_exact|| / ||y_exact||."""
        c = self._calibrated()
        return None if c is None else c.get("error")

    def predicted_flop_ratio(self, r_c: float | None = None, reuse_rate: float | None = None) -> float | None:
        """Forward FLOPs relative to the exact layer: H/M + r_c + 1/L (Eq. 5), or with
        cluster reuse H/M + (1 - R) r_c + 1/L (Eq. 6)."""
        r = self.r_c if r_c is None else r_c
        if self.exact or self.L is None or r is None:
            return None
        R = (self.reuse_rate if reuse_rate is None else reuse_rate) if self.cluster_reuse else None
        return expected_cost(self.L, self.H, self.M, r * (1 - (R or 0.0)))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("kernel_size", "stride", "padding", "dilation", "L_range", "H_range"):
            if d[k] is not None:
                d[k] = list(d[k])
        d["candidates"] = [list(c) for c in self.candidates]
        d["time_ratio"] = self.time_ratio
        d["output_error"] = self.output_error
        return d


_COLUMNS = [
    ("layer", lambda r: r.name),
    ("in->out", lambda r: f"{r.in_channels}->{r.out_channels}" + (f" g{r.groups}" if r.groups > 1 else "")),
    ("k/s", lambda r: f"{r.kernel_size[0]}x{r.kernel_size[1]}/{r.stride[0]}"),
    ("K", lambda r: str(r.K)),
    ("N", lambda r: str(r.N)),
    ("L range", lambda r: "-" if r.L_range is None else f"[{r.L_range[0]},{r.L_range[1]}]"),
    ("H range", lambda r: "-" if r.H_range is None else f"[{r.H_range[0]},{r.H_range[1]}]"),
    ("cands", lambda r: str(len(r.candidates))),
    ("stage", lambda r: _stage(r)),
    ("r_c", lambda r: "-" if r.r_c is None or r.exact else f"{r.r_c:.4f}"),
    ("R", lambda r: "-" if r.reuse_rate is None or r.exact else f"{r.reuse_rate:.3f}"),
    ("FLOPs", lambda r: "-" if r.flop_ratio is None or r.exact else f"{r.flop_ratio:.3f}"),
    ("time", lambda r: "-" if r.time_ratio is None else f"{r.time_ratio:.2f}x"),
    ("err", lambda r: "-" if r.output_error is None else f"{r.output_error:.3f}"),
    ("note", lambda r: r.reason or ""),
]


def exact_stage(r: LayerPlan) -> str:
    """An exact row's stage: "exact", "exact, zero-skip" or "exact, fused with pool1" (the
    pool's node)."""
    if r.fused_block:
        return f"exact, fused with {r.calibration['conv_pool']['pool']['pool']}"
    return "exact, zero-skip" if r.zero_skipping else "exact"


def _stage(r: LayerPlan) -> str:
    if r.exact:
        return exact_stage(r)
    s = f"L={r.L} H={r.H}"
    if r.stage is not None:
        s += f" ({r.stage + 1}/{len(r.candidates)})"
    return s + (" CR" if r.cluster_reuse else "")


class ReusePlan:
    """Ordered per-layer rows; iterable, indexable by layer name, printable as a table."""

    def __init__(self, rows: list[LayerPlan], measure=None):
        self._rows = {r.name: r for r in rows}
        self._measure = measure  # fills the measured columns from the runtime state

    def _sync(self) -> None:
        if self._measure is not None:
            self._measure(self)

    def rows(self) -> list[LayerPlan]:
        """The rows as stored (measured columns as of the last sync)."""
        return list(self._rows.values())

    def __iter__(self):
        self._sync()
        return iter(self.rows())

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, name) -> bool:
        return name in self._rows

    def __getitem__(self, name: str) -> LayerPlan:
        self._sync()
        try:
            return self._rows[name]
        except KeyError:
            raise KeyError(f"no convolution named {name!r} in the plan; layers: {list(self._rows)}") from None

    def names(self) -> list[str]:
        return list(self._rows)

    def to_dict(self) -> dict:
        """JSON-serialisable: ``{"layers": [row dict, ...]}``."""
        return {"layers": [r.to_dict() for r in self]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        cells = [[h for h, _ in _COLUMNS]] + [[f(r) for _, f in _COLUMNS] for r in self]
        widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ReusePlan({len(self)} layers)\n{self}"
