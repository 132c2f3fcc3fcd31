"""Command line: ``python -m reuse_compiler <command>``.

    inspect MODULE:FACTORY --input-shape 128,3,32,32   print the plan and the rewritten graph
    export MODULE:FACTORY --input-shape 128,3,32,32 [--variant reuse|exact] -o model.onnx

``MODULE:FACTORY`` names a callable returning an ``nn.Module`` (e.g.
``examples.models:cifarnet`` from a source checkout, or ``reuse_compiler.models:vgg19``);
``--kwargs`` passes it keyword arguments as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

__all__ = ["main", "load_factory", "build_parser"]


def load_factory(spec: str):
    """Import ``module:attr`` and return the attribute (a model factory)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"error: model must be MODULE:FACTORY (e.g. examples.models:cifarnet), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"error: cannot import {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"error: module {module_name!r} has no attribute {attr!r}") from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated ints, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def _int_or_map(text: str):
    """``16`` or ``conv1=5,conv2=16``."""
    if "=" not in text:
        return int(text)
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        out[name] = int(value)
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODULE:FACTORY returning an nn.Module, e.g. examples.models:cifarnet")
    p.add_argument("--input-shape", type=_shape, required=True, help="example batch shape, e.g. 128,3,32,32")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the factory")
    p.add_argument("--L", type=_int_or_map, default=None, help="sub-vector length: an int or name=int,...")
    p.add_argument("--H", type=_int_or_map, default=None, help="hash functions: an int or name=int,...")
    p.add_argument("--scope", default="batch", help="input | batch | across-batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", default="", help="comma-separated layer or module names kept exact")
    p.add_argument(
        "--policy",
        choices=["paper", "measured"],
        default="paper",
        help="candidate order: the paper's FLOP model, or times measured here at compile time "
        "(on the random example batch: its errors are those of random data)",
    )
    p.add_argument("--l-values", choices=["fast", "all", "extended"], default="fast", help="L values in the candidates")
    p.add_argument("--centroid", choices=["norm", "mean"], default="norm")
    p.add_argument("--max-error", type=float, default=None, help="measured policy: drop stages with a larger error")
    p.add_argument(
        "--hashing",
        choices=["random", "pca"],
        default="random",
        help="hash planes: random (the paper) or fitted to each layer's input (fitted on the example batch here)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reuse_compiler", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the reuse plan and the rewritten graph")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON only")
    p.add_argument("--no-graph", action="store_true", help="do not print the graph")
    p = sub.add_parser("export", help="export to ONNX (needs the [onnx] or [onnx-gpu] extra)")
    _add_model_args(p)
    p.add_argument("--variant", choices=["reuse", "exact"], default="reuse", help="reuse ops or the original convs")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18)
    return parser


def compile_from_args(args):
    """Build the model and ``reuse_compile`` it as the arguments say; returns (gm, x)."""
    from . import ReuseConfig, reuse_compile

    factory = load_factory(args.model)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --kwargs is not valid JSON: {e}") from e
    model = factory(**kwargs)
    exclude = [e for e in args.exclude.split(",") if e]
    try:
        config = ReuseConfig(
            L=args.L,
            H=args.H,
            scope=args.scope,
            seed=args.seed,
            exclude=exclude,
            policy=args.policy,
            l_values=args.l_values,
            centroid=args.centroid,
            max_error=args.max_error,
            hashing=args.hashing,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    x = torch.randn(*args.input_shape, generator=torch.Generator().manual_seed(args.seed))
    return reuse_compile(model, x, config=config), x


def _inspect(args) -> int:
    gm, x = compile_from_args(args)
    with torch.no_grad():
        gm(x)  # fills the measured columns (on random data)
    if args.json:
        print(json.dumps(gm.reuse_plan.to_dict(), indent=2))
        return 0
    print(f"# reuse plan for {args.model} on a random batch of shape {tuple(x.shape)}")
    print(gm.reuse_plan)
    if not args.no_graph:
        print("\n# rewritten graph")
        print(gm.print_readable(print_output=False))
    return 0


def _export(args) -> int:
    from .export import OnnxExportError, export_onnx

    gm, x = compile_from_args(args)
    gm.eval()
    with torch.no_grad():
        gm(x)  # one forward first: the stage it runs at is the one exported
    try:
        result = export_onnx(gm, x, args.output, variant=args.variant, opset=args.opset)
    except (OnnxExportError, ImportError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"wrote {result.path}: {args.variant} variant of {args.model}, opset {result.opset}, dynamic batch")
    print(
        f"parity on the example batch {tuple(x.shape)}: max|onnxruntime - torch| = {result.max_abs_diff:.3g} "
        f"(output max {result.scale:.3g})"
    )
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"inspect": _inspect, "export": _export}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
