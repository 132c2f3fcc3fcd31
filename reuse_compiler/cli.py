"""Command line: ``python -m reuse_compiler <command>``.

    inspect MODULE:FACTORY --input-shape 128,3,32,32   print the plan and the rewritten graph
    export MODULE:FACTORY --input-shape 128,3,32,32 [--variant reuse|exact] -o model.onnx

``MODULE:FACTORY`` names a callable returning an ``nn.Module`` (e.g.
``examples.models:cifarnet`` from a source checkout, or ``reuse_compiler.models:vgg19``);
``--kwargs`` passes it keyword arguments as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys

import torch

__all__ = ["main", "load_factory", "build_parser", "CliError"]


class CliError(SystemExit):
    """A mistake in the command line or what it names: ``main`` prints it as argparse does
    (``prog: error: message``) and exits with status 2, argparse's status for usage errors."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are :class:`CliError` (same output, status 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise CliError(message)


def load_factory(spec: str):
    """Import ``module:attr`` and return the attribute (a model factory). A spec that names
    nothing importable or nothing callable raises :class:`CliError` (a ``SystemExit``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"model must be MODULE:FACTORY (e.g. examples.models:cifarnet), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"cannot import {module_name!r}: {e}") from e
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise CliError(
            f"{spec} is a {type(factory).__name__}, not a callable returning an nn.Module; "
            f"name a function or class (e.g. reuse_compiler.models:cifarnet)"
        )
    return factory


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated ints, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def _int_or_map(name: str):
    """The argparse type of ``--L``/``--H``: ``16`` or ``conv1=5,conv2=16``."""

    def parse(text: str):
        def bad():
            return argparse.ArgumentTypeError(
                f"invalid {name} value: {text!r} (an int, or name=int pairs such as conv1=5,conv2=16)"
            )

        try:
            if "=" not in text:
                return int(text)
            out = {}
            for item in text.split(","):
                layer, _, value = item.partition("=")
                if not layer.strip():
                    raise bad()
                out[layer.strip()] = int(value)
            return out
        except ValueError:
            raise bad() from None

    parse.__name__ = parse.__qualname__ = name
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODULE:FACTORY returning an nn.Module, e.g. examples.models:cifarnet")
    p.add_argument("--input-shape", type=_shape, required=True, help="example batch shape, e.g. 128,3,32,32")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the factory")
    p.add_argument("--L", type=_int_or_map("L"), default=None, help="sub-vector length: an int or name=int,...")
    p.add_argument("--H", type=_int_or_map("H"), default=None, help="hash functions: an int or name=int,...")
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
    parser = _Parser(prog="python -m reuse_compiler", description=__doc__.split("\n")[0])
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
        raise CliError(f"--kwargs is not valid JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise CliError(
            f"--kwargs must be a JSON object of keyword arguments (e.g. '{{\"width\": 0.5}}'), "
            f"got a JSON {type(kwargs).__name__}: {args.kwargs}"
        )
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise CliError(
            f"{args.model}(**{kwargs!r}) failed: {type(e).__name__}: {e} (check --kwargs against its signature)"
        ) from e
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
        raise CliError(str(e)) from e
    x = torch.randn(*args.input_shape, generator=torch.Generator().manual_seed(args.seed))
    try:
        with _held_back_tracebacks():
            gm = reuse_compile(model, x, config=config)
    except ValueError as e:
        if "example_input" in str(e):  # the model rejects the example batch: its own error, and the flag
            shape = ",".join(map(str, args.input_shape))
            root = _root_cause(e)
            what = f"{type(root).__name__}: {root}" if root is not e else str(e)
            raise CliError(
                f"running {args.model} on a random example batch of --input-shape {shape} failed: {what}\n"
                f"(give --input-shape the shape of a batch the model takes)"
            ) from e
        raise
    return gm, x


@contextlib.contextmanager
def _held_back_tracebacks():
    """torch.fx's ShapeProp prints the traceback of a node that fails on the example batch to
    stderr before it raises; the CLI reports that failure as one ``error:`` line, so printed
    tracebacks are held back here and everything else written to stderr is passed on."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        sys.stderr.write(_without_tracebacks(buf.getvalue()))


def _without_tracebacks(text: str) -> str:
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("Traceback (most recent call last):"):
            skipping = True
        elif skipping and not line[:1].isspace():
            skipping = False  # the exception's own line ends the block
        elif not skipping:
            out.append(line)
    return "".join(out)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost ``__cause__`` of ``e`` (``e`` itself if none): the model's own error, where
    the outer ones add torch.fx's node dumps."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


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

    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):  # before compiling: fail fast
        raise CliError(f"-o {args.output}: folder {folder!r} does not exist (create it or write elsewhere)")
    gm, x = compile_from_args(args)
    gm.eval()
    with torch.no_grad():
        gm(x)  # one forward first: the stage it runs at is the one exported
    try:
        result = export_onnx(gm, x, args.output, variant=args.variant, opset=args.opset)
    except (OnnxExportError, ImportError, ValueError, OSError) as e:
        raise CliError(str(e)) from e
    print(f"wrote {result.path}: {args.variant} variant of {args.model}, opset {result.opset}, dynamic batch")
    print(
        f"parity on the example batch {tuple(x.shape)}: max|onnxruntime - torch| = {result.max_abs_diff:.3g} "
        f"(output max {result.scale:.3g})"
    )
    return 0


def _package_errors() -> tuple[type[BaseException], ...]:
    """The package's own error types (imported late: export pulls in the ONNX tooling)."""
    from reuse_compiler.passes.analysis import ReuseTraceError

    from .export import OnnxExportError

    return (ReuseTraceError, OnnxExportError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a command raises for bad input (a wrong layer name, L > K, a model fx cannot
    trace, an example shape the model rejects, an unwritable file): reported as one
    ``error:`` line. Anything else is a bug and keeps its traceback."""
    return (ValueError, TypeError, KeyError, OSError, ImportError, *_package_errors())


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]  # str(KeyError) is the repr of its message
    if isinstance(e, (ValueError, KeyError, *_package_errors())):
        return str(e)  # the package's own messages name the thing and the way on
    return f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    """Run one command; bad input exits with status 2 and ``prog command: error: message``
    on stderr (raised as :class:`CliError`, a ``SystemExit``), like argparse's own errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    try:
        return {"inspect": _inspect, "export": _export}[args.command](args)
    except CliError as e:
        error = e
    except _user_errors() as e:
        error = CliError(_message(e))
        error.__cause__ = e
    print(f"{prog}: error: {error.message}", file=sys.stderr)
    raise error


if __name__ == "__main__":
    sys.exit(main())
