"""The rewrite: every convolution whose plan row is not exact becomes the chain

    im2col -> lsh_hash -> cluster -> centroid_gemm -> reconstruct

of ``reuse`` custom ops (one chain per group), plus a call to the layer's state module that
records the clustering for the plan. The traced source graph is kept on the module, and
``rebuild`` regenerates the rewritten graph from it whenever a stage changes, so switching a
layer between stages or back to exact never touches its parameters.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx

from ..runtime import kernels
from ..runtime.ops import chain_input, chain_output, conv_pool_block, exact_conv2d
from .analysis import conv_operands

__all__ = ["emit_reuse_conv", "rebuild", "rewritten_graph", "state_path"]

_ops = torch.ops.reuse


def _ident(layer: str) -> str:
    """A layer's name as a Python identifier (``features.0:1`` -> ``features_0_call1``)."""
    return layer.replace(".", "_").replace(":", "_call")


def state_path(layer: str) -> str:
    """Attribute path of a layer's :class:`ReuseLayer` inside the compiled module."""
    return "reuse_state." + _ident(layer)


def _node(graph: fx.Graph, target, args, name: str) -> fx.Node:
    return graph.create_node("call_function", target, args, name=name)


def _detach(graph: fx.Graph, x, name: str) -> fx.Node:
    """``x.detach()`` as a method call: a ``torch.Tensor.detach`` function node generates an
    import line that a pickled module cannot load (``torch.save(gm)`` with constant norms)."""
    return graph.create_node("call_method", "detach", (x,), name=name)


def emit_reuse_conv(
    graph: fx.Graph,
    x,
    weight,
    bias,
    row,
    scope: str,
    base: str,
    group: int = 0,
    record: bool = True,
    centroid: str = "mean",
    hashing: str = "random",
    norm_grad: bool = True,
) -> fx.Node:
    """Emit one chain at the graph's insertion point and return its output node. With
    ``record`` the chain ends with a call to the layer's state module (measurements). With
    ``centroid="norm"`` the centroids are normalised and each member's output is scaled by
    its own norm (``reuse.cluster_norms`` returns the norms with the clusters). With
    ``hashing="pca"`` (and ``record``) the planes come from a call to the layer's hasher,
    which fits them to the chain's padded input when due (runtime/planes.py). With
    ``norm_grad=False`` (norm centroid) the member norms are computed from the detached
    input: constants of the backward, as ``ReuseConfig.norm_grad`` says."""
    k = list(row.kernel_size)
    s = list(row.stride)
    d = list(row.dilation)
    pad = list(row.padding)
    # The per-pixel chain (docs/architecture.md) where each sub-vector is one whole pixel: the
    # ids, the inverse index and the member norms kept per pixel (lsh_hash(per_pixel=True),
    # cluster_pixels, member_norms(per_pixel=True), reconstruct with the slot map), the same
    # values as the generic chain without its (sub-matrices x rows) tensors. Not with the
    # across-batch store, in exported graphs (record=False), or where the measured policy timed
    # the generic chain clearly faster for the stage (row.generic_chain). Where L divides C, one
    # per-pixel chain per channel slice of L (kernels.pixel_slices), their outputs added.
    C = row.in_channels // row.groups
    fits = kernels.use_pixel_chain(C, row.L, s, k, scope)
    pixel = record and not row.cluster_reuse and fits and not row.generic_chain
    slices = C // row.L if pixel else 1
    if slices > 1:
        xs = _node(graph, kernels.split_channels, (x, row.L), f"{base}_slices")
        ws = _node(graph, torch.split, (weight, row.L, 1), f"{base}_weight_slices")
        xs = [_node(graph, operator.getitem, (xs, j), f"{base}_s{j}_x") for j in range(slices)]
        ws = [_node(graph, operator.getitem, (ws, j), f"{base}_s{j}_w") for j in range(slices)]
        bases = [f"{base}_s{j}" for j in range(slices)]
    else:
        xs, ws, bases = [x], [weight], [base]
    xps = [_node(graph, _ops.im2col.default, (xj, k, s, pad, d), f"{b}_xp") for xj, b in zip(xs, bases)]
    if record and hashing == "pca":  # the layer's hasher refits its planes to xp now and then
        # (to the slices' xp together where there are several: the layer's padded input)
        fit_on = xps[0] if slices == 1 else xps
        planes = graph.call_module(state_path(row.name) + ".hasher", (fit_on, k, s, d, group))
        planes.name = f"{base}_planes"
    else:
        planes = graph.get_attr(state_path(row.name) + ".hasher.planes")
    fused = centroid == "norm" and norm_grad
    chain = {"k": k, "s": s, "d": d, "pad": pad, "scope": scope, "pixel": pixel, "centroid": centroid, "fused": fused}
    ys, counts = [], []
    for j in range(slices):
        b = bias if j == 0 else None
        y, c = _emit_chain(graph, xs[j], xps[j], planes, ws[j], b, row, bases[j], group, **chain)
        ys.append(y)
        counts.append(c)
    if slices > 1:
        y = _node(graph, kernels.add_outputs, (ys,), f"{base}_y")
        counts = _node(graph, kernels.join_blocks, (counts,), f"{base}_counts")
    else:
        y, counts = ys[0], counts[0]
    if record:
        graph.call_module(state_path(row.name), (counts, group))
    return y


def _emit_chain(graph, x, xp, planes, weight, bias, row, base, group, *, k, s, d, pad, scope, pixel, centroid, fused):
    """One chain from its padded input ``xp`` and planes: its output and counts nodes."""
    hash_args = (xp, planes, k, s, d) + ((True, x, pad) if pixel else ())
    ids = _node(graph, _ops.lsh_hash.default, hash_args, f"{base}_ids")
    # x too: with a channels-last x the backward writes x's gradient directly (reuse.cluster)
    # and the norms' backward keeps x, not the padded xp; with the norm centroid one op
    # returns the norms too, so the input's two gradients share one buffer (reuse.cluster_norms)
    # (norm_grad=False: the norms are constants of the backward, from the detached input)
    if pixel:
        op = _ops.cluster_pixels_norms.default if fused else _ops.cluster_pixels.default
        cl = _node(graph, op, (xp, ids, k, s, d, row.L, row.H, x, pad), f"{base}_cluster")
        names = ("centroids", "ranks", "slot_map", "counts")
    else:
        op = _ops.cluster_norms.default if fused else _ops.cluster.default
        cl = _node(graph, op, (xp, ids, k, s, d, row.L, row.H, scope, x, pad), f"{base}_cluster")
        names = ("centroids", "inverse", "counts")
    out = {n: _node(graph, operator.getitem, (cl, i), f"{base}_{n}") for i, n in enumerate(names)}
    centroids, counts = out["centroids"], out["counts"]
    scales = None
    if centroid == "norm":
        centroids = _node(graph, _ops.unit_rows.default, (centroids,), f"{base}_unit_centroids")
        if fused:
            scales = _node(graph, operator.getitem, (cl, len(names)), f"{base}_norms")
        else:
            norm_args = (_detach(graph, xp, f"{base}_xp_const"), k, s, d, row.L)
            if pixel:
                norm_args += (_detach(graph, x, f"{base}_x_const"), pad, True)
            scales = _node(graph, _ops.member_norms.default, norm_args, f"{base}_norms")
    yc = _node(graph, _ops.centroid_gemm.default, (centroids, weight), f"{base}_yc")
    if row.cluster_reuse:  # Algorithm 1: outputs of ids seen before come from the store
        store_args = (yc, centroids, ids, out["inverse"], counts, weight, group)
        yc = graph.call_module(state_path(row.name) + ".store", store_args)
        yc.name = f"{base}_yc_reused"
    if pixel:
        args = (yc, out["ranks"], bias, scales, out["slot_map"], [k[0], k[1], d[0], d[1]])
    else:
        args = (yc, out["inverse"], bias) if scales is None else (yc, out["inverse"], bias, scales)
    y = _node(graph, _ops.reconstruct.default, args, f"{base}_y")
    return y, counts


def _rewrite_node(gm, graph: fx.Graph, node: fx.Node, row, scope: str, record: bool) -> None:
    base = _ident(row.name)
    cfg = gm.reuse_config
    chain = {"record": record, "centroid": cfg.centroid, "hashing": cfg.hashing, "norm_grad": cfg.norm_grad}
    with graph.inserting_before(node):
        x, w, b = conv_operands(gm, graph, node, "module" if node.op == "call_module" else "function")
        if record:  # exported graphs leave both to the runtime
            # under autocast the chain runs in float32: its input cast once (runtime/ops.py)
            x = _node(graph, chain_input, (x,), f"{base}_input")
            # F.conv2d's checks of its input
            _node(graph, _ops.check_input.default, (x, row.in_channels, row.name), f"{base}_check")
        g = row.groups
        if g == 1:
            out = emit_reuse_conv(graph, x, w, b, row, scope, base, **chain)
        else:
            cg, mg = row.in_channels // g, row.out_channels // g
            parts = []
            for i in range(g):
                xi = _node(graph, torch.narrow, (x, 1, i * cg, cg), f"{base}_g{i}_x")
                wi = _node(graph, torch.narrow, (w, 0, i * mg, mg), f"{base}_g{i}_w")
                bi = None if b is None else _node(graph, torch.narrow, (b, 0, i * mg, mg), f"{base}_g{i}_b")
                parts.append(emit_reuse_conv(graph, xi, wi, bi, row, scope, f"{base}_g{i}", group=i, **chain))
            out = _node(graph, torch.cat, (parts, 1), f"{base}_cat")
        if record:  # under autocast the output in autocast's dtype, as F.conv2d's (runtime/ops.py)
            out = _node(graph, chain_output, (out,), f"{base}_output")
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _zero_skip_node(gm, graph: fx.Graph, node: fx.Node, row) -> None:
    """An exact layer with the zero-skipping weight gradient (``row.exact_kernel``): the conv
    node becomes a call of :func:`exact_conv2d` (``reuse.zero_skip_conv2d`` where it applies,
    F.conv2d elsewhere), the same forward."""
    t, _, left, _ = row.padding  # symmetric (the measured policy offers it only then)
    with graph.inserting_before(node):
        x, w, b = conv_operands(gm, graph, node, "module" if node.op == "call_module" else "function")
        skip = row.calibration["zero_skip"]["skip"]
        args = (x, w, b, list(row.stride), [t, left], list(row.dilation), skip)
        out = _node(graph, exact_conv2d, args, _ident(row.name) + "_zero_skip")
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _conv_pool_node(gm, graph: fx.Graph, nodes: dict, row) -> None:
    """An exact first block in one op (``row.fused_block``): the conv node, the max-pool after it
    and its ReLU (``row.calibration["conv_pool"]["pool"]``) become one call of
    :func:`conv_pool_block` (``reuse.conv_pool`` where it applies, the three layers elsewhere)."""
    cal = row.calibration["conv_pool"]
    block = cal["pool"]
    conv, pool = nodes[row.node], nodes[block["pool"]]
    relu = nodes[block["relu"]] if block["relu"] is not None else None
    last = relu if relu is not None else pool
    t, _, left, _ = row.padding  # symmetric (the measured policy fuses it only then)
    with graph.inserting_before(conv):
        x, w, b = conv_operands(gm, graph, conv, "module" if conv.op == "call_module" else "function")
        spec = [block["kernel"], block["stride"], block["padding"]]
        args = (x, w, b, [t, left], spec, relu is not None, cal["skip"])
        out = _node(graph, conv_pool_block, args, _ident(row.name) + "_block")
    last.replace_all_uses_with(out)
    for n in (relu, pool, conv):
        if n is not None:
            graph.erase_node(n)


def rewritten_graph(gm: fx.GraphModule, record: bool = True) -> fx.Graph:
    """A new graph: ``gm``'s traced source with every non-exact row's conv rewritten at the
    row's current stage, and every exact row with the zero-skipping weight gradient calling
    it. ``record=False`` (for export) leaves out the state-module calls and keeps exact rows
    as the source's convolutions."""
    graph = copy.deepcopy(gm._reuse_source)
    nodes = {n.name: n for n in graph.nodes}
    scope = "input" if gm.reuse_config.scope == "input" else "batch"
    for row in gm.reuse_plan.rows():
        if row.rewritable and not row.exact:
            _rewrite_node(gm, graph, nodes[row.node], row, scope, record)
        elif record and row.zero_skipping:
            _zero_skip_node(gm, graph, nodes[row.node], row)
        elif record and row.fused_block:
            _conv_pool_node(gm, graph, nodes, row)
    graph.lint()
    return graph


def rebuild(gm: fx.GraphModule) -> fx.GraphModule:
    """Regenerate ``gm``'s graph from its traced source and its plan's current stages."""
    gm.graph = rewritten_graph(gm)
    gm.recompile()
    return gm
