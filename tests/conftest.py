import contextlib

import pytest
import torch

import reuse_compiler  # noqa: F401  (registers the reuse:: ops)
from reuse_compiler.runtime import extension, kernels
from reuse_compiler.runtime.ops import reuse_conv2d

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@contextlib.contextmanager
def kernel_backend(name: str):
    """Run on the C++ kernels (``"cpp"``: skipped where they are not built; a silent fallback to
    the plain-PyTorch kernels is an error) or on the plain-PyTorch kernels (``"torch"``)."""
    if name == "cpp" and extension.get() is None:
        pytest.skip("C++ kernels unavailable")
    old = extension.set_enabled(name == "cpp")
    kernels.REQUIRE_EXTENSION = name == "cpp"
    try:
        yield name
    finally:
        kernels.REQUIRE_EXTENSION = False
        extension.set_enabled(old)


def run_chain(x, w, b, *, k, s, p, d, planes, scope="batch", centroid="mean"):
    """The rewritten convolution, op by op, as the pass emits it."""
    return reuse_conv2d(x, w, b, planes, k, s, p, d, scope=scope, centroid=centroid)
