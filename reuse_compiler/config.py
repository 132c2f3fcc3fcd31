"""``ReuseConfig``: every knob of ``reuse_compile`` in one validated dataclass.

>>> ReuseConfig(L=16, H={"conv2": 10}, scope="input").scope
'input'
>>> ReuseConfig(scope="global")
Traceback (most recent call last):
...
ValueError: ReuseConfig.scope must be one of 'input', 'batch', 'across-batch'; got 'global'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from reuse_compiler.runtime.planes import HASHINGS

__all__ = ["ReuseConfig", "SCOPES", "L_CHOICES"]

SCOPES = ("input", "batch", "across-batch")
L_CHOICES = ("fast", "all", "extended")
POLICIES = ("paper", "measured")
CENTROIDS = ("mean", "norm")
MAX_H = 62


def _check_int_or_map(name: str, value, lo: int, hi: int | None) -> None:
    if value is None:
        return
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for layer, v in items:
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"ReuseConfig.{name}: keys must be layer names (str), got {layer!r}")
        where = f"[{layer!r}]" if layer is not None else ""
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            allowed = f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
            raise ValueError(
                f"ReuseConfig.{name}{where} must be None (from the plan), {allowed}, or a dict "
                f"from layer name to such an int; got {v!r}"
            )


def _names(name: str, value) -> list[str]:
    """A list-of-names field: None is the empty list (the default); any other iterable of str
    (list, tuple, set, generator) becomes a list; anything else is a ValueError naming the field."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        example = [value] if isinstance(value, str) else ["conv1"]
        raise ValueError(
            f"ReuseConfig.{name} must be a list of layer or module names (str), e.g. {example!r}; "
            f"got {type(value).__name__} {value!r}"
        )
    items = list(value)
    bad = [e for e in items if not isinstance(e, str)]
    if bad:
        raise ValueError(
            f"ReuseConfig.{name} must be a list of layer or module names (str); got {value!r} (not names: {bad!r})"
        )
    return items


@dataclass
class ReuseConfig:
    """Configuration of :func:`reuse_compiler.reuse_compile`.

    Attributes:
        L: sub-vector length. None: each layer starts at its plan's first candidate; an int:
            every layer; a dict: per layer name (others from the plan).
        H: number of hash functions (1..62), same forms as ``L``.
        scope: clustering scope, "input" (never mix images), "batch" (default) or
            "across-batch" (Algorithm 1: reuse stored centroid outputs across batches).
        seed: seed of the hash planes (one family per layer and (L, H)).
        exclude: layer names (convolutions, or any submodule: it is then not traced and
            its convolutions stay exact) kept exact; any iterable of names, None for none.
        cache_size: across-batch store capacity per layer and sub-matrix, in clusters.
        refresh: across-batch: stored outputs are recomputed for the current weights at
            least every ``refresh`` training steps (default 1: every step; larger values let
            training diverge, see docs/strategies.md).
        l_values: which L values the candidate list holds: "fast" (those of Policy 1's
            range with a fast path; the range's ends if none has), "all" (every value of the
            range) or "extended" (the fast-path values from L_min up to K).
        policy: "paper" orders candidates by the FLOP model (Policy 3); "measured" times
            exact and every candidate on this device at compile time (cached on disk), keeps
            the candidates faster than exact and orders them by time (docs/performance.md).
        calibration_repeats: timed runs per stage for the measured policy (median).
        max_time_ratio: measured policy: a candidate is kept if its measured time is at most
            this fraction of the exact convolution's (default 0.95: a margin, so that a stage
            within timing noise of exact, kept or dropped by chance, is dropped).
        max_error: measured policy only: also drop the candidates whose relative output error
            ||y - y_exact|| / ||y_exact|| on the layer's input from the example batch exceeds
            this (None: no error filter). Trades speed for accuracy per step.
        centroid: "norm" (default: keeps each member's length, ||x|| times the output of the
            unit vector along the cluster mean; exact for collinear members) or "mean" (the
            paper: a member's output is its cluster mean's output). docs/results.md has the
            evidence for the default.
        hashing: "random" (default: the paper's random hyperplanes, Eq. 4) or "pca" (planes
            along the principal directions of each layer's own sub-vectors, refitted during
            training; lower output error at the same number of clusters, see
            docs/policies.md). Only the planes' values differ; every op is the same.
        hash_refresh: with hashing="pca", training forwards between refits of a layer's
            planes (default 20); eval forwards never refit.
        norm_grad: with centroid="norm", whether the member norms pass a gradient to the
            layer's input (True, default: the exact gradient of the approximate forward).
            False treats them as constants of the backward: the input gradient flows
            through the centroids only, the weight gradient is unchanged, and the backward
            is cheaper and keeps less (docs/policies.md). False gives every member of a
            cluster the same input gradient. It trained CifarNet like True did, but AlexNet
            stalled at chance with it (docs/performance.md, session 14): use it only where
            it was measured to train.
        zero_skip: measured policy only: an exact layer (groups 1, symmetric padding) whose
            input on the example batch is at least half its channels' most common values (zero
            after a ReLU; a normalised digit's blank pixel) is also timed with a weight gradient
            that skips the products of those values (the same forward, bit for bit; the same
            gradients up to float rounding), and runs so where that is faster than stock's
            (default True; docs/policies.md, "Zero-skipping exact layers"). False: exact layers
            are always stock's.
        fuse_pool: measured policy only: an exact layer whose input needs no gradient (a
            model's first layer; groups 1, stride 1, dilation 1, symmetric padding) and whose
            output goes only to a max-pool (and that pool's only to a ReLU) is also timed as one
            op with them (``reuse.conv_pool``: the convolution's output never in memory as a
            whole, the pool's gradient routed inside the weight gradient, the input's common
            values skipped as ``zero_skip`` does), and runs so where that is faster than the
            layers it replaces (default True; docs/policies.md, "The first block in one pass").
            The same values as stock's up to float rounding. False: never fused.
    """

    L: int | dict[str, int] | None = None
    H: int | dict[str, int] | None = None
    scope: str = "batch"
    seed: int = 0
    exclude: list[str] | tuple[str, ...] | None = field(default_factory=list)
    cache_size: int = 65536
    refresh: int = 1
    l_values: str = "fast"
    policy: str = "paper"
    calibration_repeats: int = 3
    max_time_ratio: float = 0.95
    max_error: float | None = None
    centroid: str = "norm"
    hashing: str = "random"
    hash_refresh: int = 20
    norm_grad: bool = True
    zero_skip: bool = True
    fuse_pool: bool = True

    def __post_init__(self):
        _check_int_or_map("L", self.L, 1, None)
        _check_int_or_map("H", self.H, 1, MAX_H)
        if self.scope not in SCOPES:
            raise ValueError(f"ReuseConfig.scope must be one of {', '.join(map(repr, SCOPES))}; got {self.scope!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"ReuseConfig.seed must be an int; got {self.seed!r}")
        self.exclude = _names("exclude", self.exclude)
        if self.policy not in POLICIES:
            raise ValueError(f"ReuseConfig.policy must be one of {', '.join(map(repr, POLICIES))}; got {self.policy!r}")
        if self.centroid not in CENTROIDS:
            raise ValueError(
                f"ReuseConfig.centroid must be one of {', '.join(map(repr, CENTROIDS))}; got {self.centroid!r}"
            )
        if self.hashing not in HASHINGS:
            raise ValueError(
                f"ReuseConfig.hashing must be one of {', '.join(map(repr, HASHINGS))}; got {self.hashing!r}"
            )
        if not isinstance(self.norm_grad, bool):
            raise ValueError(f"ReuseConfig.norm_grad must be True or False; got {self.norm_grad!r}")
        if not isinstance(self.zero_skip, bool):
            raise ValueError(f"ReuseConfig.zero_skip must be True or False; got {self.zero_skip!r}")
        if not isinstance(self.fuse_pool, bool):
            raise ValueError(f"ReuseConfig.fuse_pool must be True or False; got {self.fuse_pool!r}")
        if not self.norm_grad and self.centroid != "norm":
            raise ValueError(
                "ReuseConfig.norm_grad=False applies to the norm centroid's member norms; "
                f"with centroid={self.centroid!r} there are none (use centroid='norm' or leave norm_grad=True)"
            )
        for name in ("cache_size", "refresh", "calibration_repeats", "hash_refresh"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ReuseConfig.{name} must be an int >= 1; got {v!r}")
        if (
            isinstance(self.max_time_ratio, bool)
            or not isinstance(self.max_time_ratio, (int, float))
            or not 0 < self.max_time_ratio <= 1
        ):
            raise ValueError(f"ReuseConfig.max_time_ratio must be a number in (0, 1]; got {self.max_time_ratio!r}")
        self.max_time_ratio = float(self.max_time_ratio)
        if self.max_error is not None:
            if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) or self.max_error <= 0:
                raise ValueError(f"ReuseConfig.max_error must be None or a number > 0; got {self.max_error!r}")
            if self.policy != "measured":
                raise ValueError(
                    "ReuseConfig.max_error filters by the errors the measured policy measures; "
                    f"use policy='measured' with it (got policy={self.policy!r})"
                )
            self.max_error = float(self.max_error)
        if self.l_values not in L_CHOICES:
            raise ValueError(
                f"ReuseConfig.l_values must be one of {', '.join(map(repr, L_CHOICES))}; got {self.l_values!r}"
            )

    def for_layer(self, field_name: str, layer: str):
        """This config's fixed value of ``L`` or ``H`` for ``layer``, or None."""
        v = getattr(self, field_name)
        return v.get(layer) if isinstance(v, dict) else v

    def to_dict(self) -> dict:
        return asdict(self)
