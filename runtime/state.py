"""Per-layer runtime state of a rewritten convolution.

A compiled module holds one :class:`ReuseLayer` per plan row under ``gm.reuse_state``. It
owns the layer's hash planes (:class:`LayerHash`: one random family per layer and (L, H),
derived from the seed, so every rank and every restart draws the same planes; or, with
``hashing="pca"``, planes fitted to the layer's input, see :mod:`.planes`), records what the last forward
measured, for the plan's r_c and R columns, and holds the across-batch store
(:class:`ClusterReuse`, used when the layer's stage has cluster reuse on).
"""

from __future__ import annotations

import warnings
import zlib

import torch
from torch import nn

from .geometry import Geometry
from .kernels import slot_keys
from .planes import LayerHash
from .reference import lsh_planes
from .store import ClusterStore

__all__ = ["ReuseLayer", "ClusterReuse", "planes_seed"]


def planes_seed(seed: int, layer: str, L: int, H: int) -> int:
    """A stable (process- and platform-independent) seed for one layer's (L, H) family."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{layer}|{L}|{H}".encode())) % (2**63)


def layer_planes(seed: int, layer: str, L: int, H: int) -> torch.Tensor:
    """The (L, H) hash planes of ``layer`` under config seed ``seed``: the family the layer
    hashes with in training (and the measured policy calibrates with)."""
    return lsh_planes(L, H, planes_seed(seed, layer, L, H))


def warn_moved(compiled_on: str, runs_on: str) -> None:
    """A compiled module whose reused layers run on another device type than the one
    ``reuse_compile`` chose their stages on (``gm.cuda()`` after compiling on the CPU, or a
    pickled module loaded elsewhere): the stages are that device's choice. Each layer warns at
    its first such forward only (not again after a later move), all with the same text, so
    Python's default filter shows it once."""
    warnings.warn(
        f"reuse_compile chose this module's reuse stages on {compiled_on}, and its reused layers now run on "
        f"{runs_on}, where those stages were neither timed nor chosen (on one H200 GPU the reuse kernels measured "
        "6-113x slower than cuDNN per layer, docs/performance.md). Compile the model on the device it trains on: "
        "reuse_compile(model.to(device), example_batch.to(device), config=ReuseConfig(policy='measured')).",
        UserWarning,
        stacklevel=2,
    )


class ReuseLayer(nn.Module):
    """Hash planes and measurements of one rewritten convolution.

    Called from the graph with each group's ``counts`` (nb, Cmax); it only records them.
    """

    def __init__(
        self,
        name: str,
        seed: int,
        cache_size: int = 65536,
        refresh: int = 50,
        hashing: str = "random",
        hash_refresh: int = 20,
    ):
        super().__init__()
        self.layer_name = name
        self.seed = seed
        self.hasher = LayerHash(hashing, hash_refresh)
        self.last_counts: dict[int, torch.Tensor] = {}
        self.store = ClusterReuse(cache_size, refresh)
        self.hasher.on_fit.append(self.store.clear)  # new planes, new ids: stored outputs are stale
        # the device type the stages were chosen on (reuse_compile sets it); a first run on
        # another type warns once (warn_moved)
        self.compiled_on: str | None = None
        self._device_warned = False

    @property
    def planes(self) -> torch.Tensor:
        """The (L, H) planes the layer hashes with now."""
        return self.hasher.planes

    @property
    def LH(self) -> tuple[int, int] | None:
        return tuple(self.planes.shape) if self.planes.numel() else None

    def set_params(self, L: int, H: int) -> None:
        """Draw this layer's (L, H) hash family (no-op if it is the current one); with
        ``hashing="pca"`` it is a placeholder until the next forward fits the planes."""
        if self.LH == (L, H):
            return
        self.hasher.reset(layer_planes(self.seed, self.layer_name, L, H))
        self.last_counts = {}
        self.store.clear()

    def forward(self, counts: torch.Tensor, group: int = 0) -> None:
        self.last_counts[group] = counts.detach()
        compiled_on = getattr(self, "compiled_on", None)  # None: pickled before session 25
        if compiled_on is not None and counts.device.type != compiled_on and not self._device_warned:
            self._device_warned = True
            warn_moved(compiled_on, counts.device.type)

    def remaining_ratio(self) -> float | None:
        """r_c of the last forward: mean over sub-matrices (and groups) of |C_b| / N."""
        if not self.last_counts:
            return None
        ratios = []
        for counts in self.last_counts.values():
            n = counts.sum(1).clamp(min=1)
            ratios.append(((counts > 0).sum(1) / n).mean())
        return float(torch.stack(ratios).mean())

    def reuse_rate(self) -> float | None:
        """R of the last forward: the share of clusters found in the across-batch store."""
        return self.store.reuse_rate()

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}, LH={self.LH}"


class ClusterReuse(nn.Module):
    """Across-batch reuse (Algorithm 1) as a stage of the chain: the outputs of clusters
    whose id was seen before come from the store. One :class:`ClusterStore` per group.
    Its contents are part of ``state_dict`` (extra state), so a checkpoint resumes with
    the same store."""

    def __init__(self, capacity: int, refresh: int):
        super().__init__()
        self.capacity, self.refresh = capacity, refresh
        self.stores: dict[int, ClusterStore] = {}

    def clear(self) -> None:
        self.stores = {}

    def forward(self, yc, centroids, ids, inverse, counts, weight, group: int = 0):
        store = self.stores.setdefault(group, ClusterStore(self.capacity, self.refresh))
        wb = Geometry.of_weight(weight.shape, centroids.shape[-1]).weight_blocks(weight)
        with torch.autocast(yc.device.type, enabled=False):  # the stored outputs' refresh in float32
            return store.lookup(slot_keys(ids, inverse, counts), centroids, yc, wb, self.training)

    def reuse_rate(self) -> float | None:
        rates = [s.last_rate for s in self.stores.values() if s.last_rate is not None]
        return sum(rates) / len(rates) if rates else None

    def get_extra_state(self):
        return {g: s.state_dict() for g, s in self.stores.items()}

    def set_extra_state(self, state) -> None:
        self.stores = {}
        for g, st in state.items():
            self.stores[g] = ClusterStore(self.capacity, self.refresh)
            self.stores[g].load_state_dict(st)
