import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import reuse_compiler  # noqa: F401  (registers the reuse:: ops)
from reuse_compiler.calibration import zero_skip_values
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


def adam_steps(model, x, y, steps: int = 2, compile: bool = False) -> list:
    """The parameters of a deep copy of ``model`` after ``steps`` Adam steps (lr 1e-3) of
    cross-entropy on (x, y), its forward under ``torch.compile`` (aot_eager) if ``compile``."""
    m = copy.deepcopy(model)
    f = torch.compile(m, backend="aot_eager") if compile else m
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(f(x), y).backward()
        opt.step()
    return list(m.parameters())


def fake_calibrate(ratio):
    """A calibration with injected timings: every candidate slower than exact, the zero-skipping
    weight gradient at ``ratio`` of exact where it is timed."""

    def fake(
        row, x, weight, bias, repeats, centroid, input_grad, seed, hashing="random", norm_grad=True, zero_skip=False
    ):
        cands = [
            {"L": L, "H": H, "ms": 20.0, "ratio": 2.0, "ratio_min": 2.0, "r_c": 0.1, "predicted": 0.5, "error": 0.3}
            for L, H in row.candidates
        ]
        skip = zero_skip_values(row, x) if zero_skip else None
        zs = None if skip is None else {"ms": 10 * ratio, "ratio": ratio, "ratio_min": ratio, "skip": skip}
        return {"exact_ms": 10.0, "input_grad": input_grad, "candidates": cands, "zero_skip": zs}

    return fake


def digits_like(n=8):
    """Inputs that are mostly one value, as normalised digits are (their blank background)."""
    x = torch.full((n, 1, 28, 28), -0.42)
    x[:, :, 8:20, 10:18] = torch.rand(n, 1, 12, 8) * 3
    return x


def run_chain(x, w, b, *, k, s, p, d, planes, scope="batch", centroid="mean"):
    """The rewritten convolution, op by op, as the pass emits it."""
    return reuse_conv2d(x, w, b, planes, k, s, p, d, scope=scope, centroid=centroid)
