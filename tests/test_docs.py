"""Every docstring example in the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import reuse_compiler

MODULES = sorted(
    {m.name for m in pkgutil.walk_packages(reuse_compiler.__path__, "reuse_compiler.")}
    | {
        f"reuse_compiler.{sub}.{m.name}"
        for sub in ("passes", "runtime")
        for m in pkgutil.iter_modules(importlib.import_module(f"reuse_compiler.{sub}").__path__)
    }
    | {"reuse_compiler"}
)


def test_all_modules_listed():
    assert {"reuse_compiler.api", "reuse_compiler.runtime.ops", "reuse_compiler.passes.conv_rewrite"} <= set(MODULES)


@pytest.mark.parametrize("name", [m for m in MODULES if not m.endswith("__main__")])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
