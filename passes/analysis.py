"""Graph analysis: trace with torch.fx, propagate shapes, find the convolutions.

``trace(model, args, leaves)`` returns a GraphModule whose nodes carry
``meta["tensor_meta"]`` from one run on the example input, and ``find_convs`` lists every
``nn.Conv2d`` module call and ``F.conv2d`` call as a :class:`ConvSite` with its
hyper-parameters normalised (explicit 4-sided padding, 2-tuples) and its shapes.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["ConvSite", "ReuseTraceError", "trace", "find_convs", "conv_operands", "pool_block"]


class ReuseTraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the place and the way on."""


class _Tracer(fx.Tracer):
    """fx.Tracer that treats the excluded submodules as leaves and remembers in which
    submodule tracing failed."""

    def __init__(self, leaves=()):  # no leaves: as fx re-traces a pickled module's code
        super().__init__()
        self.leaves = set(leaves)
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = name
            raise
        finally:
            self.stack.pop()


def _user_frame(exc: BaseException) -> str:
    """'file:line (code)' of the innermost traceback frame outside torch."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} (`{(f.line or '').strip()}`)"


def trace(model: nn.Module, args: tuple, leaves=()) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate shapes from one run on ``args``.

    The shape run happens in eval mode under ``no_grad`` so that it changes no state of
    the model (BatchNorm statistics, dropout RNG use).
    """
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = tracer.failed_in
        owner = (
            f"submodule {where!r} ({type(model.get_submodule(where)).__name__})"
            if where
            else (f"the forward of {type(model).__name__}")
        )
        way = (
            f"pass ReuseConfig(exclude=[{where!r}]) to keep that submodule out of the trace (it "
            f"then runs as written and its convolutions stay exact), or make its control flow "
            f"independent of tensor values"
            if where
            else "move the data-dependent code into a submodule and list it in ReuseConfig(exclude=[...]) "
            "(it then runs as written and its convolutions stay exact), or make the control flow "
            "independent of tensor values"
        )
        raise ReuseTraceError(
            f"reuse_compile: torch.fx cannot trace {owner} at {_user_frame(e)}: {type(e).__name__}: {e}. Way on: {way}."
        ) from e
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    was_training = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as e:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        cause = e.__cause__ or e  # ShapeProp wraps the model's own error in a dump of the node
        raise ValueError(
            f"reuse_compile: running {name} on example_input (shapes {shapes}) failed: "
            f"{type(cause).__name__}: {cause}. Pass an example batch the model accepts (ideally one training batch)."
        ) from cause
    finally:
        for m, mode in was_training:
            m.training = mode
    return gm


@dataclass
class ConvSite:
    """One 2-D convolution call in the traced graph."""

    name: str  # plan row name: module path, or the node's name for F.conv2d
    node: str  # node name in the graph
    kind: str  # "module" | "function"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, bottom, left, right
    dilation: tuple[int, int]
    groups: int
    bias: bool
    padding_mode: str = "zeros"
    custom_forward: bool = False  # a Conv2d subclass with its own forward, called as one module
    module_type: str = "Conv2d"


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _explicit_padding(padding, kernel, dilation) -> tuple[int, int, int, int]:
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":  # PyTorch's convention: the extra pixel goes after
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def conv2d_arguments(node: fx.Node) -> dict:
    """The arguments of an ``F.conv2d`` call node by name (its two schemas differ only in
    the type of ``padding``, which defeats FX's schema normalisation)."""
    out = dict(_CONV2D_DEFAULTS)
    out.update(zip(_CONV2D_ARGS, node.args))
    out.update(node.kwargs)
    return out


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def find_convs(gm: fx.GraphModule, conv_paths=()) -> list[ConvSite]:
    """Every nn.Conv2d module call and F.conv2d call, in graph order, with unique row names.
    ``conv_paths``: the paths of the traced model's Conv2d modules (fx keeps only their
    parameters), after which an F.conv2d that runs inside one (a Conv2d subclass traced into)
    is named."""
    modules = dict(gm.named_modules())
    conv_paths = set(conv_paths)
    sites, seen = [], {}

    taken: set[str] = set()

    def row_name(path: str) -> str:  # a module called more than once: path, path:1, ...
        count = seen.get(path, 0)
        name = path if count == 0 else f"{path}:{count}"
        while name in taken:  # another site already has it (an F.conv2d node named like a module)
            count += 1
            name = f"{path}:{count}"
        seen[path] = count + 1
        taken.add(name)
        return name

    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Conv2d):
            # a Conv2d subclass is traced into (its F.conv2d is a site below) unless it is a
            # leaf (excluded, or torch's own, e.g. a QAT conv): then its forward may differ
            m = modules[node.target]
            sites.append(
                ConvSite(
                    name=row_name(node.target),
                    node=node.name,
                    kind="module",
                    in_shape=_shape(node.args[0]),
                    out_shape=_shape(node),
                    weight_shape=tuple(m.weight.shape),
                    stride=_pair(m.stride),
                    padding=_explicit_padding(m.padding, m.kernel_size, _pair(m.dilation)),
                    dilation=_pair(m.dilation),
                    groups=m.groups,
                    bias=m.bias is not None,
                    padding_mode=m.padding_mode,
                    custom_forward=type(m).forward is not nn.Conv2d.forward,
                    module_type=type(m).__name__,
                )
            )
        elif node.op == "call_function" and node.target in (torch.conv2d, F.conv2d):
            kw = conv2d_arguments(node)
            w = kw.get("weight")
            wshape = _shape(w)
            if wshape is None:
                continue
            dil = _pair(kw.get("dilation", 1))
            # named after the Conv2d module it runs in (a subclass traced into), else after the node
            stack = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values() if v[0] in conv_paths]
            sites.append(
                ConvSite(
                    name=row_name(stack[-1] if stack else node.name),
                    node=node.name,
                    kind="function",
                    in_shape=_shape(kw.get("input")),
                    out_shape=_shape(node),
                    weight_shape=wshape,
                    stride=_pair(kw.get("stride", 1)),
                    padding=_explicit_padding(kw.get("padding", 0), wshape[2:], dil),
                    dilation=dil,
                    groups=int(kw.get("groups", 1)),
                    bias=kw.get("bias") is not None,
                )
            )
    return sites


def conv_operands(gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, kind: str):
    """(input, weight, bias) nodes of a conv node, emitting get_attr nodes for a module's
    parameters at the current insertion point."""
    if kind == "module":
        m = gm.get_submodule(node.target)
        w = graph.get_attr(f"{node.target}.weight")
        b = graph.get_attr(f"{node.target}.bias") if m.bias is not None else None
        return node.args[0], w, b
    a = conv2d_arguments(node)
    return a["input"], a["weight"], a["bias"]


_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_RELUS = (F.relu, torch.relu)


def _square(v) -> int | None:
    """One int for a square pooling parameter (an int or an equal pair), else None."""
    if isinstance(v, int):
        return v
    if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1] and isinstance(v[0], int):
        return v[0]
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def pool_block(gm: fx.GraphModule, conv: str) -> dict | None:
    """The max-pool (and the ReLU after it) that the conv node ``conv`` feeds, where the three
    can run as one op (``reuse.conv_pool``): the conv's only user an ``nn.MaxPool2d`` call or an
    ``F.max_pool2d`` call on it (square window, dilation 1, floor mode, no indices returned),
    and optionally that pool's only user a ReLU (``F.relu``, ``torch.relu``, ``nn.ReLU``,
    ``.relu()``). Returns ``{"pool": node name, "relu": node name or None, "kernel", "stride",
    "padding"}`` or None."""
    nodes = {n.name: n for n in gm.graph.nodes}
    pool = _only_user(nodes[conv])
    if pool is None:
        return None
    if pool.op == "call_module" and type(gm.get_submodule(pool.target)) is nn.MaxPool2d and len(pool.args) == 1:
        m = gm.get_submodule(pool.target)
        a = {
            "kernel_size": m.kernel_size,
            "stride": m.stride,
            "padding": m.padding,
            "dilation": m.dilation,
            "ceil_mode": m.ceil_mode,
            "return_indices": m.return_indices,
        }
    elif pool.op == "call_function" and pool.target in (F.max_pool2d, torch.max_pool2d):
        a = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
        a.update(zip(_MAX_POOL_ARGS, pool.args))
        a.update(pool.kwargs)
    else:
        return None
    if a.get("input", pool.args[0] if pool.args else None) is not nodes[conv]:
        return None
    k, p = _square(a["kernel_size"]), _square(a["padding"])
    s = k if a["stride"] in (None, [], ()) else _square(a["stride"])
    if None in (k, s, p) or _square(a["dilation"]) != 1 or a["ceil_mode"] or a["return_indices"]:
        return None
    if not (1 <= k <= 15 and s >= 1 and 0 <= 2 * p <= k):
        return None
    relu = _only_user(pool)
    if relu is not None and not (
        (relu.op == "call_function" and relu.target in _RELUS)
        or (relu.op == "call_module" and type(gm.get_submodule(relu.target)) is nn.ReLU)
        or (relu.op == "call_method" and relu.target == "relu")
    ):
        relu = None
    if relu is not None and (relu.args[:1] != (pool,) or len(relu.args) > 2):
        relu = None
    return {"pool": pool.name, "relu": None if relu is None else relu.name, "kernel": k, "stride": s, "padding": p}
