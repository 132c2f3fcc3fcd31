"""Per-layer runtime state of a rewritten convolution.

A compiled module holds one :class:`ReuseLayer` per plan row under ``gm.reuse_state``. It
owns the layer's hash planes (one family per layer and (L, H), derived from the seed, so
every rank and every restart draws the same planes) and records what the last forward
measured, for the plan's r_c column.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .reference import lsh_planes

__all__ = ["ReuseLayer", "planes_seed"]


def planes_seed(seed: int, layer: str, L: int, H: int) -> int:
    """A stable (process- and platform-independent) seed for one layer's (L, H) family."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{layer}|{L}|{H}".encode())) % (2**63)


class ReuseLayer(nn.Module):
    """Hash planes and measurements of one rewritten convolution.

    Called from the graph with each group's ``counts`` (nb, Cmax); it only records them.
    """

    def __init__(self, name: str, seed: int):
        super().__init__()
        self.layer_name = name
        self.seed = seed
        self.register_buffer("planes", torch.empty(0, 0), persistent=False)
        self.last_counts: dict[int, torch.Tensor] = {}

    @property
    def LH(self) -> tuple[int, int] | None:
        return tuple(self.planes.shape) if self.planes.numel() else None

    def set_params(self, L: int, H: int) -> None:
        """Draw this layer's (L, H) hash family (no-op if it is the current one)."""
        if self.LH == (L, H):
            return
        planes = lsh_planes(L, H, planes_seed(self.seed, self.layer_name, L, H))
        self.planes = planes.to(self.planes.device)
        self.last_counts = {}

    def forward(self, counts: torch.Tensor, group: int = 0) -> None:
        self.last_counts[group] = counts.detach()

    def remaining_ratio(self) -> float | None:
        """r_c of the last forward: mean over sub-matrices (and groups) of |C_b| / N."""
        if not self.last_counts:
            return None
        ratios = []
        for counts in self.last_counts.values():
            n = counts.sum(1).clamp(min=1)
            ratios.append(((counts > 0).sum(1) / n).mean())
        return float(torch.stack(ratios).mean())

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}, LH={self.LH}"
