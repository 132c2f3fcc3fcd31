"""SPEC section 6 for the user-facing edges: the CLI reports bad input as one ``error:`` line
(exit status 2, no traceback), checkpoints go to file objects as well as paths and survive a
machine whose measured calibration differs, and ReuseConfig names the field it refuses."""

import io
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F

import reuse_compiler.calibration as cal
from reuse_compiler import AdaptiveReuse, ReuseConfig, load_checkpoint, reuse_compile, save_checkpoint
from reuse_compiler.cli import CliError, main
from reuse_compiler.models import cifarnet

# ---------------------------------------------------------------------------------------- CLI

MODEL = "reuse_compiler.models:cifarnet"
TINY = ["--kwargs", '{"in_channels": 1, "image_size": 16, "width": 0.25}', "--input-shape", "2,1,16,16"]


def _cli_error(capsys, argv) -> str:
    """Run the CLI, expect argparse's exit status 2 and one error line (no traceback)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err
    return err


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--L", "conv9=5"], "ReuseConfig.L names unknown layers ['conv9']"),
        (["--L", "30"], "L for layer 'conv1' must be an int in [1, K=25]; got 30"),
        (["--exclude", "conv9"], "ReuseConfig.exclude names unknown layers or modules ['conv9']"),
        (["--L", "0"], "ReuseConfig.L must be None"),
        (["--scope", "global"], "ReuseConfig.scope must be one of"),
        (["--L", "abc"], "argument --L: invalid L value: 'abc' (an int, or name=int pairs"),
        (["--H", "conv1="], "argument --H: invalid H value: 'conv1='"),
        (["--H", "=4"], "argument --H: invalid H value: '=4'"),
    ],
)
def test_cli_reports_bad_options(capsys, extra, expected):
    err = _cli_error(capsys, ["inspect", MODEL, *TINY, "--no-graph", *extra])
    assert "python -m reuse_compiler inspect: error: " in err and expected in err
    assert "_int_or_map" not in err


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ('{"nope": 1}', "unexpected keyword argument 'nope'"),
        ("[1, 2]", "--kwargs must be a JSON object"),
        ("{bad", "--kwargs is not valid JSON"),
    ],
)
def test_cli_reports_factory_errors(capsys, kwargs, expected):
    err = _cli_error(capsys, ["inspect", MODEL, "--input-shape", "2,1,16,16", "--kwargs", kwargs])
    assert expected in err


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("reuse_compiler.models:MODELS", "is a dict, not a callable"),
        ("reuse_compiler.models:nope", "has no attribute 'nope'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("cifarnet", "model must be MODULE:FACTORY"),
    ],
)
def test_cli_reports_bad_model_specs(capsys, spec, expected):
    assert expected in _cli_error(capsys, ["inspect", spec, "--input-shape", "2,1,16,16"])


def test_cli_reports_a_wrong_input_shape_by_the_models_own_error(capsys):
    err = _cli_error(capsys, ["inspect", MODEL, "--input-shape", "2,3,16,16", "--kwargs", '{"in_channels": 1}'])
    assert "--input-shape 2,3,16,16" in err and "expected input[2, 3, 16, 16] to have 1 channels" in err
    assert "ShapeProp" not in err and "%conv1" not in err  # no fx node dump


def test_cli_reports_an_untraceable_model(capsys, tmp_path, monkeypatch):
    (tmp_path / "ue_untraceable_models.py").write_text(
        "import torch\n"
        "class Branchy(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(1, 2, 3)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x) if x.sum() > 0 else x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _cli_error(capsys, ["inspect", "ue_untraceable_models:Branchy", "--input-shape", "2,1,8,8"])
    assert "torch.fx cannot trace the forward of Branchy" in err and "exclude" in err


def test_cli_export_to_a_missing_folder(capsys, tmp_path):
    out = tmp_path / "nonexistent" / "m.onnx"
    err = _cli_error(capsys, ["export", MODEL, *TINY, "-o", str(out)])
    assert "python -m reuse_compiler export: error: -o" in err and "does not exist" in err
    assert not out.parent.exists()


def test_cli_error_is_a_system_exit_with_its_message():
    e = CliError("bad thing")
    assert isinstance(e, SystemExit) and e.code == 2 and str(e) == "error: bad thing"


def test_cli_good_run_still_works(capsys):
    assert main(["inspect", MODEL, *TINY, "--json", "--L", "conv1=5", "--H", "4"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert (layers[0]["L"], layers[0]["H"]) == (5, 4)


# ----------------------------------------------------------------------------- ReuseConfig


@pytest.mark.parametrize("value", [None, [], (), set()])
def test_config_exclude_none_or_empty_is_the_default(value):
    cfg = ReuseConfig(exclude=value)
    assert cfg.exclude == [] and cfg == ReuseConfig()
    assert ReuseConfig(**cfg.to_dict()) == cfg


def test_config_exclude_any_iterable_of_names():
    assert ReuseConfig(exclude=("conv1", "conv2")).exclude == ["conv1", "conv2"]
    assert ReuseConfig(exclude=(n for n in ["conv1"])).exclude == ["conv1"]


@pytest.mark.parametrize("bad", [5, "conv1", [1], ["conv1", None], {"conv1": 1}, 1.5, b"conv1"])
def test_config_exclude_wrong_types_name_the_field(bad):
    with pytest.raises(ValueError, match=r"ReuseConfig\.exclude must be a list of layer or module names"):
        ReuseConfig(exclude=bad)


@pytest.mark.parametrize("field", ["L", "H"])
@pytest.mark.parametrize("bad", [[5], (5,), "5", 2.0, {5: 3}])
def test_config_int_or_map_wrong_types_name_the_field(field, bad):
    with pytest.raises(ValueError, match=rf"ReuseConfig\.{field}"):
        ReuseConfig(**{field: bad})


# ------------------------------------------------------------------- checkpoints, file objects


def _tiny():
    torch.manual_seed(0)
    return reuse_compile(cifarnet(in_channels=1, image_size=16, width=0.25), torch.randn(8, 1, 16, 16))


def test_checkpoint_to_and_from_a_file_object(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gm = _tiny()
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    buf = io.BytesIO()
    save_checkpoint(buf, gm, epoch=3)
    assert os.listdir(tmp_path) == []  # no stray "<_io.BytesIO ...>.tmp"
    fresh = _tiny()
    with pytest.raises(ValueError, match=r"seek\(0\)"):  # at the end of what was written
        load_checkpoint(buf, fresh)
    buf.seek(0)
    assert load_checkpoint(buf, fresh) == {"epoch": 3}
    for a, b in zip(gm.state_dict().values(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_to_paths_is_atomic(tmp_path):
    gm = _tiny()
    path = tmp_path / "c.pt"
    save_checkpoint(path, gm, step=1)  # os.PathLike
    save_checkpoint(str(path), gm, step=2)  # str
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]
    assert load_checkpoint(path, _tiny()) == {"step": 2}
    with pytest.raises(Exception):  # noqa: B017  (what torch.save raises for a lambda)
        save_checkpoint(path, gm, bad=lambda: 0)
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no .tmp left, the old checkpoint intact
    assert load_checkpoint(path, _tiny()) == {"step": 2}


def test_checkpoint_to_something_else_names_the_argument():
    with pytest.raises(TypeError, match="save_checkpoint: path must be a file name"):
        save_checkpoint(123, _tiny())


# ------------------------------------- checkpoints, a measured calibration that differs per machine


def _fake_calibration(ratios):
    """A stand-in for calibration.calibrate: ``ratios(layer, n)`` gives the measured time
    ratio of each of the layer's candidates (the same on every run: no timing)."""

    def calibrate(
        row, x, weight, bias, repeats, centroid, input_grad, seed, hashing="random", norm_grad=True, zero_skip=False
    ):
        rs = ratios(row.name, len(row.candidates))
        cands = [
            {"L": L, "H": H, "ms": 10 * r, "ratio": r, "ratio_min": r, "r_c": 0.1, "predicted": 0.5, "error": 0.3}
            for (L, H), r in zip(row.candidates, rs)
        ]
        return {"exact_ms": 10.0, "input_grad": input_grad, "candidates": cands}

    return calibrate


# machine A: every candidate fast, in the paper's order
FAST = _fake_calibration(lambda name, n: [0.3 + 0.05 * i for i in range(n)])
# machine B: nothing faster than exact for conv1; conv2's candidates in reverse order, one dropped
OTHER = _fake_calibration(
    lambda name, n: [2.0] * n if name == "conv1" else [0.9 - 0.05 * i for i in range(n - 1)] + [1.5]
)
# machine C: conv2 is never faster; conv1 the same as on A
NO_CONV2 = _fake_calibration(lambda name, n: [2.0] * n if name == "conv2" else [0.3 + 0.05 * i for i in range(n)])


def _stage_probe(gm):
    """Probe 'accuracy' from the stage indices alone: deterministic, and different for a
    different candidate list, so a walk that restarted or changed lists shows in the history."""
    rows = [r for r in gm.reuse_plan.rows() if r.rewritable]
    return min(1.0, 0.2 * (1 + sum(0 if r.stage is None else r.stage for r in rows)))


def _machine(monkeypatch, calibration):
    monkeypatch.setattr(cal, "calibrate", calibration)
    torch.manual_seed(0)
    model = cifarnet(in_channels=1, image_size=16, width=0.25)
    gm = reuse_compile(model, torch.randn(8, 1, 16, 16), config=ReuseConfig(policy="measured", seed=3))
    ctl = AdaptiveReuse(gm, "lh", probe=_stage_probe, patience=0)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    return gm, ctl, opt


def _train(gm, ctl, opt, steps):
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(8)]
    for s in steps:
        x, y = data[s % len(data)]
        loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step([2.0, 1.9, 1.95][s % 3])  # a scripted plateau every third step


def _rows(gm):
    return [(r.name, r.rewritable, r.exact, r.L, r.H, r.stage, list(r.candidates)) for r in gm.reuse_plan.rows()]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REUSE_COMPILER_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("other", [OTHER, NO_CONV2], ids=["conv1-exact-here", "conv2-exact-here"])
def test_measured_checkpoint_resumes_on_a_machine_with_other_timings(cache, monkeypatch, caplog, other):
    # the uninterrupted run on machine A
    gm, ctl, opt = _machine(monkeypatch, FAST)
    _train(gm, ctl, opt, range(8))
    ref_rows, ref_history, ref_state = _rows(gm), ctl.history, ctl.state_dict()
    ref_params = [p.detach().clone() for p in gm.parameters()]
    assert len(ref_history) >= 2 and any(h["rule"].startswith("amendment") for h in ref_history)

    # A again, interrupted at step 4
    gm, ctl, opt = _machine(monkeypatch, FAST)
    _train(gm, ctl, opt, range(4))
    saved_rows = _rows(gm)
    buf = io.BytesIO()
    save_checkpoint(buf, gm, controller=ctl, optimizer=opt, step=4)

    # resumed on machine B, whose calibration keeps other lists
    gm_b, ctl_b, opt_b = _machine(monkeypatch, other)
    assert _rows(gm_b) != saved_rows
    assert any(not r.rewritable for r in gm_b.reuse_plan.rows())
    buf.seek(0)
    with caplog.at_level(logging.WARNING, logger="reuse_compiler"):
        assert load_checkpoint(buf, gm_b, controller=ctl_b, optimizer=opt_b) == {"step": 4}
    assert "calibration of this machine differs" in caplog.text and "candidate lists were kept" in caplog.text
    assert _rows(gm_b) == saved_rows
    assert ctl_b.layers == ctl.layers and ctl_b.state_dict() == ctl.state_dict()
    torch.testing.assert_close(gm_b.state_dict(), gm.state_dict(), rtol=0, atol=0)

    # it continues as the uninterrupted run did
    _train(gm_b, ctl_b, opt_b, range(4, 8))
    assert _rows(gm_b) == ref_rows
    assert ctl_b.history == ref_history and ctl_b.state_dict() == ref_state
    for a, b in zip(gm_b.parameters(), ref_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_measured_checkpoint_exact_there_rewritable_here(cache, tmp_path, monkeypatch, caplog):
    """A layer the saving machine kept exact stays exact here (its state module goes), though
    this machine's calibration would rewrite it."""
    gm, ctl, opt = _machine(monkeypatch, NO_CONV2)
    _train(gm, ctl, opt, range(2))
    path = tmp_path / "c.pt"
    save_checkpoint(path, gm, controller=ctl, optimizer=opt)
    gm_b, ctl_b, opt_b = _machine(monkeypatch, FAST)
    assert gm_b.reuse_plan["conv2"].rewritable and hasattr(gm_b.reuse_state, "conv2")
    with caplog.at_level(logging.WARNING, logger="reuse_compiler"):
        load_checkpoint(path, gm_b, controller=ctl_b, optimizer=opt_b)
    row = gm_b.reuse_plan["conv2"]
    assert not row.rewritable and row.exact and row.reason == gm.reuse_plan["conv2"].reason
    assert not hasattr(gm_b.reuse_state, "conv2") and ctl_b.layers == ["conv1"]
    assert _rows(gm_b) == _rows(gm) and "conv2 (" in caplog.text
    x = torch.randn(4, 1, 16, 16)
    gm.eval(), gm_b.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm_b(x), gm(x), rtol=0, atol=0)


def test_old_checkpoint_without_candidate_lists_still_loads(cache, monkeypatch, caplog):
    """Checkpoints saved before the candidate lists were: same calibration, they load as
    before; another calibration, the saved stages are restored (with a warning)."""
    gm, ctl, opt = _machine(monkeypatch, FAST)
    _train(gm, ctl, opt, range(4))
    ckpt = save_checkpoint(io.BytesIO(), gm, controller=ctl, optimizer=opt)
    del ckpt["reuse"]["rows"]
    same, ctl_same, _ = _machine(monkeypatch, FAST)
    with caplog.at_level(logging.WARNING, logger="reuse_compiler"):
        load_checkpoint(ckpt, same, controller=ctl_same)
    assert _rows(same) == _rows(gm) and ctl_same.state_dict() == ctl.state_dict() and not caplog.text
    other, ctl_other, _ = _machine(monkeypatch, OTHER)
    with caplog.at_level(logging.WARNING, logger="reuse_compiler"):
        load_checkpoint(ckpt, other, controller=ctl_other)
    assert "holds no candidate lists" in caplog.text
    for a, b in zip(_rows(other), _rows(gm)):
        assert a[:5] == b[:5]  # name, rewritable, exact, L, H: the saved stages
    assert ctl_other.layers == ctl.layers


def test_paper_policy_checkpoint_unchanged(tmp_path, caplog):
    gm = _tiny()
    ckpt = save_checkpoint(tmp_path / "c.pt", gm)
    assert set(ckpt["reuse"]["rows"]) == {"conv1", "conv2"}
    fresh = _tiny()
    with caplog.at_level(logging.WARNING, logger="reuse_compiler"):
        load_checkpoint(tmp_path / "c.pt", fresh)
    assert not caplog.text and _rows(fresh) == _rows(gm)


def test_old_input_scope_checkpoint_warns_of_the_new_policy_2(tmp_path, caplog):
    """Policy 2's N per image for scope "input" changed the candidate lists: an old checkpoint
    (no lists) loads its stages and says the walk may differ."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16)
    cfg = ReuseConfig(scope="input")
    gm = reuse_compile(cifarnet(in_channels=1, image_size=16, width=0.25), x, config=cfg)
    ckpt = save_checkpoint(tmp_path / "c.pt", gm)
    del ckpt["reuse"]["rows"]
    fresh = reuse_compile(cifarnet(in_channels=1, image_size=16, width=0.25), x, config=cfg)
    with caplog.at_level(logging.WARNING, logger="reuse_compiler"):
        load_checkpoint(ckpt, fresh)
    assert "Policy 2 now takes N from one image" in caplog.text


def test_checkpoint_rows_unknown_here_are_refused_by_name(tmp_path):
    """A checkpoint row this module's plan lacks (a layer renamed, or another model), in
    its stages or only in its candidate lists (a layer that ran exact), is refused by name
    before anything is loaded."""
    gm = _tiny()
    ckpt = save_checkpoint(tmp_path / "c.pt", gm)
    rows = ckpt["reuse"]["rows"]
    rows["conv9"] = {**rows["conv2"], "reason": "excluded by ReuseConfig.exclude"}  # an exact row only
    fresh = _tiny()
    before = {k: v.clone() for k, v in fresh.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"layers \['conv9'\] are not in this module's plan"):
        load_checkpoint(ckpt, fresh)
    ckpt["reuse"]["stages"]["conv8"] = ckpt["reuse"]["stages"]["conv2"]
    with pytest.raises(ValueError, match=r"layers \['conv8', 'conv9'\] are not in this module's plan"):
        load_checkpoint(ckpt, fresh)
    after = fresh.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# --------------------------------------------------------------------- moved to another device


def test_reused_layers_on_another_device_type_warn_once():
    """A module whose reused layers run on another device type than the one reuse_compile chose
    their stages on (here: state marked as compiled on CUDA, as a module compiled on a GPU and
    loaded on the CPU would be; tests/test_cuda.py moves one to the GPU) warns once, naming
    both devices and the way on; on its own device, or pickled before session 25, it does not."""
    import copy
    import pickle
    import warnings

    x = torch.rand(4, 1, 16, 16)
    gm = reuse_compile(cifarnet(in_channels=1, image_size=16, width=0.25), x)
    states = [m for name, m in gm.named_modules() if name.startswith("reuse_state.") and hasattr(m, "compiled_on")]
    assert states and all(s.compiled_on == "cpu" for s in states)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm(x)  # compiled here, runs here
        old = copy.deepcopy(gm)
        for s in [m for n, m in old.named_modules() if n.startswith("reuse_state.") and hasattr(m, "compiled_on")]:
            del s.compiled_on  # as a module pickled before the attribute existed
        pickle.loads(pickle.dumps(old))(x)
    for s in states:
        s.compiled_on = "cuda"
    with pytest.warns(UserWarning, match=r"stages on cuda, .* now run on cpu.*reuse_compile\(model\.to\(device\)"):
        gm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm(x)  # once per layer
