import pytest
import torch

import reuse_compiler  # noqa: F401  (registers the reuse:: ops)
from reuse_compiler.runtime.ops import reuse_conv2d

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def run_chain(x, w, b, *, k, s, p, d, planes, scope="batch", centroid="mean"):
    """The rewritten convolution, op by op, as the pass emits it."""
    return reuse_conv2d(x, w, b, planes, k, s, p, d, scope=scope, centroid=centroid)
