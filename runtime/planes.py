"""Hash planes fitted to the data (``ReuseConfig(hashing="pca")``).

The paper hashes with random hyperplanes (Eq. 4). Sign bits of random projections split
the sub-vectors of a ReLU network's layer badly: the inputs are non-negative, so many
planes cut few of them, and clusters of a given count are coarse (CifarNet conv2 on the
digits, L = 64, H = 8: relative output error 0.54 at r_c 0.0005). Planes along the
principal directions of the layer's own sub-vectors cut them where they spread (same
layer and H: error 0.29 at r_c 0.010; docs/policies.md). This is PCA hashing, a known
data-dependent variant of sign-random-projection LSH; the rest of the chain (ids,
clusters, centroids, backward) is unchanged: only the planes' values differ.

How the planes are fitted (our decisions, docs/policies.md):

- The sample: the sub-vectors of up to ``MAX_IMAGES`` images of the batch (every block,
  the same (kh, kw, c) order the hash sees; fewer images, or a band of one image's rows,
  when that would gather more than ``GATHER_BUDGET`` elements), evenly thinned to at most
  ``MAX_ROWS`` rows (fewer for long sub-vectors: ``MAX_SAMPLE`` elements).
- The directions: the leading eigenvectors of the sample's uncentred second moment
  (exactly, by ``eigh``, for L <= ``EXACT_MAX_L``; beyond, by a seeded randomized subspace
  iteration). The hash has no offset (zero padding must keep id 0), so a direction whose
  sign is the same on (almost) every non-zero sub-vector carries no information: the
  leading one of non-negative data is such a direction (about the mean). Directions whose
  bit is constant on more than 99% of the non-zero sample are skipped.
- If fewer than H directions remain (H > L, or data of low rank), the skipped ones follow,
  then random planes: the layer always hashes with H planes.
- Each column is unit length with its largest entry positive (a fixed sign per direction).
"""

from __future__ import annotations

import torch
from torch import nn

from .dist import group as distributed_group
from .geometry import Geometry

__all__ = [
    "HASHINGS",
    "LayerHash",
    "all_finite",
    "fit_planes",
    "fit_to_input",
    "largest_entry_positive",
    "sample_subvectors",
]

HASHINGS = ("random", "pca")
MAX_IMAGES = 16
MAX_ROWS = 32768
MAX_SAMPLE = 1 << 21  # elements of the thinned sample (8 MB in fp32)
GATHER_BUDGET = 1 << 23  # elements gathered before thinning (32 MB in fp32)
EXACT_MAX_L = 256
CONSTANT_BIT = 0.99


def sample_subvectors(xp: torch.Tensor, kernel_size, stride, dilation, L: int) -> torch.Tensor:
    """The sub-vectors (S, L) of up to MAX_IMAGES images of the padded channels-last input
    ``xp`` (Nb, Hp, Wp, C), every block, in the hash's (kh, kw, c) order. At most
    GATHER_BUDGET elements are gathered (fewer images; for one large image, a band of output
    rows in its middle), then the rows are thinned evenly to at most max_rows(L)."""
    g = Geometry.of(xp.shape, kernel_size, stride, dilation, L)
    oh, ow = g.out_hw
    per_row = max(1, ow * g.nb * L)  # elements gathered per output row of one image
    m = max(1, min(MAX_IMAGES, g.Nb, GATHER_BUDGET // max(1, oh * per_row)))
    xs = xp[:m]
    if m * oh * per_row > GATHER_BUDGET:  # one image is already too large: a band of rows
        rows_out = max(1, GATHER_BUDGET // per_row)
        r0 = (oh - rows_out) // 2 * g.sh
        xs = xs[:, r0 : r0 + (rows_out - 1) * g.sh + (g.kh - 1) * g.dh + 1]
    gs = Geometry.of(xs.shape, kernel_size, stride, dilation, L)
    rows = torch.cat([gs.gather_block(xs, b) for b in range(gs.nb)]) if gs.N else xs.new_zeros(0, L)
    cap = max_rows(L)
    if rows.shape[0] > cap:
        rows = rows[:: -(-rows.shape[0] // cap)]
    return rows.float()


def max_rows(L: int) -> int:
    """Rows kept in a fit's sample: MAX_ROWS, fewer for long sub-vectors (MAX_SAMPLE elements)."""
    return max(1024, min(MAX_ROWS, MAX_SAMPLE // max(1, L)))


def _directions(rows: torch.Tensor, q: int, seed: int) -> torch.Tensor:
    """The q leading right singular vectors of ``rows`` (L, q), in descending order."""
    L = rows.shape[1]
    if L <= EXACT_MAX_L or q >= L:
        gram = (rows.T @ rows).double()
        return torch.linalg.eigh(gram)[1].flip(1)[:, :q].to(rows.dtype)
    # randomized subspace iteration (Halko et al.), seeded: the global RNG is not touched
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(L, q + 8, generator=gen).to(rows.device, rows.dtype)
    y = torch.linalg.qr(rows @ omega)[0]
    for _ in range(3):
        y = torch.linalg.qr(rows @ torch.linalg.qr(rows.T @ y)[0])[0]
    _, _, vh = torch.linalg.svd(y.T @ rows, full_matrices=False)
    return vh[:q].T


def fit_planes(rows: torch.Tensor, H: int, fallback: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(L, H) planes along the principal directions of ``rows`` (S, L) whose sign bit is not
    constant on the sample (module docstring); ``fallback`` (L, H) random planes fill up
    when fewer than H directions exist. Deterministic for given rows."""
    L = rows.shape[1]
    q = min(L, H + 8)
    lo, hi = _extremes(rows)
    if not _finite(lo, hi):  # a NaN/Inf input at a refit would give NaN planes: every id 0
        rows = rows[torch.isfinite(rows).all(1)]
        lo, hi = _extremes(rows)
    big = max(-lo, hi)  # rows.abs().amax(), from the same pass
    if big > torch.finfo(rows.dtype).max ** 0.5 / 1e4:  # products would overflow; the
        rows = rows / big  # directions and signs do not depend on the scale
    dirs = _directions(rows, q, seed) if rows.shape[0] else rows.new_zeros(L, 0)
    nonzero = rows[rows.abs().amax(1) > 0]
    if nonzero.shape[0] and dirs.shape[1]:
        pos = ((nonzero @ dirs) > 0).float().mean(0)
        informative = (pos > 1 - CONSTANT_BIT) & (pos < CONSTANT_BIT)
    else:
        informative = torch.zeros(dirs.shape[1], dtype=torch.bool, device=rows.device)
    order = torch.cat([dirs[:, informative], dirs[:, ~informative]], 1)[:, :H]
    if order.shape[1] < H:
        order = torch.cat([order, fallback.to(order)[:, order.shape[1] : H]], 1)
    return largest_entry_positive(order / order.norm(dim=0, keepdim=True).clamp_min(1e-12)).contiguous()


def _extremes(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``t`` in one pass, (0, 0) if empty; NaN if ``t`` holds one. A finiteness
    test as ``isfinite(t).all()`` gives, 25x faster on conv2's input (0.18 against 4.6 ms),
    which a refit (every ``hash_refresh`` steps) made twice."""
    if not t.numel():
        return 0.0, 0.0
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def _finite(lo: float, hi: float) -> bool:
    return abs(lo) < float("inf") and abs(hi) < float("inf")  # False for NaN too


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (:func:`_extremes`: NaN and +-Inf show in the
    extremes)."""
    return _finite(*_extremes(t))


def largest_entry_positive(d: torch.Tensor) -> torch.Tensor:
    """The columns of ``d`` with their signs fixed: each column's largest entry positive."""
    return d * torch.where(d.gather(0, d.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0).to(d)


@torch.no_grad()
def fit_to_input(
    xp: torch.Tensor, kernel_size, stride, dilation, fallback: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """Planes of ``fallback``'s shape (L, H) fitted to the padded channels-last input ``xp``
    of a chain (what ``reuse.im2col`` returns), in ``fallback``'s dtype and device."""
    L, H = fallback.shape
    rows = sample_subvectors(xp.detach(), kernel_size, stride, dilation, L)
    return fit_planes(rows, H, fallback, seed=seed).to(fallback.dtype)


class LayerHash(nn.Module):
    """A layer's hash planes, as the rewritten graph asks for them (called with the chain's
    padded input; returns the (L, H) planes).

    ``hashing="random"``: the seeded random family, fixed. ``hashing="pca"``: planes fitted
    to the layer's input (module docstring):

    - in training, on the first training forward at an (L, H) and again every ``refresh``
      training forwards. Whether a forward fits depends only on the (L, H) and the count of
      training forwards, which are the same on every rank, so under ``torch.distributed``
      the fits happen at the same steps everywhere and rank 0's planes are broadcast: every
      rank hashes alike;
    - an eval forward uses the training planes of the current (L, H). If there are none
      (compiled and evaluated first; or a candidate the controller probes, which only rank 0
      does) it fits to its own input, locally, and these planes serve eval forwards only:
      the next training forward restores the training planes or fits anew.

    The planes, the training planes and the counters are extra state, saved in
    ``state_dict``, so a checkpoint resumes with the same hash.
    """

    def __init__(self, hashing: str = "random", refresh: int = 20):
        super().__init__()
        if hashing not in HASHINGS:
            raise ValueError(f"hashing must be one of {HASHINGS}; got {hashing!r}")
        self.hashing, self.refresh = hashing, refresh
        self.register_buffer("planes", torch.empty(0, 0), persistent=False)
        self.source: str | None = None  # pca: what `planes` holds: None (placeholder), "train", "eval"
        self.train_planes: torch.Tensor | None = None  # pca: the last training fit
        self.since = 0  # pca: training forwards since the last training fit
        self.fits = 0  # pca: training fits so far
        self.on_fit: list = []  # called whenever the planes change (the layer empties its store)

    @property
    def LH(self) -> tuple[int, int]:
        return tuple(self.planes.shape)

    @property
    def train_LH(self) -> tuple[int, int] | None:
        """The (L, H) of the last training fit (None before the first)."""
        return None if self.train_planes is None else tuple(self.train_planes.shape)

    def reset(self, planes: torch.Tensor) -> None:
        """New (L, H): the random family ``planes``. With pca this is a placeholder, unless
        the training planes are of this (L, H) (a stage set back after a probe): those."""
        # in the buffer's dtype: after gm.bfloat16() every family is rounded alike, whether
        # it was drawn before the cast or after a set_stage (a resume does not redraw)
        self.planes = planes.to(device=self.planes.device, dtype=self.planes.dtype)
        self.source = None
        if self.hashing == "pca" and self.train_LH == self.LH:
            self.planes.copy_(self.train_planes)
            self.source = "train"

    def forward(self, xp, kernel_size, stride, dilation, group: int = 0) -> torch.Tensor:
        """The planes for a chain with padded input ``xp``, fitted to it when due; a list of
        tensors: a layer's channel slices' padded inputs (``kernels.split_channels``), fitted
        to together."""
        if self.hashing != "pca" or group != 0:  # groups share the planes of group 0's fit
            return self.planes
        if self.training:
            if self.train_LH != self.LH or self.since >= self.refresh:
                self.planes.copy_(self._fit(xp, kernel_size, stride, dilation, collective=True))
                self.train_planes, self.since = self.planes.clone(), 0
                self.fits += 1
                self._fitted()
            elif self.source != "train":
                self.planes.copy_(self.train_planes)
                self._fitted()
            self.source = "train"
            self.since += 1
        elif self.source is None:
            self.planes.copy_(self._fit(xp, kernel_size, stride, dilation, collective=False))
            self.source = "eval"
            self._fitted()
        return self.planes  # updated in place: modules sharing the buffer (export) see the fit

    def _fitted(self) -> None:
        for f in self.on_fit:
            f()

    @torch.no_grad()
    def _fit(self, xp, kernel_size, stride, dilation, collective: bool) -> torch.Tensor:
        if isinstance(xp, (list, tuple)):  # the channel slices' padded inputs (per-pixel chains)
            xp = torch.cat(xp, -1)  # the layer's padded input, as the generic chain has it
        if all_finite(xp):
            with torch.autocast(xp.device.type, enabled=False):  # the fit in float32 under autocast too
                planes = fit_to_input(xp, kernel_size, stride, dilation, self.planes, seed=self.fits)
        else:  # a diverged input: keep the planes (a stock convolution would not stop either)
            planes = self.planes.clone()
        d = distributed_group() if collective else None
        if d is not None:
            planes = planes.contiguous()
            d.broadcast(planes, src=0)
        return planes

    def get_extra_state(self):
        if self.hashing != "pca":
            return {}
        return {
            "planes": self.planes.clone(),
            "source": self.source,
            "train_planes": self.train_planes,
            "since": self.since,
            "fits": self.fits,
        }

    def set_extra_state(self, state) -> None:
        if self.hashing != "pca" or not state:
            return
        if tuple(state["planes"].shape) != self.LH:
            raise ValueError(
                f"hash planes of shape {tuple(state['planes'].shape)} in the checkpoint, {self.LH} in the "
                "module: set the layer's stage first (load_checkpoint does)"
            )
        self.planes.copy_(state["planes"])
        self.source = state["source"]
        tp = state["train_planes"]
        self.train_planes = None if tp is None else tp.to(self.planes.device)
        self.since, self.fits = int(state["since"]), int(state["fits"])

    def extra_repr(self) -> str:
        if self.hashing != "pca":
            return "hashing='random'"
        return f"hashing='pca', refresh={self.refresh}, fits={self.fits}"
