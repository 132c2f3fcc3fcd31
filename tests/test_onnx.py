"""ONNX export: onnxruntime (CPU provider) computes what the compiled module computes.

Parity is checked on every rewritten layer, not only on the logits: the exported test
graphs also return each layer's hash ids and convolution output. The ids must be equal
(then the clusters are), and every float output must agree to 1e-4 of its largest
magnitude. A projection within an ulp of zero can flip a hash bit between PyTorch and
onnxruntime (they sum in different orders); such an input is skipped for the next seed,
and each batch size must pass on one of a few seeds.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import reuse_compiler
from reuse_compiler import ReuseConfig, reuse_compile, set_stage
from reuse_compiler import export as onnx_export
from reuse_compiler.export import VARIANTS, OnnxExportError, export_module, export_onnx, ort_providers, ort_session
from reuse_compiler.models import alexnet, cifarnet, functional_net, vgg19

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

ops = torch.ops.reuse
CPU = ["CPUExecutionProvider"]
EXPORT_BATCH, OTHER_BATCH = 4, 7

MODELS = {
    "cifarnet_gray28": (lambda: cifarnet(in_channels=1, image_size=28), (1, 28, 28)),
    "cifarnet_rgb32": (lambda: cifarnet(), (3, 32, 32)),
    "alexnet": (lambda: alexnet(width=0.125, image_size=32), (3, 32, 32)),
    "vgg19": (lambda: vgg19(width=0.0625, image_size=32), (3, 32, 32)),
    "functional": (lambda: functional_net(), (3, 32, 32)),
}


def batch(shape, B, seed):
    return torch.randn(B, *shape, generator=torch.Generator().manual_seed(1000 * B + seed))


def compiled(name, config=None):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    gm = reuse_compile(factory(), batch(shape, EXPORT_BATCH, 0), config=config)
    return gm.eval(), shape


def probed(gm, variant):
    """export_module(gm, variant) that also returns, per rewritten layer, its hash ids and its
    convolution output ("exact": every convolution's output). Outputs are cloned where they
    are made, so an in-place ReLU after them does not change what is returned."""
    m = export_module(gm, variant)
    g = m.graph
    if variant == "reuse":
        picked = [n for n in g.nodes if n.target in (ops.lsh_hash.default, ops.reconstruct.default)]
    else:
        convs = {r.node for r in gm.reuse_plan if r.node}
        picked = [n for n in g.nodes if n.name in convs]
    extra = []
    for n in picked:
        with g.inserting_after(n):
            extra.append(g.call_function(torch.clone, (n,)))
    out = next(n for n in g.nodes if n.op == "output")
    out.args = ((out.args[0], *extra),)
    g.lint()
    m.recompile()
    return m


def assert_parity(gm, shape, tmp_path, variant="reuse", batches=(EXPORT_BATCH, OTHER_BATCH), seeds=4):
    """Export the probed module (dynamic batch) and compare onnxruntime with PyTorch."""
    m = probed(gm, variant).eval()
    path = str(tmp_path / f"{variant}.onnx")
    with torch.no_grad():
        onnx_export._export(m, batch(shape, EXPORT_BATCH, 0), path, optimize=False)
    sess = ort_session(path, providers=CPU)
    report = []
    for B in batches:
        for seed in range(seeds):
            x = batch(shape, B, seed)
            with torch.no_grad():
                refs = [t.numpy() for t in m(x)]
            gots = sess.run(None, {"x": x.numpy()})
            assert len(refs) > 1 and [g.shape for g in gots] == [r.shape for r in refs]
            flips = sum(int((g != r).sum()) for g, r in zip(gots, refs) if r.dtype == np.int64)
            if flips:  # a hash bit decided by rounding: another input
                report.append(f"B={B} seed={seed}: {flips} ids differ")
                continue
            for i, (g, r) in enumerate(zip(gots, refs)):
                scale = max(float(np.abs(r).max()), 1e-6)
                err = float(np.abs(g - r).max())
                assert err <= 1e-4 * scale, f"output {i} at B={B}: max|ort - torch| = {err:.3g}, scale {scale:.3g}"
            break
        else:
            pytest.fail(f"hash ids differed on every seed: {report}")
    return sess, path


def op_types(path):
    import onnx

    return {n.op_type for n in onnx.load(path).graph.node}


@pytest.mark.parametrize("name", list(MODELS))
def test_reuse_variant_matches_module(name, tmp_path):
    gm, shape = compiled(name)
    assert any(not r.exact for r in gm.reuse_plan)
    assert_parity(gm, shape, tmp_path)


@pytest.mark.parametrize("name", ["cifarnet_rgb32", "alexnet", "functional"])
def test_exact_variant_matches_module(name, tmp_path):
    gm, shape = compiled(name)
    assert_parity(gm, shape, tmp_path, variant="exact")


def test_export_onnx_defaults(tmp_path):
    """The public call: optimizer on, checker, parity on the example input, dynamic batch; a
    module that never ran runs once first (its stage is then in use)."""
    import onnx

    gm, shape = compiled("cifarnet_gray28")
    assert not gm.reuse_state.conv1.last_counts
    x = batch(shape, EXPORT_BATCH, 0)
    result = export_onnx(gm, x, tmp_path / "m.onnx")
    assert gm.reuse_state.conv1.last_counts and gm.training is False
    assert str(result) == str(tmp_path / "m.onnx") and result.variant == "reuse" and result.opset == 18
    assert result.max_abs_diff <= 1e-4 * result.scale
    model = onnx.load(result.path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and not model.functions
    assert "ScatterElements" in {n.op_type for n in model.graph.node}
    sess = ort_session(result, providers=CPU)
    module = export_module(gm).eval()
    for B in (1, 9):
        xb = batch(shape, B, 3)
        with torch.no_grad():
            ref = module(xb).numpy()
        got = sess.run(None, {"x": xb.numpy()})[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_of_one_example(variant, tmp_path):
    """A batch-1 example exports (torch.export would specialise the batch to 1; it is traced
    at batch 2) with a dynamic batch axis, the parity check runs on the batch-1 example, and
    the file runs batches 1 and 3 like the module. The module is compiled on batch 1 too."""
    import onnx

    factory, shape = MODELS["cifarnet_gray28"]
    torch.manual_seed(0)
    gm = reuse_compile(factory(), batch(shape, 1, 0)).eval()
    result = export_onnx(gm, batch(shape, 1, 1), tmp_path / "m.onnx", variant=variant, optimize=False)
    assert result.max_abs_diff <= 1e-4 * result.scale
    model = onnx.load(result.path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort_session(result, providers=CPU)
    module = export_module(gm, variant).eval()
    for B in (1, 3):
        xb = batch(shape, B, 2)
        with torch.no_grad():
            ref = module(xb).numpy()
        got = sess.run(None, {"x": xb.numpy()})[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_empty_example_is_refused(tmp_path):
    gm, shape = compiled("functional")
    with pytest.raises(ValueError, match="at least one image"):
        export_onnx(gm, batch(shape, 0, 0), tmp_path / "m.onnx", check=False)


@pytest.mark.parametrize("scope", ["batch", "input"])
def test_empty_batch(scope, tmp_path):
    """An empty batch gives empty outputs of the module's shapes (ids and layer outputs too):
    scope "batch" ranks with the counting table (a Reshape to Shape(ids) holding a 0 needs
    allowzero), scope "input" divides the Unique keys by Nb * 2**H = 0."""
    gm, shape = compiled("cifarnet_gray28", ReuseConfig(scope=scope))
    sess, _ = assert_parity(gm, shape, tmp_path, batches=(2,), seeds=4)
    m = probed(gm, "reuse").eval()
    x = batch(shape, 0, 0)
    with torch.no_grad():
        refs = [t.numpy() for t in m(x)]
    gots = sess.run(None, {"x": x.numpy()})
    assert [g.shape for g in gots] == [r.shape for r in refs] and refs[0].shape == (0, 10)


def test_training_mode_is_restored(tmp_path):
    gm, shape = compiled("functional")
    gm.train()
    export_onnx(gm, batch(shape, 2, 0), tmp_path / "m.onnx", variant="exact", check=False, optimize=False)
    assert all(m.training for m in gm.modules())


def test_scope_input(tmp_path):
    """Clusters never mix images: Unique over (block * Nb + image) * 2**H + id keys; conv1 at
    L = K (window blocks, hashed by one Conv); conv2 at H = 40 ((block, image, id) columns
    for Unique, ids over 24 bits)."""
    gm, shape = compiled("cifarnet_gray28", ReuseConfig(scope="input"))
    set_stage(gm, "conv1", L=25)
    set_stage(gm, "conv2", H=40)
    _, path = assert_parity(gm, shape, tmp_path, batches=(EXPORT_BATCH, 2))
    assert {"Unique", "Conv"} <= op_types(path)


def test_norm_centroid(tmp_path):
    """centroid="norm": member norms and scaled reconstruction as ONNX ops."""
    gm, shape = compiled("cifarnet_gray28", ReuseConfig(centroid="norm"))
    _, path = assert_parity(gm, shape, tmp_path, batches=(EXPORT_BATCH, 2))
    assert "Sqrt" in op_types(path)


def test_stage_changed_with_set_stage(tmp_path):
    """The stage at export time is what runs: conv1 back to exact, conv2 at L = 16, H = 24
    (past the counting table: Unique over offset keys; sums over the im2col rows)."""
    gm, shape = compiled("cifarnet_gray28")
    set_stage(gm, "conv1", exact=True)
    set_stage(gm, "conv2", L=16, H=24)
    sess, _ = assert_parity(gm, shape, tmp_path, batches=(EXPORT_BATCH, 2))
    outs = sess.get_outputs()
    assert len(outs) == 3  # logits, conv2's ids and output; conv1 is exact
    assert outs[1].shape[0] == 64 * 25 // 16  # nb blocks of L = 16


def test_geometries(tmp_path):
    """Stride 2 with L = 9 = 3 pixels of a kernel row and H = 62 (ids packed in int64, Unique
    over (block, id) columns); dilation 2 with chunk blocks (L = 16 divides C: window sums)."""
    gm, shape = compiled("functional")
    set_stage(gm, "conv2d", L=9, H=62)
    set_stage(gm, "conv2d_1", L=16)
    assert_parity(gm, shape, tmp_path, batches=(EXPORT_BATCH, 3))


def test_cluster_reuse_is_refused(tmp_path):
    gm, shape = compiled("cifarnet_gray28")
    gm.reuse_plan["conv2"].cluster_reuse = True
    with pytest.raises(OnnxExportError, match=r"conv2.*set_stage\(gm, 'conv2', cluster_reuse=False\)"):
        export_onnx(gm, batch(shape, 2, 0), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    export_module(gm, "exact")  # the exact variant has no store


def test_bad_arguments(tmp_path):
    gm, shape = compiled("functional")
    x = batch(shape, 2, 0)
    with pytest.raises(ValueError, match="variant must be one of"):
        export_onnx(gm, x, tmp_path / "m.onnx", variant="fast")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(gm, x, tmp_path / "m.onnx", opset=13)
    with pytest.raises(TypeError, match="float32"):
        export_onnx(gm, x.double(), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="reuse_compile"):
        export_onnx(functional_net(), x, tmp_path / "m.onnx")


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_extra_names_the_package(package, monkeypatch, tmp_path):
    gm, shape = compiled("functional")
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    with pytest.raises(ImportError, match=rf"'{package}'.*reuse-compiler\[onnx\]"):
        export_onnx(gm, batch(shape, 2, 0), tmp_path / "m.onnx")


def test_missing_reuse_translation(monkeypatch, tmp_path):
    gm, shape = compiled("functional")
    full = onnx_export.onnx_translation_table

    def without_cluster():
        table = full()
        del table[ops.cluster_norms.default]  # the default (norm) centroid's cluster op
        return table

    monkeypatch.setattr(onnx_export, "onnx_translation_table", without_cluster)
    with pytest.raises(OnnxExportError, match=r"no ONNX translation for reuse\.cluster_norms\.default"):
        export_onnx(gm, batch(shape, 2, 0), tmp_path / "m.onnx", check=False)


@torch.library.custom_op("reuse_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.ops.reuse_test.mystery(self.conv(x))


def test_op_without_translation_is_named(tmp_path):
    """An op of the user's own: the error names it; a translation passed in exports it."""
    from onnxscript import opset18 as op

    x = torch.randn(2, 3, 8, 8)
    gm = reuse_compile(Mystery(), x)
    with pytest.raises(OnnxExportError, match=r"reuse_test\.mystery\.default.*no ONNX translation.*translations="):
        export_onnx(gm, x, tmp_path / "m.onnx", check=False, optimize=False)

    def onnx_mystery(x):
        return op.Add(x, x)

    table = {torch.ops.reuse_test.mystery.default: onnx_mystery}
    result = export_onnx(gm, x, tmp_path / "m.onnx", optimize=False, translations=table)
    assert result.max_abs_diff <= 1e-4 * result.scale


def test_providers(monkeypatch):
    assert ort_providers()[-1] == "CPUExecutionProvider"
    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert ort_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(prefer_gpu=False) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("input_shape", ["2,3,16,16", "1,3,16,16"])
def test_cli_export(input_shape, tmp_path, capsys):
    from reuse_compiler.cli import main

    out = tmp_path / "f.onnx"
    args = ["export", "reuse_compiler.models:functional_net", "--input-shape", input_shape, "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "max|onnxruntime - torch|" in text and out.exists()


def test_public_api():
    assert reuse_compiler.export_onnx is export_onnx
    assert "export_onnx" in reuse_compiler.__all__
