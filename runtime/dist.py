"""``torch.distributed`` when a process group of more than one rank is up, else None: the
one test for "are there other ranks to agree with" (the controller's decisions, the fitted
hash planes)."""

from __future__ import annotations

import torch

__all__ = ["group", "collective_device"]


def group():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() and d.get_world_size() > 1 else None


def collective_device() -> torch.device:
    """Where a small tensor for a collective of the default group must live: the CPU when
    the group has a CPU backend (gloo, mpi, "cpu:gloo,cuda:nccl"), else (NCCL alone, the
    usual GPU setup) this rank's current GPU."""
    backend = str(torch.distributed.get_backend()).lower()
    if any(b in backend for b in ("gloo", "mpi", "cpu")) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
