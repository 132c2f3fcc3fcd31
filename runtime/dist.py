"""``torch.distributed`` when a process group of more than one rank is up, else None: the
one test for "are there other ranks to agree with" (the controller's decisions, the fitted
hash planes)."""

from __future__ import annotations

import torch

__all__ = ["group"]


def group():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() and d.get_world_size() > 1 else None
