"""The FX pass: every convolution rewritten (or listed with a reason), the module trains,
the plan is complete, stages switch without touching parameters."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reuse_compiler import ReuseConfig, reuse_compile, set_stage
from reuse_compiler.cli import main as cli_main
from reuse_compiler.models import alexnet, cifarnet, functional_net, vgg19
from reuse_compiler.runtime import kernels

REUSE_OPS = {
    torch.ops.reuse.im2col.default,
    torch.ops.reuse.lsh_hash.default,
    torch.ops.reuse.cluster.default,
    torch.ops.reuse.cluster_norms.default,  # the norm centroid's cluster (with the member norms)
    torch.ops.reuse.cluster_pixels_norms.default,  # the same, of the per-pixel chain (L = C, stride 1)
    torch.ops.reuse.unit_rows.default,  # and its unit centroids
    torch.ops.reuse.centroid_gemm.default,
    torch.ops.reuse.reconstruct.default,
}
MODELS = {
    "cifarnet-digits": (lambda: cifarnet(in_channels=1, image_size=28), (16, 1, 28, 28), 2),
    "cifarnet-rgb": (lambda: cifarnet(in_channels=3, image_size=32), (8, 3, 32, 32), 2),
    "alexnet-small": (lambda: alexnet(width=0.125, image_size=32), (4, 3, 32, 32), 5),
    "vgg19-small": (lambda: vgg19(width=0.0625, image_size=32), (4, 3, 32, 32), 16),
    "functional": (lambda: functional_net(in_channels=3), (4, 3, 16, 16), 2),
}


def _conv_nodes(gm):
    mods = dict(gm.named_modules())
    return [
        n
        for n in gm.graph.nodes
        if (n.op == "call_module" and isinstance(mods.get(n.target), nn.Conv2d))
        or (n.op == "call_function" and n.target in (torch.conv2d, F.conv2d))
    ]


def _reuse_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in REUSE_OPS]


def _chains(gm) -> int:
    """How many chains the rewrite emits: one per group, and where a per-pixel stage's L
    divides C, one per channel slice of L."""
    chains = 0
    for r in gm.reuse_plan:
        if r.exact:
            continue
        C = r.in_channels // r.groups
        pixel = kernels.use_pixel_chain(C, r.L, r.stride, r.kernel_size, "batch") and not r.generic_chain
        chains += r.groups * (C // r.L if pixel else 1)
    return chains


@pytest.mark.parametrize("name", list(MODELS))
def test_every_conv_rewritten_and_trains(name):
    factory, shape, n_convs = MODELS[name]
    model = factory()
    x = torch.randn(*shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = reuse_compile(model, x)
    assert len(gm.reuse_plan) == n_convs
    assert all(not r.exact and r.reason is None for r in gm.reuse_plan)
    assert _conv_nodes(gm) == []
    # im2col, lsh_hash, cluster_norms (cluster_pixels_norms where L = C), unit_rows,
    # centroid_gemm, reconstruct (default: norm centroid), once per chain: a per-pixel stage
    # with L dividing C runs one chain per channel slice of L
    assert len(_reuse_nodes(gm)) == 6 * _chains(gm)
    assert gm(x).shape == model(x).shape
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    w0 = [p.detach().clone() for p in gm.parameters()]
    for _ in range(2):
        loss = F.cross_entropy(gm(x), torch.randint(0, 10, (shape[0],)))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters())
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(w0, gm.parameters()))
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])
    for row in gm.reuse_plan:
        assert 0 < row.r_c <= 1 and row.flop_ratio > 0


def test_plan_fields_table_and_json():
    gm = reuse_compile(cifarnet(in_channels=3), torch.randn(128, 3, 32, 32))
    row = gm.reuse_plan["conv2"]
    assert (row.in_channels, row.out_channels, row.kernel_size, row.stride, row.padding) == (
        64,
        64,
        (5, 5),
        (1, 1),
        (2, 2, 2, 2),
    )
    assert (row.K, row.N, row.L_range, row.H_range) == (1600, 32768, (5, 40), (9, 14))
    assert row.candidates[0] == (row.L, row.H) and not row.exact and not row.cluster_reuse
    assert row.r_c is None and row.reason is None
    d = gm.reuse_plan.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert {
        "name",
        "K",
        "N",
        "L_range",
        "H_range",
        "candidates",
        "L",
        "H",
        "cluster_reuse",
        "exact",
        "reason",
        "r_c",
        "reuse_rate",
        "flop_ratio",
    } <= set(d["layers"][0])
    text = str(gm.reuse_plan)
    assert "conv1" in text and "conv2" in text and "r_c" in text
    with torch.no_grad():
        gm(torch.randn(128, 3, 32, 32))
    assert 0 < gm.reuse_plan["conv2"].r_c < 1
    assert gm.reuse_plan["conv2"].flop_ratio == pytest.approx(row.H / 64 + gm.reuse_plan["conv2"].r_c + 1 / row.L)
    with pytest.raises(KeyError, match="conv3"):
        gm.reuse_plan["conv3"]


def test_set_stage_switches_without_touching_parameters():
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=28)
    x = torch.randn(8, 1, 28, 28)
    gm = reuse_compile(model, x)
    params = list(gm.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    F.cross_entropy(gm(x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    set_stage(gm, "conv2", L=16, H=10)
    assert (gm.reuse_plan["conv2"].L, gm.reuse_plan["conv2"].H) == (16, 10)
    assert gm.reuse_plan["conv2"].stage is None or gm.reuse_plan["conv2"].candidates[gm.reuse_plan["conv2"].stage] == (
        16,
        10,
    )
    # the per-pixel chain on four channel slices of 16 (the generic chain without the C++ kernels)
    assert ("16, 10, conv2_s3_x" if _chains(gm) == 5 else "16, 10, 'batch'") in gm.code
    set_stage(gm, exact=True)
    assert all(r.exact for r in gm.reuse_plan) and _reuse_nodes(gm) == []
    assert list(gm.parameters()) == params  # same Parameter objects: the optimizer still holds them
    ref = cifarnet(in_channels=1, image_size=28)
    ref.load_state_dict({k: v for k, v in gm.state_dict().items() if not k.startswith("reuse_state")})
    torch.testing.assert_close(gm(x), ref(x))
    set_stage(gm, exact=False)
    assert len(_reuse_nodes(gm)) == 6 * _chains(gm)  # 6 ops per chain (norm centroid)
    F.cross_entropy(gm(x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()


def test_config_overrides():
    x = torch.randn(8, 3, 32, 32)
    gm = reuse_compile(cifarnet(), x, config=ReuseConfig(L=5, H={"conv2": 12}, scope="input", seed=3))
    assert [(r.L, r.H) for r in gm.reuse_plan] == [(5, gm.reuse_plan["conv1"].H_range[0]), (5, 12)]
    assert "'input'" in gm.code and "'batch'" not in gm.code
    gm2 = reuse_compile(cifarnet(), x, config=ReuseConfig(seed=4))
    assert not torch.equal(gm.reuse_state.conv2.planes, gm2.reuse_state.conv2.planes)
    gm3 = reuse_compile(cifarnet(), x, config=ReuseConfig(seed=4))
    assert torch.equal(gm3.reuse_state.conv2.planes, gm2.reuse_state.conv2.planes)  # fixed by the seed


def test_exclude_layers_and_modules():
    x = torch.randn(4, 3, 32, 32)
    gm = reuse_compile(cifarnet(), x, config=ReuseConfig(exclude=["conv1"]))
    assert gm.reuse_plan["conv1"].exact and "exclude" in gm.reuse_plan["conv1"].reason
    assert not gm.reuse_plan["conv2"].exact
    gm = reuse_compile(vgg19(width=0.0625, image_size=32), x, config=ReuseConfig(exclude=["features"]))
    rows = list(gm.reuse_plan)
    assert len(rows) == 16 and all(r.exact and "excluded" in r.reason for r in rows)
    with pytest.raises(ValueError, match="unknown"):
        reuse_compile(cifarnet(), x, config=ReuseConfig(exclude=["conv9"]))
    with pytest.raises(ValueError, match="unknown layers"):
        reuse_compile(cifarnet(), x, config=ReuseConfig(L={"conv9": 5}))


def _exact_limit_config(model, x):
    """L = K and H = 62: on Gaussian input every window is its own cluster."""
    gm0 = reuse_compile(model, x)
    return ReuseConfig(L={r.name: r.K for r in gm0.reuse_plan if r.reason is None}, H=62)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 6, 3),
        nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(8, 6, 4, padding="same"),  # even kernel: asymmetric padding
        nn.Conv2d(8, 6, 3, padding="same", dilation=2),
        nn.Conv2d(8, 6, 3, padding=1, groups=2),
        nn.Conv2d(8, 8, (3, 2), stride=(2, 1), padding=(1, 0)),
    ],
)
def test_module_equals_original_at_exact_limit(conv):
    model = nn.Sequential(conv).double()
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    gm = reuse_compile(model, x, config=_exact_limit_config(model, x))
    assert _conv_nodes(gm) == []
    torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)
    xr = x.clone().requires_grad_()
    gm(xr).sum().backward()
    xo = x.clone().requires_grad_()
    model(xo).sum().backward()
    torch.testing.assert_close(xr.grad, xo.grad, rtol=1e-10, atol=1e-10)
    for p1, p2 in zip(gm.parameters(), model.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, groups=2)])
def test_norm_centroid_module_exact_limit_and_training(conv):
    model = nn.Sequential(conv).double()
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    cfg = _exact_limit_config(model, x)
    cfg.centroid = "norm"
    gm = reuse_compile(model, x, config=cfg)
    assert "cluster_norms" in gm.code and "unit_rows" in gm.code
    torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)
    gm = reuse_compile(
        cifarnet(in_channels=1, image_size=28), torch.randn(8, 1, 28, 28), config=ReuseConfig(centroid="norm")
    )
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    loss = F.cross_entropy(gm(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_grouped_conv_is_one_chain_per_group():
    gm = reuse_compile(nn.Sequential(nn.Conv2d(8, 6, 3, groups=2)), torch.randn(2, 8, 6, 6))
    assert len(_reuse_nodes(gm)) == 12  # 6 ops per chain (norm centroid), two groups
    row = gm.reuse_plan["0"]
    assert row.groups == 2 and row.K == 4 * 9 and row.M == 3


def test_unsupported_convs_stay_exact_with_reason():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(16, 16, 3, groups=16))
    model[1] = nn.Conv2d(4, 16, 3, groups=4)
    model.append(nn.Conv2d(16, 16, 3, groups=16))
    x = torch.randn(2, 4, 10, 10)
    gm = reuse_compile(model, x)
    assert "padding_mode" in gm.reuse_plan["0"].reason and gm.reuse_plan["0"].exact
    assert gm.reuse_plan["1"].reason is None
    assert "groups=16" in gm.reuse_plan["2"].reason
    torch.testing.assert_close(gm(x).shape, model(x).shape)
    with pytest.raises(ValueError, match="padding_mode"):
        set_stage(gm, "0", exact=False)


class _Shared(nn.Module):  # one conv module called twice
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_functional_conv_rows_and_shared_module():
    gm = reuse_compile(functional_net(), torch.randn(2, 3, 16, 16))
    rows = list(gm.reuse_plan)
    assert [r.stride for r in rows] == [(2, 2), (1, 1)] and [r.bias for r in rows] == [False, True]
    assert rows[1].dilation == (2, 2)

    gm = reuse_compile(_Shared(), torch.randn(2, 4, 8, 8))
    assert gm.reuse_plan.names() == ["conv", "conv:1"]
    gm(torch.randn(2, 4, 8, 8)).sum().backward()


def test_inplace_shares_parameters():
    model = cifarnet(in_channels=1, image_size=28)
    gm = reuse_compile(model, torch.randn(2, 1, 28, 28), inplace=True)
    assert gm.conv1.weight is model.conv1.weight
    gm2 = reuse_compile(model, torch.randn(2, 1, 28, 28))
    assert gm2.conv1.weight is not model.conv1.weight


def test_gradcheck_rewritten_module_float64():
    """Whole-module float64 gradcheck: conv -> tanh -> conv (input without zeros)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = reuse_compile(model, x, config=ReuseConfig(H=6))
    names = [n for n, _ in gm.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(gm, dict(zip(names, params)), (x,))

    inputs = (x.requires_grad_(),) + tuple(p.detach().clone().requires_grad_() for p in gm.parameters())
    assert torch.autograd.gradcheck(f, inputs)


def test_cli_inspect_prints_plan_and_graph(capsys):
    assert cli_main(["inspect", "examples.models:cifarnet", "--input-shape", "16,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "conv2" in out and "L range" in out and "reuse.im2col" in out and "reuse.reconstruct" in out
    assert (
        cli_main(
            [
                "inspect",
                "reuse_compiler.models:cifarnet",
                "--input-shape",
                "4,1,28,28",
                "--kwargs",
                '{"in_channels": 1, "image_size": 28}',
                "--json",
                "--L",
                "5",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["layers"][1]["L"] == 5
    # --hashing pca: the graph asks the layer's hasher for its planes
    assert cli_main(["inspect", "examples.models:cifarnet", "--input-shape", "4,3,32,32", "--hashing", "pca"]) == 0
    assert "reuse_state.conv2.hasher(" in capsys.readouterr().out


def test_cli_inspect_measured_policy(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("REUSE_COMPILER_CACHE", str(tmp_path))
    args = ["inspect", "reuse_compiler.models:cifarnet", "--input-shape", "4,1,28,28", "--no-graph"]
    args += ["--kwargs", '{"in_channels": 1, "image_size": 28, "width": 0.25}', "--policy", "measured"]
    assert cli_main([*args, "--json", "--max-error", "5"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert all(r["calibration"] is not None for r in layers)
    with pytest.raises(SystemExit, match="max_error"):
        cli_main([*args, "--max-error", "0"])


def test_deepcopy_is_an_independent_compiled_module():
    import copy

    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    gm = reuse_compile(cifarnet(width=0.25), x)
    with torch.no_grad():
        y = gm(x)
    twin = copy.deepcopy(gm)
    assert [(r.name, r.L, r.H, r.exact) for r in twin.reuse_plan] == [
        (r.name, r.L, r.H, r.exact) for r in gm.reuse_plan
    ]
    assert twin.reuse_config == gm.reuse_config
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y)
    # the copy's plan reads the copy's runtime state, and its stages and weights are its own
    assert twin.reuse_plan["conv1"].r_c is not None
    set_stage(twin, "conv1", exact=True)
    assert twin.reuse_plan["conv1"].exact and not gm.reuse_plan["conv1"].exact
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
        torch.testing.assert_close(gm(x), y)
    assert copy.deepcopy(twin).reuse_plan["conv1"].exact  # a copy of a copy


@pytest.mark.parametrize("L", [4, 12])  # a pixel's channel chunk; a kernel row
@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_grad_false_is_the_reference_with_constant_norms(L, channels_last):
    """ReuseConfig(norm_grad=False): the same forward as the norm centroid's; the backward of
    the reference with ||x_n|| detached; the weight gradient equal to norm_grad=True's."""
    from reuse_compiler.runtime.reference import reference_reuse_conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64).relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    grads = {}
    for norm_grad in (True, False):
        gm = reuse_compile(nn.Sequential(conv), x, config=ReuseConfig(L=L, H=5, norm_grad=norm_grad))
        # with their gradient the clustering op returns the norms (cluster_norms, or
        # cluster_pixels_norms at L = 4 = C with the C++ kernels), else member_norms of the
        # detached input
        targets = {str(n.target) for n in gm.graph.nodes}
        assert bool(targets & {"reuse.cluster_norms.default", "reuse.cluster_pixels_norms.default"}) == norm_grad
        assert ("reuse.member_norms.default" in targets) != norm_grad
        xr = x.clone().requires_grad_()
        y = gm(xr)
        (y * g).sum().backward()
        c = gm.get_submodule("0")  # the compiled module's own copy of the conv
        grads[norm_grad] = (y.detach(), xr.grad, c.weight.grad, c.bias.grad)
        planes = gm.reuse_state.get_submodule("0").planes.double()
        xf = x.clone().requires_grad_()
        y_ref, _ = reference_reuse_conv2d(
            xf, conv.weight, conv.bias, padding=(1, 1, 1, 1), L=L, planes=planes, centroid="norm", norm_grad=norm_grad
        )
        (y_ref * g).sum().backward()
        for got, want in zip(grads[norm_grad], (y_ref.detach(), xf.grad, conv.weight.grad, conv.bias.grad)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        conv.zero_grad()
    torch.testing.assert_close(grads[False][0], grads[True][0], rtol=0, atol=0)  # the same forward
    torch.testing.assert_close(grads[False][2], grads[True][2], rtol=1e-12, atol=1e-12)  # the same weight gradient
    assert not torch.allclose(grads[False][1], grads[True][1])  # the input gradient loses the norms' share


def test_norm_grad_false_needs_the_norm_centroid():
    with pytest.raises(ValueError, match="norm_grad=False applies to the norm centroid"):
        ReuseConfig(centroid="mean", norm_grad=False)
    with pytest.raises(ValueError, match="norm_grad must be True or False"):
        ReuseConfig(norm_grad=0)


@pytest.mark.parametrize("hashing,norm_grad", [("random", True), ("pca", True), ("pca", False)])
def test_whole_module_pickles_and_goes_on_training(tmp_path, hashing, norm_grad):
    """torch.save(gm) / torch.load(weights_only=False): the same outputs and plan, and a
    compiled module still (its stages change, it trains, copies and pickles again). With the
    norms constant (the main job's config) the graph detaches the input for them: as a method
    call, which the loaded module's code can import (a function node could not, until session 24)."""
    import copy
    import pickle

    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    cfg = ReuseConfig(hashing=hashing, norm_grad=norm_grad)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), x, config=cfg)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(2):  # runtime state to carry: the last counts and, with pca, the fitted planes
        F.cross_entropy(gm(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.save(gm, tmp_path / "gm.pt")
    gm2 = torch.load(tmp_path / "gm.pt", weights_only=False)
    assert type(gm2) is not type(gm) and gm2.reuse_config == gm.reuse_config
    for m in (gm, gm2):
        m.train()
    out, out2 = gm(x), gm2(x)  # training forwards: the training planes, no refit yet
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert str(gm2.reuse_plan) == str(gm.reuse_plan)  # measured columns from each module's own state
    for m in (gm, gm2):
        set_stage(m, "conv2", exact=True)  # regenerated from the traced source graph
    torch.testing.assert_close(gm2(x), gm(x), rtol=0, atol=0)
    F.cross_entropy(gm2(x), y).backward()
    assert gm2.conv1.weight.grad is not None and gm2.conv2.weight.grad is not None
    gm3 = pickle.loads(pickle.dumps(copy.deepcopy(gm2)))
    assert gm3.reuse_plan["conv2"].exact and gm3.reuse_plan._measure is not None
    torch.testing.assert_close(gm3(x), gm2(x), rtol=0, atol=0)


def test_a_module_called_twice_is_configured_by_its_name():
    """exclude / L / H given for module ``conv`` apply to both of its calls (rows conv,
    conv:1); a value for ``conv:1`` itself wins over the module's."""
    x = torch.randn(2, 4, 8, 8)
    gm = reuse_compile(_Shared(), x, config=ReuseConfig(exclude=["conv"]))
    assert [(r.name, r.exact) for r in gm.reuse_plan] == [("conv", True), ("conv:1", True)]
    gm = reuse_compile(_Shared(), x, config=ReuseConfig(L={"conv": 3}, H={"conv": 4, "conv:1": 5}))
    assert [(r.name, r.L, r.H) for r in gm.reuse_plan] == [("conv", 3, 4), ("conv:1", 3, 5)]


class _MyConv(nn.Conv2d):
    pass


class _Standardised(nn.Conv2d):
    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _MyConv(3, 8, 3, padding=1)
        self.body = _Standardised(8, 8, 3, padding=1)

    def forward(self, x):
        return self.body(self.stem(x))


def test_conv2d_subclasses_are_rows_named_after_their_module():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _SubclassNet()
    gm = reuse_compile(model, x, config=ReuseConfig(L={"stem": 3}))
    rows = {r.name: r for r in gm.reuse_plan}
    assert set(rows) == {"stem", "body"} and rows["stem"].L == 3
    assert not rows["stem"].exact
    # body's own forward runs as traced: its F.conv2d on the standardised weight is the site
    set_stage(gm, "stem", exact=True)
    gm_exact = reuse_compile(model, x, config=ReuseConfig(exclude=["stem", "body"]))
    assert [(r.name, r.exact, r.reason) for r in gm_exact.reuse_plan] == [
        ("stem", True, "excluded by ReuseConfig.exclude"),
        ("body", True, "excluded by ReuseConfig.exclude"),
    ]
    torch.testing.assert_close(gm_exact(x), model(x))


def test_compiling_a_compiled_module_is_refused():
    x = torch.randn(2, 4, 8, 8)
    gm = reuse_compile(_Shared(), x)
    with pytest.raises(TypeError, match="already compiled.*set_stage"):
        reuse_compile(gm, x)


def test_input_scope_takes_h_range_from_one_image():
    """Policy 2's N is the rows of the set being clustered: one image's with scope "input"."""
    from reuse_compiler import policies

    x = torch.randn(16, 1, 16, 16)
    model = cifarnet(in_channels=1, image_size=16)
    per_batch = reuse_compile(model, x).reuse_plan["conv1"]
    per_image = reuse_compile(model, x, config=ReuseConfig(scope="input")).reuse_plan["conv1"]
    assert per_batch.N == per_image.N == 16 * 16 * 16
    assert per_batch.H_range == policies.h_range(16 * 16 * 16)
    assert per_image.H_range == policies.h_range(16 * 16) != per_batch.H_range


def test_a_bad_example_batch_names_the_models_own_error():
    with pytest.raises(ValueError, match=r"failed: RuntimeError: Given groups=1.*to have 1 channels") as e:
        reuse_compile(cifarnet(in_channels=1, image_size=16), torch.randn(2, 3, 16, 16))
    assert "ShapeProp" not in str(e.value)


class _SubClash(nn.Module):  # an F.conv2d node named 'conv2d', then a Conv2d subclass at attribute 'conv2d'
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.conv2d = _MyConv(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2d(F.conv2d(x, self.w, None, 1, 1))


class _TiedOutside(nn.Module):  # an F.conv2d on the weight of a conv inside an excluded block
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        return F.conv2d(self.block(self.stem(x)), self.block[0].weight, None, 1, 1)


@pytest.mark.parametrize("model,config", [(_SubClash, ReuseConfig()), (_TiedOutside, ReuseConfig(exclude=["block"]))])
def test_every_conv_gets_its_own_row(model, config):
    """Row names never collide (a collision dropped a conv from the plan, and it ran exact)."""
    x = torch.randn(2, 3, 8, 8)
    gm = reuse_compile(model(), x, config=config)
    names = [r.name for r in gm.reuse_plan]
    assert len(names) == len(set(names))
    traced = [r for r in gm.reuse_plan if r.node]  # rows of traced convs (not inside excluded modules)
    assert len(traced) == 2 and all(not r.exact for r in traced)
    assert not [n for n in gm.graph.nodes if n.target in (F.conv2d, torch.conv2d)]  # all rewritten


def test_the_input_check_survives_dead_code_elimination():
    gm = reuse_compile(_Shared(), torch.randn(2, 4, 8, 8))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    with pytest.raises(ValueError, match="to have 4 channels"):
        gm(torch.randn(2, 5, 8, 8))


def test_paper_policy_on_a_gpu_warns_with_the_way_on():
    """Compiled on CUDA with the paper's FLOP model and a reused layer: a warning naming the
    layers and the measured policy; none on the CPU, with the measured policy, or all exact."""
    from reuse_compiler.api import _warn_paper_policy_on_gpu

    x = torch.randn(8, 1, 28, 28)
    rows = reuse_compile(cifarnet(in_channels=1, image_size=28), x).reuse_plan.rows()
    cuda = torch.device("cuda", 0)
    with pytest.warns(UserWarning, match=r"reuses conv1, conv2 .*ReuseConfig\(policy='measured'\)"):
        _warn_paper_policy_on_gpu(cuda, rows, ReuseConfig())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_paper_policy_on_gpu(torch.device("cpu"), rows, ReuseConfig())
        _warn_paper_policy_on_gpu(cuda, rows, ReuseConfig(policy="measured"))
        exact = reuse_compile(cifarnet(in_channels=1, image_size=28), x, config=ReuseConfig(exclude=["conv1", "conv2"]))
        _warn_paper_policy_on_gpu(cuda, exact.reuse_plan.rows(), ReuseConfig())


def _random_conv(rng):
    """A random Conv2d and a matching (ReLU'd) input, with the configurations users write:
    non-square kernels, strides, dilations, int/tuple/'same'/'valid' padding, groups, bias,
    float32/float64, NCHW or channels-last, batches of 1-3."""
    groups = rng.choice([1, 1, 1, 2, 4])
    cin, cout = groups * rng.randint(1, 6), groups * rng.randint(1, 5)
    kh, kw = rng.randint(1, 5), rng.randint(1, 5)
    stride, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(1, 2), rng.randint(1, 2))
    padding = rng.choice([rng.randint(0, 2), (rng.randint(0, 2), rng.randint(0, 2)), "same", "valid"])
    if padding == "same":
        stride = (1, 1)
    dtype = rng.choice([torch.float32, torch.float64])
    conv = nn.Conv2d(cin, cout, (kh, kw), stride, padding, dilation, groups, bias=rng.random() < 0.5).to(dtype)
    shape = (rng.randint(1, 3), cin, rng.randint(kh * dilation[0] + 1, 12), rng.randint(kw * dilation[1] + 1, 12))
    x = torch.relu(torch.randn(shape, dtype=dtype))
    return conv, x.contiguous(memory_format=torch.channels_last) if rng.random() < 0.5 else x


def test_random_conv_configurations_compile_train_and_stay_finite():
    """A seeded sweep of 40 random convolutions and configs (session 20): every one compiles,
    runs its first stages forward and backward with finite values and gradients of the right
    shapes; unpadded float64 ones with K >= 6 equal the original at the exact limit (L = K,
    62 hash bits: on Gaussian input every window is its own cluster; windows of padding zeros
    or of very few entries may share a direction, so those are left out)."""
    import random

    rng = random.Random(0)
    exact_checked = 0
    for trial in range(40):
        torch.manual_seed(trial)
        conv, x = _random_conv(rng)
        cfg = dict(centroid=rng.choice(["mean", "norm"]), hashing=rng.choice(["random", "pca"]), seed=trial)
        cfg["scope"] = rng.choice(["batch", "input"])
        model = nn.Sequential(conv)
        gm = reuse_compile(model, x, config=ReuseConfig(**cfg))
        row = gm.reuse_plan["0"]
        for L, H in [(row.L, row.H), *(row.candidates or [])[:3]] if row.reason is None else []:
            set_stage(gm, "0", L=L, H=H)
            xr = x.clone().requires_grad_()
            y = gm(xr)
            assert y.shape == model(x).shape, conv
            (y * torch.randn_like(y)).sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(xr.grad).all() and xr.grad.shape == x.shape, conv
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters()), conv
            gm.zero_grad()
        unpadded = conv.padding == "valid" or set(conv.padding) == {0}
        if row.reason is None and x.dtype == torch.float64 and unpadded and row.K >= 6:
            xg = torch.randn_like(x)
            exact = ReuseConfig(**{**cfg, "hashing": "random", "scope": "batch"}, L={"0": row.K}, H={"0": 62})
            torch.testing.assert_close(reuse_compile(model, xg, config=exact)(xg), model(xg), rtol=1e-8, atol=1e-8)
            exact_checked += 1
    assert exact_checked >= 3
