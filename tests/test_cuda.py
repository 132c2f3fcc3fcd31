"""The op chain on a CUDA device equals the same chain on the CPU (forward, input, weight
and bias gradients), for every fast-path kind, both centroids, NCHW and channels-last
inputs. Skipped without a GPU; ``benchmarks/gpu_check.sh`` runs it on a lent one."""

import pytest
import torch

from reuse_compiler import ReuseConfig, reuse_compile
from reuse_compiler.models import cifarnet
from reuse_compiler.runtime.ops import reuse_conv2d
from reuse_compiler.runtime.reference import lsh_planes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (C, L): window (L = K), chunk (L | C), row (L = m*C), general
CASES = [(4, 36), (8, 4), (4, 12), (3, 5)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("centroid", ["mean", "norm"])
@pytest.mark.parametrize("C,L", CASES)
def test_chain_on_cuda_equals_cpu(C, L, centroid, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(3, C, 9, 8, generator=g, dtype=torch.float64))
    w = torch.randn(5, C, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    planes = lsh_planes(L, 6, seed=0, dtype=torch.float64)
    out = {}
    for dev in ("cpu", "cuda"):
        xx, ww, bb = (t.to(dev).detach().requires_grad_() for t in (x, w, b))
        y, _ = reuse_conv2d(xx, ww, bb, planes.to(dev), [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], centroid=centroid)
        y.backward(torch.ones_like(y) * torch.arange(y.numel(), device=dev, dtype=y.dtype).view_as(y).sin())
        out[dev] = [t.detach().cpu() for t in (y, xx.grad, ww.grad, bb.grad)]
    for a, c in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("hashing", ["random", "pca"])
def test_compiled_model_trains_on_cuda(hashing):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    cfg = ReuseConfig(hashing=hashing, hash_refresh=2)  # pca: fits on the GPU at steps 1, 3, 5
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg).cuda()
    with pytest.warns(UserWarning, match="policy='measured'"):  # compiled on the GPU with the paper's policy
        reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25).cuda(), x.cuda(), config=cfg)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(gm(x.cuda()), y.cuda())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert gm.reuse_plan["conv2"].r_c is not None
    if hashing == "pca":
        h = gm.reuse_state.conv2.hasher
        assert h.fits == 3 and h.planes.is_cuda and torch.isfinite(h.planes).all()


def test_compiled_on_cuda_keeps_its_state_there_and_checkpoints_cross_devices(tmp_path):
    """Compiled from a CUDA model, the planes live on the GPU; the across-batch store follows
    gm.cpu()/gm.cuda(); a checkpoint saved on the GPU loads into a CPU module and back."""
    from reuse_compiler import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    cfg = ReuseConfig(scope="across-batch")
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28).cuda(), x.cuda(), config=cfg)
    assert gm.get_submodule("reuse_state.conv2.hasher").planes.is_cuda
    gm(x.cuda())  # fills the store on the GPU
    save_checkpoint(tmp_path / "gpu.pt", gm)
    cpu = reuse_compile(cifarnet(in_channels=1, image_size=28), x, config=cfg)
    load_checkpoint(tmp_path / "gpu.pt", cpu)
    assert torch.isfinite(cpu(x)).all()
    gm.cpu()
    assert torch.isfinite(gm(x)).all()  # the store moved with the inputs
    gm.cuda()
    gm.eval()
    assert torch.isfinite(gm(x.cuda())).all()


def test_measured_policy_runs_on_cuda():
    """The calibration (synchronised timings on a GPU) keeps only candidates it timed faster
    than exact, ordered by time, and the compiled module trains a step."""
    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28).cuda()
    cfg = ReuseConfig(policy="measured")
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28).cuda(), x, config=cfg)
    for row in gm.reuse_plan:
        if row.calibration is None or row.exact:
            continue
        kept = {(c["L"], c["H"]): c for c in row.calibration["candidates"]}
        times = [kept[c]["ms"] for c in row.candidates]
        assert times == sorted(times) and all(kept[c]["ratio"] <= cfg.max_time_ratio for c in row.candidates)
    gm(x).sum().backward()


@pytest.mark.parametrize("centroid,norm_grad", [("mean", True), ("norm", False), ("norm", True)])
def test_pixel_chain_on_cuda_equals_cpu(centroid, norm_grad):
    """The per-pixel chain's plain-PyTorch fallbacks on the device (the rewrite emits the chain
    only with the C++ kernels, but a model compiled on the CPU may move to the GPU): the CPU's
    values, forward and gradients, with the member norms constant or with their gradient
    (cluster_pixels_norms)."""
    g = torch.Generator().manual_seed(0)
    C = 6
    x = torch.relu(torch.randn(3, C, 9, 8, generator=g, dtype=torch.float64))
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, C, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    planes = lsh_planes(C, 6, seed=0, dtype=torch.float64)
    out = {}
    for dev in ("cpu", "cuda"):
        xx, ww, bb = (t.to(dev).detach().requires_grad_() for t in (x, w, b))
        y, parts = reuse_conv2d(
            xx,
            ww,
            bb,
            planes.to(dev),
            [3, 3],
            [1, 1],
            [1, 2, 0, 1],
            [1, 2],
            centroid=centroid,
            norm_grad=norm_grad,
            per_pixel=True,
        )
        y.backward(torch.ones_like(y) * torch.arange(y.numel(), device=dev, dtype=y.dtype).view_as(y).sin())
        out[dev] = [t.detach().cpu() for t in (y, xx.grad, ww.grad, bb.grad, parts["counts"])]
    for a, c in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-9)


def test_compiled_model_under_cuda_autocast_runs_the_chain_in_float32():
    """Mixed precision on the GPU (tests/test_autocast.py on the CPU): under bfloat16 and
    float16 autocast the rewritten layer gives its float32 results in autocast's dtype. Not bit
    for bit as on the CPU: the CUDA cluster sums are ``index_add_`` with atomics, whose order
    (so float32 rounding, and at a tie the half-precision rounding) varies from call to call."""
    from reuse_compiler import set_stage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 6, 3, padding=1)).cuda()
    x = torch.relu(torch.randn(4, 8, 7, 7, device="cuda"))
    gm = reuse_compile(model, x, config=ReuseConfig(policy="paper", hashing="pca", norm_grad=False))
    set_stage(gm, "0", L=4, H=5)
    gm.eval()
    with torch.no_grad():
        ref = gm(x)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cuda", dtype=dtype):
                y = gm(x)
            assert y.dtype == dtype
            torch.testing.assert_close(y, ref.to(dtype), rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    # and a training step under autocast: the loss backward gives float32 gradients close to
    # the float32 step's (the output rounded to half precision in between)
    gm.train()
    grads = {}
    for dtype in (None, torch.bfloat16):
        gm.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = gm(x).float().square().mean()
        loss.backward()
        grads[dtype] = [p.grad for p in gm.parameters()]
    for a, b in zip(grads[None], grads[torch.bfloat16]):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * a.abs().max().item())


def test_compiled_on_the_cpu_then_moved_to_cuda_warns():
    """Stages chosen on the CPU, run on the GPU (``gm.cuda()`` after compiling): a warning that
    names both devices and says to compile on the device the model trains on."""
    x = torch.rand(4, 1, 16, 16)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=16, width=0.25), x).cuda()
    with pytest.warns(UserWarning, match=r"stages on cpu, .* now run on cuda"):
        gm(x.cuda())
