import pytest
import torch

import reuse_compiler  # noqa: F401  (registers the reuse:: ops)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def run_chain(x, w, b, *, k, s, p, d, planes, scope="batch", centroid="mean"):
    """The rewritten convolution, op by op, as the pass emits it."""
    ops = torch.ops.reuse
    L, H = planes.shape
    xp = ops.im2col(x, list(k), list(s), list(p), list(d))
    ids = ops.lsh_hash(xp, planes, list(k), list(s), list(d))
    cent, inv, cnt = ops.cluster(xp, ids, list(k), list(s), list(d), L, H, scope)
    if centroid == "norm":
        norms = ops.member_norms(xp, list(k), list(s), list(d), L)
        yc = ops.centroid_gemm(torch.nn.functional.normalize(cent, dim=-1), w)
        y = ops.reconstruct(yc, inv, b, norms)
    else:
        yc = ops.centroid_gemm(cent, w)
        y = ops.reconstruct(yc, inv, b)
    return y, {"xp": xp, "ids": ids, "centroids": cent, "inverse": inv, "counts": cnt, "yc": yc}
