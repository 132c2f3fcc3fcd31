"""The across-batch cluster store (Algorithm 1, "cluster reuse").

Per sub-matrix b the store maps a hash id to the centroid and the centroid's output
``y_c = x_c . W_b`` of the batch that first produced it. When a later batch hashes a
sub-vector to a stored id, its cluster's output is the stored one (the centroid of the
stored cluster stands for the new members). The store is bounded per sub-matrix
(``capacity``, least recently used out first) and emptied when (L, H) changes.

Like BatchNorm's running statistics, the store learns only in train mode: eval-mode
forwards read it but insert nothing and do not advance its step count (so evaluation
passes during training leave it as it was). In training its outputs are recomputed from
the stored centroids for the current weights every ``refresh`` steps (default every step:
stale outputs plus a straight-through backward let the weights drift away from what the
forward shows, and the next refresh then jumps; see docs/strategies.md).

Gradients: the stored output is a value from the past; the backward treats it as the
current batch's centroid output (a straight-through estimator), so dW and the input
gradient are those of the batch-scope stage.
"""

from __future__ import annotations

import torch

from .kernels import compute_dtype

__all__ = ["ClusterStore"]


class ClusterStore:
    """Stored (id -> centroid, output) per sub-matrix of one layer."""

    def __init__(self, capacity: int, refresh: int):
        self.capacity = capacity
        self.refresh = refresh
        self.clear()

    def clear(self) -> None:
        self.keys: list[torch.Tensor] = []  # per block: sorted int64 ids
        self.cents: list[torch.Tensor] = []  # per block: (S_b, L)
        self.outs: list[torch.Tensor] = []  # per block: (S_b, M)
        self.used: list[torch.Tensor] = []  # per block: step of last use
        self.step = 0
        self.last_refresh = 0
        self.last_rate: float | None = None  # R of the last lookup

    def __len__(self) -> int:
        return sum(len(k) for k in self.keys)

    def lookup(self, keys: torch.Tensor, centroids: torch.Tensor, yc: torch.Tensor, wb: torch.Tensor, training: bool):
        """Replace the outputs of stored ids, insert the new ones; return the outputs.

        ``keys`` (nb, Cmax) slot ids (-1 empty), ``centroids`` (nb, Cmax, L) and ``yc``
        (nb, Cmax, M) of this batch, ``wb`` (nb, L, M) the current weight blocks.
        """
        nb = keys.shape[0]
        if len(self.keys) != nb:
            self.clear()
            self.keys = [keys.new_empty(0) for _ in range(nb)]
            self.cents = [centroids.new_empty(0, centroids.shape[-1]) for _ in range(nb)]
            self.outs = [yc.new_empty(0, yc.shape[-1]) for _ in range(nb)]
            self.used = [keys.new_empty(0) for _ in range(nb)]
        if self.keys[0].device != keys.device or (self.cents[0].dtype, self.outs[0].dtype) != (
            centroids.dtype,
            yc.dtype,
        ):  # the model moved (gm.cuda(), gm.double(), a checkpoint from another device)
            self.keys = [k.to(keys.device) for k in self.keys]
            self.used = [u.to(keys.device) for u in self.used]
            self.cents = [c.to(device=centroids.device, dtype=centroids.dtype) for c in self.cents]
            self.outs = [o.to(device=yc.device, dtype=yc.dtype) for o in self.outs]
        if training:
            self.step += 1
            if self.step - self.last_refresh >= self.refresh:
                self._refresh(wb)
        out = yc.detach().clone()
        hits = total = 0
        with torch.no_grad():
            # slots with a non-finite centroid or output (NaN/Inf inputs, see reuse.cluster)
            # neither read nor enter the store: their ids are not those of their members'
            # directions, and a stored NaN would reach every later batch
            ct = compute_dtype(yc.dtype)  # summed in float32 for half types: no float16 overflow
            finite = torch.isfinite(centroids.sum(-1, dtype=ct)) & torch.isfinite(yc.sum(-1, dtype=ct))
            for b in range(nb):
                valid = (keys[b] >= 0) & finite[b]
                k = keys[b][valid]
                total += len(k)
                stored = self.keys[b]
                pos = torch.searchsorted(stored, k).clamp(max=max(len(stored) - 1, 0))
                hit = stored[pos] == k if len(stored) else torch.zeros_like(k, dtype=torch.bool)
                hits += int(hit.sum())
                slots = valid.nonzero().squeeze(1)
                out[b, slots[hit]] = self.outs[b][pos[hit]].to(out.dtype)
                if training:  # the store learns in train mode only
                    self.used[b][pos[hit]] = self.step
                    new = ~hit
                    self._insert(b, k[new], centroids[b, slots[new]].detach(), yc[b, slots[new]].detach())
        self.last_rate = hits / max(total, 1)
        # value from the store, gradient as for this batch's own centroid outputs
        return yc + (out - yc).detach()

    def _insert(self, b: int, k, cents, outs) -> None:
        if len(k) == 0:
            return
        keys = torch.cat([self.keys[b], k])
        cents = torch.cat([self.cents[b], cents])
        outs = torch.cat([self.outs[b], outs])
        used = torch.cat([self.used[b], torch.full_like(k, self.step)])
        if len(keys) > self.capacity:  # least recently used out first
            keep = torch.argsort(used, descending=True, stable=True)[: self.capacity]
            keys, cents, outs, used = keys[keep], cents[keep], outs[keep], used[keep]
        order = torch.argsort(keys)
        self.keys[b], self.cents[b], self.outs[b], self.used[b] = keys[order], cents[order], outs[order], used[order]

    def _refresh(self, wb: torch.Tensor) -> None:
        """Recompute every stored output for the current weights."""
        with torch.no_grad():
            for b in range(len(self.keys)):
                if len(self.keys[b]):
                    self.outs[b] = (self.cents[b].to(wb.dtype) @ wb[b]).to(self.outs[b].dtype)
        self.last_refresh = self.step

    def state_dict(self) -> dict:
        return {
            "keys": self.keys,
            "cents": self.cents,
            "outs": self.outs,
            "used": self.used,
            "step": self.step,
            "last_refresh": self.last_refresh,
        }

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.cents, self.outs, self.used = state["keys"], state["cents"], state["outs"], state["used"]
        self.step, self.last_refresh = state["step"], state["last_refresh"]
