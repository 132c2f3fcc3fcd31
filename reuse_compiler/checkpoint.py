"""Save and resume a compiled module, its controller and its optimizer.

The convention is NNCF's / Neural Compressor's: a checkpoint holds state, not code. To
resume, re-apply the transform to a fresh model with the saved config, then load::

    save_checkpoint("ckpt.pt", gm, controller=ctl, optimizer=opt, epoch=3)
    ...
    ckpt = torch.load("ckpt.pt")
    gm = reuse_compile(model_factory(), x, config=ReuseConfig(**ckpt["reuse"]["config"]))
    ctl = AdaptiveReuse(gm, "lh", probe=probe)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    extra = load_checkpoint(ckpt, gm, controller=ctl, optimizer=opt)   # {"epoch": 3}

The checkpoint holds the parameters and buffers (``gm.state_dict()``, which includes the
across-batch stores), each layer's stage, the config, the controller's plateau state and
history, and the optimizer state. Random hash planes are not stored: they are a function
of the seed, the layer name and (L, H). Fitted planes (``hashing="pca"``) are data, so they
are stored (the hasher's extra state), with their age.
"""

from __future__ import annotations

import os

import torch

from .api import _compiled, set_stage
from .config import ReuseConfig

__all__ = ["save_checkpoint", "load_checkpoint", "stage_dict", "load_stage_dict"]


def stage_dict(gm) -> dict:
    """Each layer's current stage: ``{name: {"L", "H", "exact", "cluster_reuse"}}``."""
    return {
        r.name: {"L": r.L, "H": r.H, "exact": r.exact, "cluster_reuse": r.cluster_reuse}
        for r in _compiled(gm).rows()
        if r.rewritable
    }


def load_stage_dict(gm, stages: dict) -> None:
    """Apply :func:`stage_dict`'s output to a module compiled from the same model."""
    plan = _compiled(gm)
    missing = sorted(set(stages) - set(plan.names()))
    if missing:
        raise ValueError(f"load_stage_dict: layers {missing} are not in this module's plan ({plan.names()})")
    for name, stage in stages.items():
        set_stage(gm, name, **stage)


def save_checkpoint(path, gm, *, controller=None, optimizer=None, **extra) -> dict:
    """Write a checkpoint (see the module docstring) to ``path``; returns it."""
    _compiled(gm)
    ckpt = {
        "model": gm.state_dict(),
        "reuse": {"config": gm.reuse_config.to_dict(), "stages": stage_dict(gm)},
        "controller": None if controller is None else controller.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": extra,
    }
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return ckpt


def load_checkpoint(path_or_ckpt, gm, *, controller=None, optimizer=None) -> dict:
    """Restore a checkpoint into a module compiled with the same config; returns the
    ``extra`` values given to :func:`save_checkpoint`."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else torch.load(path_or_ckpt, weights_only=True)
    _compiled(gm)
    saved = ReuseConfig(**ckpt["reuse"]["config"])
    if saved != gm.reuse_config:
        raise ValueError(
            f"load_checkpoint: the checkpoint was made with {saved}, this module with {gm.reuse_config}; "
            f"compile the fresh model with reuse_compile(model, x, config=ReuseConfig(**ckpt['reuse']['config']))"
        )
    load_stage_dict(gm, ckpt["reuse"]["stages"])  # stages first: a new (L, H) empties the stores
    gm.load_state_dict(ckpt["model"])
    if controller is not None:
        if ckpt["controller"] is None:
            raise ValueError("load_checkpoint: the checkpoint holds no controller state")
        controller.load_state_dict(ckpt["controller"])
    if optimizer is not None:
        if ckpt["optimizer"] is None:
            raise ValueError("load_checkpoint: the checkpoint holds no optimizer state")
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["extra"]
