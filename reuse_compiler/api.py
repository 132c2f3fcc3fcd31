"""``reuse_compile`` and ``set_stage``: the entry points of the compiler pass.

>>> import torch
>>> from reuse_compiler.models import cifarnet
>>> gm = reuse_compile(cifarnet(in_channels=1, image_size=28), torch.randn(8, 1, 28, 28))
>>> [(r.name, r.L, r.H) for r in gm.reuse_plan]
[('conv1', 5, 6), ('conv2', 32, 4)]
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from reuse_compiler.passes.analysis import ConvSite, find_convs, trace
from reuse_compiler.passes.conv_rewrite import rebuild, state_path
from reuse_compiler.runtime.state import ReuseLayer

from . import policies
from .config import MAX_H, ReuseConfig
from .plan import LayerPlan, ReusePlan

__all__ = ["reuse_compile", "set_stage", "MAX_GROUPS"]

# Grouped convolutions become one chain per group; beyond this they stay exact.
MAX_GROUPS = 8


def _module_of(name: str) -> str:
    """The module path of a plan row's name: a module called more than once has rows
    ``c``, ``c:1``, ..., and ``exclude`` / ``L`` / ``H`` given for ``c`` apply to every call."""
    return name.split(":")[0]


def _for_layer(config: ReuseConfig, field_name: str, name: str):
    """``config``'s fixed L or H for the row ``name``: for the call itself (``c:1``) if given,
    else for its module (``c``)."""
    v = config.for_layer(field_name, name)
    return config.for_layer(field_name, _module_of(name)) if v is None else v


def _not_rewritable(site: ConvSite, config: ReuseConfig) -> str | None:
    if site.name in config.exclude or _module_of(site.name) in config.exclude:
        return "excluded by ReuseConfig.exclude"
    if site.custom_forward:
        return (
            f"a {site.module_type} (a Conv2d subclass with its own forward) run as one module; kept exact. "
            "Let torch.fx trace into it (its F.conv2d is then rewritten) or list it in exclude"
        )
    if site.padding_mode != "zeros":
        return f"padding_mode={site.padding_mode!r} (the lazy im2col zero-pads); kept exact"
    if site.in_shape is None or len(site.in_shape) != 4:
        return "input is not a 4-D (N, C, H, W) tensor in the example run; kept exact"
    if site.groups > MAX_GROUPS:
        return f"groups={site.groups} > {MAX_GROUPS}: one reuse chain per group would be too many; kept exact"
    return None


def _plan_row(site: ConvSite, first: bool, config: ReuseConfig) -> LayerPlan:
    M, cg, kh, kw = site.weight_shape
    Nb, _, oh, ow = site.out_shape
    row = LayerPlan(
        name=site.name,
        in_channels=site.in_shape[1] if site.in_shape else cg * site.groups,
        out_channels=M,
        kernel_size=(kh, kw),
        stride=site.stride,
        padding=site.padding,
        dilation=site.dilation,
        groups=site.groups,
        bias=site.bias,
        K=cg * kh * kw,
        N=Nb * oh * ow,
        node=site.node,
    )
    row.reason = _not_rewritable(site, config)
    if row.reason is not None:
        row.exact = True
        return row
    row.L_range = policies.l_range(kw, cg, first)
    # Policy 2's N: the rows of the set being clustered (one image's with scope "input")
    row.H_range = policies.h_range(row.N // Nb if config.scope == "input" and Nb else row.N)
    row.L_values = policies.l_values(*row.L_range, kh=kh, kw=kw, in_channels=cg, mode=config.l_values)
    row.candidates = policies.candidates(row.L_values, list(range(row.H_range[0], row.H_range[1] + 1)), row.M)
    L0, H0 = row.candidates[0]
    row.L = _for_layer(config, "L", row.name) or L0
    row.H = _for_layer(config, "H", row.name) or H0
    _check_LH(row, row.L, row.H, "ReuseConfig")
    row.cluster_reuse = config.scope == "across-batch"
    return row


def _layer_state(name: str, config: ReuseConfig, device: torch.device) -> ReuseLayer:
    """A rewritten layer's runtime state (measurements, hasher, across-batch store) on
    ``device``, the device its stages are chosen on (a run on another type warns)."""
    state = ReuseLayer(name, config.seed, config.cache_size, config.refresh, config.hashing, config.hash_refresh)
    state.compiled_on = torch.device(device).type
    return state.to(device)


def _check_LH(row: LayerPlan, L, H, who: str) -> None:
    if L is not None and (isinstance(L, bool) or not isinstance(L, int) or not 1 <= L <= row.K):
        raise ValueError(f"{who}: L for layer {row.name!r} must be an int in [1, K={row.K}]; got {L!r}")
    if H is not None and (isinstance(H, bool) or not isinstance(H, int) or not 1 <= H <= MAX_H):
        raise ValueError(f"{who}: H for layer {row.name!r} must be an int in [1, {MAX_H}]; got {H!r}")


def _excluded_convs(model: nn.Module, excluded: list[str]) -> list[str]:
    """Convolutions hidden inside excluded (untraced) submodules."""
    out = []
    for prefix in excluded:
        try:
            sub = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(sub, nn.Conv2d):
            continue
        out += [f"{prefix}.{n}" for n, m in sub.named_modules() if isinstance(m, nn.Conv2d) and n]
    return out


def _measure(gm: fx.GraphModule):
    def measure(plan: ReusePlan) -> None:
        for row in plan.rows():
            if row.exact:
                continue
            state = gm.get_submodule(state_path(row.name))
            r_c = state.remaining_ratio()
            if r_c is not None:
                row.r_c = r_c
                row.reuse_rate = state.reuse_rate() if row.cluster_reuse else None
                row.flop_ratio = row.predicted_flop_ratio(r_c, row.reuse_rate)

    return measure


def reuse_compile(
    model: nn.Module, example_input, *, config: ReuseConfig | None = None, inplace: bool = False
) -> fx.GraphModule:
    """Rewrite every eligible convolution of ``model`` for adaptive deep reuse.

    Args:
        model: an ``nn.Module`` that torch.fx can trace.
        example_input: a tensor or tuple of positional inputs, ideally one training batch;
            the plan's N (rows per convolution) comes from it.
        config: a :class:`ReuseConfig` (default: all from the plan).
        inplace: if False (default) the model is deep-copied and left untouched; if True
            the returned module shares the model's parameters.

    Returns a ``torch.fx.GraphModule`` that trains and infers like the model, with
    ``reuse_plan`` (the per-layer table), ``reuse_config`` and ``reuse_state`` attached.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reuse_compile: model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "reuse_plan"):
        raise TypeError(
            "reuse_compile: model is already compiled (it has a reuse_plan); compile the original model "
            "(it is left untouched unless inplace=True), or change this one's stages with set_stage"
        )
    config = ReuseConfig() if config is None else config
    if not isinstance(config, ReuseConfig):
        raise TypeError(f"reuse_compile: config must be a ReuseConfig, got {type(config).__name__}")
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not args or not any(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(
            "reuse_compile: example_input must be a tensor or a tuple of positional inputs holding at "
            f"least one tensor (one training batch); got {type(example_input).__name__}"
        )
    target = model if inplace else copy.deepcopy(model)
    gm = trace(target, args, leaves=config.exclude)
    sites = find_convs(gm, [n for n, m in target.named_modules() if isinstance(m, nn.Conv2d)])
    rows = [_plan_row(site, i == 0, config) for i, site in enumerate(sites)]
    for name in _excluded_convs(target, config.exclude):
        rows.append(
            LayerPlan(
                name=name,
                in_channels=0,
                out_channels=0,
                kernel_size=(0, 0),
                stride=(0, 0),
                padding=(0, 0, 0, 0),
                K=0,
                N=0,
                exact=True,
                reason="inside a module excluded by ReuseConfig.exclude (not traced)",
            )
        )
    if config.policy == "measured":
        _apply_measured_policy(gm, rows, args, config)
    names = {r.name for r in rows}
    for field_name in ("L", "H"):
        v = getattr(config, field_name)
        unknown = sorted(set(v) - names) if isinstance(v, dict) else []
        if unknown:
            raise ValueError(f"ReuseConfig.{field_name} names unknown layers {unknown}; layers: {sorted(names)}")
    unknown = [e for e in config.exclude if e not in names and not _is_module(target, e)]
    if unknown:
        raise ValueError(
            f"ReuseConfig.exclude names unknown layers or modules {unknown}; convolutions: {sorted(names)}"
        )

    gm._reuse_source = copy.deepcopy(gm.graph)
    gm.reuse_config = config
    gm.add_module("reuse_state", nn.Module())
    # the layers' state (planes) where the model is: compiled on a GPU, it hashes there
    device = next((t.device for t in target.parameters()), next(a.device for a in args if isinstance(a, torch.Tensor)))
    for row in rows:
        if row.rewritable:
            state = _layer_state(row.name, config, device)
            state.set_params(row.L, row.H)
            _register(gm, state_path(row.name), state)
    _warn_paper_policy_on_gpu(device, rows, config)
    gm.reuse_plan = ReusePlan(rows, measure=_measure(gm))
    _keep_on_deepcopy(gm)
    return rebuild(gm)


def _warn_paper_policy_on_gpu(device: torch.device, rows, config: ReuseConfig) -> None:
    """The runtime's CUDA path is plain PyTorch ops: on one H200 every stage measured was
    6-113x slower than cuDNN (docs/performance.md, "On a GPU"), and the paper's FLOP model
    cannot see that, so a model compiled there with ``policy="paper"`` that reuses a layer
    gets a warning that names the way on (the measured policy, which keeps exact there)."""
    reused = [r.name for r in rows if r.rewritable and not r.exact]
    if device.type != "cuda" or config.policy != "paper" or not reused:
        return
    warnings.warn(
        f"reuse_compile: compiled on {device} with policy='paper', which reuses {', '.join(reused)} by the FLOP "
        "model; on a GPU the reuse kernels are plain PyTorch ops and were measured 6-113x slower than cuDNN per "
        "layer (one H200, docs/performance.md). Use ReuseConfig(policy='measured') to keep only the stages "
        "timed faster than the exact convolution on this device (on that GPU: none, so training runs at "
        "stock speed).",
        UserWarning,
        stacklevel=3,
    )


_REUSE_ATTRS = ("_reuse_source", "reuse_config", "reuse_plan")


def _keep_on_deepcopy(gm: fx.GraphModule) -> None:
    """Make ``copy.deepcopy(gm)`` a compiled module too (an EMA copy, a copy per trial):
    ``GraphModule.__deepcopy__`` keeps only the graph, submodules, parameters and buffers,
    so the plan, the config and the traced source are copied here, and the copy's plan
    reads its own runtime state. Pickling (``torch.save(gm)``) is made to carry them too.
    (``type(gm)`` is fx's per-instance class, so this touches no other module.)"""
    cls = type(gm)
    if "__deepcopy__" in cls.__dict__:
        return

    def __deepcopy__(self, memo):
        res = fx.GraphModule.__deepcopy__(self, memo)
        for name in _REUSE_ATTRS:
            if name in self.__dict__:
                setattr(res, name, copy.deepcopy(self.__dict__[name], memo))
        res.reuse_plan._measure = _measure(res)
        _keep_on_deepcopy(res)
        return res

    cls.__deepcopy__ = __deepcopy__

    def __reduce__(self):
        # fx pickles a GraphModule as its generated code and its attributes, and re-traces the
        # code when loading. Of the attributes reuse_compile adds, the traced source graph (an
        # fx.Graph) does not pickle: it travels as a GraphModule of its own (code again, sharing
        # the submodules); the plan's measuring closure is made anew for the loaded module.
        fn, (body, import_block) = fx.GraphModule.__reduce__(self)
        body = dict(body)
        source = body.pop("_reuse_source", None)
        plan = body.pop("reuse_plan", None)
        if plan is not None:
            plan = copy.copy(plan)
            plan._measure = None
        source_gm = None if source is None else fx.GraphModule(self, source, "ReuseSource")
        return (_unpickle_compiled, (fn, body, import_block, source_gm, plan))

    cls.__reduce__ = __reduce__


def _unpickle_compiled(fn, body, import_block, source_gm, plan) -> fx.GraphModule:
    """A compiled module from its pickle (``torch.save(gm)`` / ``torch.load(..., weights_only=False)``):
    fx's own reconstruction, then the traced source graph, the plan (measuring the loaded
    module's runtime state) and the deepcopy/pickle hooks."""
    gm = fn(body, import_block)
    if source_gm is not None:
        gm._reuse_source = source_gm.graph
    if plan is not None:
        plan._measure = _measure(gm)
        gm.reuse_plan = plan
    _keep_on_deepcopy(gm)
    return gm


def _apply_measured_policy(gm, rows, args, config: ReuseConfig) -> None:
    """Time each layer's stages on its real input; keep and order the faster-than-exact ones."""
    from .calibration import calibrate, capture_conv_inputs

    todo = [r for r in rows if r.rewritable]
    gm._reuse_source = gm.graph
    inputs = capture_conv_inputs(gm, args, {r.node for r in todo})
    nodes = {n.name: n for n in gm.graph.nodes}
    for row in todo:
        node = nodes[row.node]
        if node.op == "call_module":
            conv = gm.get_submodule(node.target)
            weight, bias = conv.weight, conv.bias
        else:
            from reuse_compiler.passes.analysis import conv2d_arguments

            a = conv2d_arguments(node)
            weight = _resolve(gm, a["weight"])
            bias = _resolve(gm, a["bias"])
        if weight is None:
            continue  # a computed weight: keep the paper's order
        x, input_grad = inputs[row.node]
        row.calibration = calibrate(
            row,
            x,
            weight,
            bias,
            config.calibration_repeats,
            config.centroid,
            input_grad,
            config.seed,
            config.hashing,
            config.norm_grad,
            config.zero_skip,
        )
        cands = row.calibration["candidates"]
        # "faster" with a margin (max_time_ratio < 1): a stage within timing noise of exact is not
        # kept; by the medians and by the fastest runs (noise only adds time: a slow phase of the
        # exact runs inflates their median, not their minimum)
        m = config.max_time_ratio
        zs = row.calibration.get("zero_skip")  # the layer's exact runs, whenever it runs exact
        if zs is not None and zs["ratio"] <= m and zs["ratio_min"] <= m:
            row.exact_kernel = "zero-skip"
        faster = sorted((c for c in cands if c["ratio"] <= m and c["ratio_min"] <= m), key=lambda c: c["ms"])
        kept = faster if config.max_error is None else [c for c in faster if c["error"] <= config.max_error]
        if not kept:
            if not faster:
                why = (
                    f"no candidate is faster than exact here (best {min(c['ratio'] for c in cands):.2f}x, "
                    f"max_time_ratio {config.max_time_ratio:g})"
                )
            else:
                why = (
                    f"no faster-than-exact candidate has output error <= max_error={config.max_error:g} "
                    f"(lowest {min(c['error'] for c in faster):.3f})"
                )
            row.reason, row.exact = f"measured policy: {why}", True
            if config.fuse_pool:
                _fuse_block(gm, row, x, input_grad, weight, bias, config)
            continue
        row.candidates = [(c["L"], c["H"]) for c in kept]
        row.L = _for_layer(config, "L", row.name) or row.candidates[0][0]
        row.H = _for_layer(config, "H", row.name) or row.candidates[0][1]


def _fuse_block(gm, row, x, input_grad: bool, weight, bias, config: ReuseConfig) -> None:
    """An exact layer followed by a max-pool (and a ReLU) that can run as one op
    (``reuse.conv_pool``): time the block three ways (``calibration.calibrate_block``) and run it
    as one op (``row.exact_kernel = "conv-pool"``) where that is faster, by ``max_time_ratio``
    of stock's block and than the layers as the row would run them otherwise."""
    from reuse_compiler.passes.analysis import pool_block

    from .calibration import block_fits, calibrate_block, zero_skip_values

    block = pool_block(gm, row.node)
    if block is None or not block_fits(row, x, weight, input_grad):
        return
    skip = zero_skip_values(row, x) if config.zero_skip else None
    cal = calibrate_block(row, x, weight, bias, block, skip, config.calibration_repeats)
    row.calibration["conv_pool"] = cal
    m = config.max_time_ratio
    unfused = cal["ms_zero_skip"] if row.exact_kernel == "zero-skip" else cal["ms_stock"]
    if cal["ratio"] <= m and cal["ratio_min"] <= m and cal["ms"] < unfused:
        row.exact_kernel = "conv-pool"


def _resolve(gm, node):
    """The tensor behind a get_attr node (None for anything else)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    return None


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _register(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    gm.get_submodule(parent).add_module(leaf, module)


def _compiled(gm) -> ReusePlan:
    plan = getattr(gm, "reuse_plan", None)
    if not isinstance(plan, ReusePlan):
        raise TypeError(f"expected a module returned by reuse_compile (with .reuse_plan), got {type(gm).__name__}")
    return plan


def set_stage(gm: fx.GraphModule, layer: str | None = None, *, L=None, H=None, cluster_reuse=None, exact=None):
    """Set the stage of one layer (or of every rewritable layer when ``layer`` is None).

    ``L``/``H`` choose the sub-vector length and hash count, ``cluster_reuse`` turns
    across-batch reuse (Algorithm 1) on or off, ``exact=True`` runs the original
    convolution. Unspecified fields keep their value. The graph is regenerated; parameters
    and optimizer state are untouched.

    >>> import torch
    >>> from reuse_compiler.models import cifarnet
    >>> gm = reuse_compile(cifarnet(in_channels=1, image_size=28), torch.randn(8, 1, 28, 28))
    >>> set_stage(gm, "conv2", L=16, H=10); (gm.reuse_plan["conv2"].L, gm.reuse_plan["conv2"].H)
    (16, 10)
    """
    plan = _compiled(gm)
    if layer is None:
        rows = [r for r in plan.rows() if r.rewritable]
    else:
        row = plan[layer]
        if not row.rewritable and exact is not True:
            raise ValueError(f"set_stage: layer {layer!r} cannot run with reuse: {row.reason}")
        rows = [row]
    for row in rows:
        _check_LH(row, L, H, "set_stage")
    for row in rows:
        if L is not None:
            row.L = L
        if H is not None:
            row.H = H
        if cluster_reuse is not None:
            row.cluster_reuse = bool(cluster_reuse)
            if not row.cluster_reuse and row.rewritable:  # stale outputs are not kept for later
                gm.get_submodule(state_path(row.name)).store.clear()
        if exact is not None:
            row.exact = bool(exact) or not row.rewritable
        if row.rewritable:
            gm.get_submodule(state_path(row.name)).set_params(row.L, row.H)
            row.r_c = row.flop_ratio = row.reuse_rate = None
    rebuild(gm)
