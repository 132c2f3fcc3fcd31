"""Mixed precision: a compiled model under ``torch.autocast`` (bfloat16 on the CPU). Stock
convolutions run in bfloat16 there; the reuse chain runs in float32 (its C++ kernels are
float32/64, and its clustering sums would lose most of their bits in bfloat16), so a
rewritten layer under autocast gives what it gives without autocast on the same input cast
to float32, rounded to bfloat16 as a stock convolution's output is there, and its gradients
flow back in the input's dtype."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reuse_compiler import ReuseConfig, reuse_compile, set_stage
from reuse_compiler.models import cifarnet
from reuse_compiler.runtime import extension

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)

# (name, config, stage of the conv (L, H)): the per-pixel chain (L = C) where the C++ kernels
# are there, the generic chain, the mean centroid, the norms' gradient, the across-batch store
CASES = [
    ("per-pixel, norms constant", dict(centroid="norm", norm_grad=False, hashing="pca"), (8, 5)),
    ("per-pixel, norms' gradient", dict(centroid="norm", norm_grad=True, hashing="pca"), (8, 5)),
    ("generic, norms constant", dict(centroid="norm", norm_grad=False), (4, 5)),
    ("generic, mean centroid", dict(centroid="mean"), (4, 5)),
    ("across-batch store", dict(centroid="mean", scope="across-batch"), (4, 5)),
]


def _conv_model(config, stage):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1)).to(memory_format=torch.channels_last)
    x = torch.relu(torch.randn(4, 8, 7, 7)).contiguous(memory_format=torch.channels_last)
    gm = reuse_compile(model, x, config=ReuseConfig(policy="paper", **config))
    set_stage(gm, "0", L=stage[0], H=stage[1])
    return gm, x


def _run(gm, x, autocast: bool):
    """Forward and backward (a fixed output gradient); (y, x.grad, weight.grad, bias.grad)."""
    gm = copy.deepcopy(gm)
    xx = x.detach().clone().requires_grad_()
    with torch.autocast(**BF16, enabled=autocast):
        y = gm(xx)
    # bfloat16 values, so the output gradient is the same whether y is float32 or bfloat16
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(y.dtype)
    y.backward(gy)
    conv = gm.get_submodule("0")
    return y.detach(), xx.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize("name,config,stage", CASES, ids=[c[0] for c in CASES])
def test_chain_under_autocast_runs_in_float32(name, config, stage):
    """A float32 input: under autocast the chain gives its float32 results bit for bit (the
    hash planes' fit, the store's refresh and every op inside the chain stay float32), the
    output rounded to bfloat16 (as F.conv2d's is there). A bfloat16 input: the results of its
    float32 copy, and the input's gradient in bfloat16."""
    gm, x = _conv_model(config, stage)
    plain = _run(gm, x, autocast=False)
    auto = _run(gm, x, autocast=True)
    assert plain[0].dtype == torch.float32 and auto[0].dtype == torch.bfloat16
    assert torch.equal(auto[0], plain[0].to(torch.bfloat16))
    for name_, u, v in zip(("x.grad", "w.grad", "b.grad"), plain[1:], auto[1:]):
        assert torch.equal(u, v), name_
    xb = x.to(torch.bfloat16)
    ref = _run(gm, xb.float(), autocast=False)
    got = _run(gm, xb, autocast=True)
    assert got[1].dtype == torch.bfloat16
    assert torch.equal(got[0], ref[0].to(torch.bfloat16))
    assert torch.equal(got[1], ref[1].to(torch.bfloat16))
    assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])


def test_pixel_chain_case_takes_the_pixel_chain():
    """The first cases above do test the per-pixel chain (where the C++ kernels are built)."""
    if extension.get() is None:
        pytest.skip("the rewrite emits the per-pixel chain only with the C++ kernels")
    gm, _ = _conv_model(CASES[0][1], CASES[0][2])
    assert "reuse.cluster_pixels.default" in [str(n.target) for n in gm.graph.nodes]


def test_compiled_cifarnet_trains_under_autocast():
    """The main job's model and config under bfloat16 autocast: conv1 (exact) runs in
    bfloat16 as stock does, conv2's chain in float32; three Adam steps give finite float32
    gradients and change every parameter."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    model = cifarnet(in_channels=1, image_size=28).to(memory_format=torch.channels_last)
    cfg = ReuseConfig(policy="paper", centroid="norm", norm_grad=False, hashing="pca")
    gm = reuse_compile(model, x, config=cfg)
    set_stage(gm, "conv1", exact=True)
    set_stage(gm, "conv2", L=64, H=8)
    before = {k: v.detach().clone() for k, v in gm.named_parameters()}
    opt = torch.optim.Adam(gm.parameters(), 1e-3)
    for _ in range(3):
        with torch.autocast(**BF16):
            loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        for k, p in gm.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), k
        opt.step()
    assert torch.isfinite(loss)
    for k, p in gm.named_parameters():
        assert not torch.equal(p, before[k]), k


def test_pickled_module_keeps_the_float32_chain():
    """torch.save / torch.load of the whole module re-traces its code: the chain's input and
    output casts are one call each again, and the loaded module gives the same outputs under
    autocast."""
    import pickle

    gm, x = _conv_model(CASES[2][1], CASES[2][2])
    gm2 = pickle.loads(pickle.dumps(gm))
    xb = x.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast(**BF16):
        y, y2 = gm(xb), gm2(xb)
    assert y.dtype == y2.dtype == torch.bfloat16 and torch.equal(y, y2)
    names = [n.target.__name__ for n in gm2.graph.nodes if n.op == "call_function"]
    assert names.count("chain_input") == names.count("chain_output") == 1
