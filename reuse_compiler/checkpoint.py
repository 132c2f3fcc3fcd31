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
across-batch stores), each layer's stage, each layer's candidate list (and whether it could
run with reuse), the config, the controller's plateau state and history, and the optimizer
state. Random hash planes are not stored: they are a function of the seed, the layer name
and (L, H). Fitted planes (``hashing="pca"``) are data, so they are stored (the hasher's
extra state), with their age. ``path`` may be a file name or a binary file object (as
``torch.save`` / ``torch.load`` take).

With ``policy="measured"`` the candidate lists come from timings on the machine that
compiled the module. Loading on a machine whose calibration differs (another device, a
wiped cache) keeps the checkpoint's lists, with a warning on the "reuse_compiler" logger:
the run continues as it was, with the same stages and the same later controller decisions.
"""

from __future__ import annotations

import logging
import os

import torch

from reuse_compiler.passes.conv_rewrite import rebuild, state_path

from .api import _compiled, _layer_state, _register, set_stage
from .config import ReuseConfig

__all__ = ["save_checkpoint", "load_checkpoint", "stage_dict", "load_stage_dict"]

log = logging.getLogger("reuse_compiler")


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


def row_dict(gm) -> dict:
    """Each layer's candidate list and why it cannot run with reuse (None if it can), with
    its (L, H): ``{name: {"candidates": [[L, H], ...], "reason", "L", "H"}}``. The walk of
    :class:`AdaptiveReuse` is a position in the list (``LayerPlan.stage``)."""
    return {r.name: _row_entry(r, r.reason) for r in _compiled(gm).rows()}


def _row_entry(r, reason) -> dict:
    """One row of :func:`row_dict`."""
    return {"candidates": [list(c) for c in r.candidates], "reason": reason, "L": r.L, "H": r.H}


def _is_path(path) -> bool:
    return isinstance(path, (str, bytes, os.PathLike))


def save_checkpoint(path, gm, *, controller=None, optimizer=None, **extra) -> dict:
    """Write a checkpoint (see the module docstring) to ``path`` (a file name: written to
    ``path.tmp``, then renamed, so no half-written checkpoint is ever left; or a writable
    binary file object, written directly); returns it."""
    _compiled(gm)
    ckpt = {
        "model": gm.state_dict(),
        "reuse": {"config": gm.reuse_config.to_dict(), "stages": stage_dict(gm), "rows": row_dict(gm)},
        "controller": None if controller is None else controller.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "extra": extra,
    }
    if not _is_path(path):
        if not hasattr(path, "write"):
            raise TypeError(
                f"save_checkpoint: path must be a file name (str or os.PathLike) or a binary file object "
                f"with write(), got {type(path).__name__}"
            )
        torch.save(ckpt, path)
        return ckpt
    path = os.fspath(path)
    tmp = path + (b".tmp" if isinstance(path, bytes) else ".tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return ckpt


def _load(source, map_location=None) -> dict:
    if _is_path(source):
        return torch.load(source, weights_only=True, map_location=map_location)
    if not hasattr(source, "read"):
        raise TypeError(
            f"load_checkpoint: expected a file name, a binary file object or the checkpoint dict, "
            f"got {type(source).__name__}"
        )
    try:
        return torch.load(source, weights_only=True, map_location=map_location)
    except EOFError:
        where = f" at position {source.tell()}" if hasattr(source, "tell") else ""
        raise ValueError(
            f"load_checkpoint: the file object holds no checkpoint from where it stands{where}; after "
            f"save_checkpoint(f, ...) into it, call f.seek(0) before loading (as with torch.save/torch.load)"
        ) from None


def load_checkpoint(path_or_ckpt, gm, *, controller=None, optimizer=None) -> dict:
    """Restore a checkpoint (a file name, a binary file object, or the dict itself) into a
    module compiled with the same config; returns the ``extra`` values given to
    :func:`save_checkpoint`."""
    # onto the module's device: a checkpoint saved on a GPU loads on a CPU-only machine, and
    # its across-batch stores and planes land where the module runs
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else _load(path_or_ckpt, _device(gm))
    plan = _compiled(gm)
    saved = ReuseConfig(**ckpt["reuse"]["config"])
    if saved != gm.reuse_config:
        raise ValueError(
            f"load_checkpoint: the checkpoint was made with {saved}, this module with {gm.reuse_config}; "
            f"compile the fresh model with reuse_compile(model, x, config=ReuseConfig(**ckpt['reuse']['config']))"
        )
    stages = ckpt["reuse"]["stages"]
    rows = ckpt["reuse"].get("rows")
    missing = sorted((set(stages) | set(rows or ())) - set(plan.names()))
    if missing:
        raise ValueError(
            f"load_checkpoint: layers {missing} are not in this module's plan ({plan.names()}); compile the "
            f"same model with the checkpoint's config (checkpoints from before session 17 named an F.conv2d "
            f"inside a Conv2d subclass after its node, e.g. 'conv2d'; it is now named after its module)"
        )
    if rows is None:  # a checkpoint from before candidate lists were saved
        _restore_rows(gm, _rows_of_old_checkpoint(plan, stages, saved.policy == "measured"), old=True)
        _warn_off_list(plan, stages)
        if saved.scope == "input":
            log.warning(
                "load_checkpoint: the checkpoint holds no candidate lists (saved by an older version), and with "
                "scope 'input' Policy 2 now takes N from one image (session 17): the saved stages are restored, "
                "but an AdaptiveReuse walk continues along this version's lists, which may differ"
            )
    else:
        _restore_rows(gm, rows)
    load_stage_dict(gm, stages)  # stages first: a new (L, H) empties the stores
    gm.load_state_dict(ckpt["model"])
    if controller is not None:
        if ckpt["controller"] is None:
            raise ValueError("load_checkpoint: the checkpoint holds no controller state")
        if controller.plan is plan:  # the layers it walks: those that can run with reuse now
            controller.layers = [r.name for r in plan.rows() if r.rewritable]
        controller.load_state_dict(ckpt["controller"])
    if optimizer is not None:
        if ckpt["optimizer"] is None:
            raise ValueError("load_checkpoint: the checkpoint holds no optimizer state")
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["extra"]


def _rows_of_old_checkpoint(plan, stages: dict, measured: bool) -> dict:
    """What a checkpoint without candidate lists says of its rows: a layer with a stage ran
    with reuse, one without did not (this module's candidate lists are all there is). Only
    the measured policy's choices differ between machines; other rows are left as they are."""
    rows = {}
    for r in plan.rows() if measured else ():
        if r.name in stages and not r.rewritable:
            reason = None
        elif r.name not in stages and r.rewritable:
            reason = "measured policy: kept exact in the checkpoint"
        else:
            reason = r.reason
        rows[r.name] = _row_entry(r, reason)
    return rows


def _warn_off_list(plan, stages: dict) -> None:
    """Old checkpoints: a stage that is not on this machine's candidate list restarts the
    layer's walk at the list's first candidate; say so."""
    rows = {r.name: r for r in plan.rows()}
    off = [
        f"{n} (L={st['L']} H={st['H']})"
        for n, st in stages.items()
        if not st["exact"] and (st["L"], st["H"]) not in rows[n].candidates
    ]
    if off:
        log.warning(
            "load_checkpoint: the checkpoint holds no candidate lists (saved by an older version) and the "
            "stages of %s are not on this machine's candidate lists (its measured calibration differs): "
            "those layers run their saved stage, and an AdaptiveReuse walk continues them from the first candidate",
            ", ".join(off),
        )


def _restore_rows(gm, rows: dict, old: bool = False) -> None:
    """Make each plan row's candidate list, and whether it can run with reuse, the
    checkpoint's. They differ only where the measured policy's calibration on this machine
    differs from the saving one's (the same config and model give the same plan otherwise);
    the ops run any stage, so the checkpoint's lists are kept and the run continues as it was.
    ``old``: a checkpoint without candidate lists (``rows`` from :func:`_rows_of_old_checkpoint`)."""
    by_name = {r.name: r for r in _compiled(gm).rows()}  # every name of rows is one (load_checkpoint checks)
    changed = []
    for name, saved in rows.items():
        row = by_name[name]
        candidates = [tuple(c) for c in saved["candidates"]]
        runs_reuse = saved["reason"] is None
        if runs_reuse == row.rewritable and candidates == row.candidates:
            continue
        if runs_reuse and not row.rewritable and row.L_range is None:
            # not a policy's choice: the layer itself cannot be rewritten in this module
            raise ValueError(
                f"load_checkpoint: layer {name!r} runs with reuse in the checkpoint, but this module "
                f"cannot rewrite it ({row.reason}); compile the same model with the checkpoint's config"
            )
        changed.append(
            f"{name} ({_describe(row.candidates, row.rewritable)} here, "
            f"{_describe(candidates, runs_reuse)} in the checkpoint)"
        )
        if runs_reuse and not row.rewritable:
            _register(gm, state_path(name), _layer_state(name, gm.reuse_config, _device(gm)))
            row.reason = None  # its stage comes with the checkpoint's stages
        elif not runs_reuse and row.rewritable:
            parent, _, leaf = state_path(name).rpartition(".")
            delattr(gm.get_submodule(parent), leaf)
            row.reason, row.exact = saved["reason"], True
            row.L, row.H = saved["L"], saved["H"]
            row.r_c = row.reuse_rate = row.flop_ratio = None
        row.candidates = candidates
    if changed:
        kept = (
            "the checkpoint holds no candidate lists (saved by an older version): its stages were restored "
            "and these layers walk on along this machine's candidate lists"
            if old
            else "the checkpoint's candidate lists were kept, so the run continues as it was "
            "(same stages, same later decisions)"
        )
        log.warning(
            "load_checkpoint: the measured policy's calibration of this machine differs from that of the "
            "machine that saved the checkpoint for %s; %s",
            ", ".join(changed),
            kept,
        )
        rebuild(gm)


def _describe(candidates, runs_reuse: bool) -> str:
    return f"{len(candidates)} candidates {candidates}" if runs_reuse else "exact"


def _device(gm) -> torch.device:
    return next((t.device for t in gm.parameters()), torch.device("cpu"))
