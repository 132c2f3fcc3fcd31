"""``torch.compile`` over a compiled module: Dynamo and AOTAutograd trace the rewritten graph
(the custom ops' fake-tensor kernels and autograd formulas), breaking the graph where the
clustering's output size depends on the data and where the planes are fitted, and training
goes on as in eager mode, across a stage switch too. The ``aot_eager`` backend keeps the
test fast and compiler-free; inductor was checked ad hoc (docs/architecture.md,
"torch.compile")."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reuse_compiler import ReuseConfig, reuse_compile, set_stage
from reuse_compiler.models import cifarnet


@pytest.mark.parametrize("L", [16, 8])
@pytest.mark.parametrize("norm_grad", [False, True])
def test_torch_compile_trains_as_eager(norm_grad, L):
    """L = C = 16: the per-pixel chain; L = 8: two of them, on the input's channel slices."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    cfg = ReuseConfig(policy="paper", hashing="pca", norm_grad=norm_grad)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg)
    set_stage(gm, "conv2", L=L, H=6)
    runs = {}
    for name in ("eager", "compiled"):
        m = copy.deepcopy(gm).train()
        f = torch.compile(m, backend="aot_eager") if name == "compiled" else m
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        losses = []
        for i in range(4):  # the first call fits the planes (a graph break), the others reuse them
            if i == 2:  # a stage switch regenerates the module's code: Dynamo compiles it anew
                set_stage(m, "conv2", L=L, H=8)
            loss = F.cross_entropy(f(x.roll(i, 0)), y.roll(i, 0))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs[name] = (torch.stack(losses), list(m.parameters()))
    torch.testing.assert_close(runs["compiled"][0], runs["eager"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs["eager"][1], runs["compiled"][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
