"""ek.export: every fold result becomes a file that runs without this package (ONNX in ONNX
Runtime, torch.export's .pt2), its outputs checked; fused blocks lowered to standard convs."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from helpers import TORCHVISION_MODELS
from test_fold import fused_mobilenet, linearized_model, relative_error

import easier_kernels as ek
from easier_kernels.fold import FusedConvBlock, StandardConvBlock, decisions
from easier_kernels.fold.blocks import fused_block

onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")

MODELS = [f"paper-{n}" for n in ("resnet18", "vgg16_bn", "mobilenet_v2")] + TORCHVISION_MODELS


def run_onnx(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name", MODELS)
def test_every_fold_result_exports_to_onnx(name, tmp_path):
    """Half the sites linear, every chain merged (the weights ONNX sees are the folded ones):
    ONNX Runtime reproduces the module within a relative error of 1e-5."""
    net, x = linearized_model(name)
    folded = ek.fold(net, x, decide="merge")
    written = ek.export(folded, x, tmp_path / "model.onnx")
    assert written["relative_error"] <= 1e-5
    assert relative_error(run_onnx(tmp_path / "model.onnx", x), folded(x)) <= 1e-5


def test_fused_blocks_are_lowered_for_onnx_and_pt2(tmp_path):
    net, x, folded = fused_mobilenet()
    fused = sum(isinstance(m, FusedConvBlock) for m in folded.modules())
    assert fused
    onnx = ek.export(folded, x, tmp_path / "model.onnx")
    assert onnx["lowered_blocks"] == fused and onnx["relative_error"] <= 1e-5
    assert any(isinstance(m, FusedConvBlock) for m in folded.modules())  # the folded module itself is unchanged
    assert relative_error(run_onnx(tmp_path / "model.onnx", x), net(x)) <= 1e-5
    pt2 = ek.export(folded, x, tmp_path / "model.pt2", format="pt2")
    assert pt2["relative_error"] <= 1e-5
    program = torch.export.load(tmp_path / "model.pt2")
    assert not any("easier_kernels" in str(n.target) for n in program.graph.nodes)
    assert relative_error(program.module()(x), net(x)) <= 1e-5


def test_the_files_run_without_this_package(tmp_path):
    net, x, folded = fused_mobilenet()
    ek.export(folded, x, tmp_path / "model.onnx")
    ek.export(folded, x, tmp_path / "model.pt2", format="pt2")
    torch.save({"x": x, "y": folded(x)}, tmp_path / "io.pt")
    script = f"""
import sys, torch, onnxruntime
io = torch.load({str(tmp_path / 'io.pt')!r})
session = onnxruntime.InferenceSession({str(tmp_path / 'model.onnx')!r}, providers=["CPUExecutionProvider"])
y = torch.from_numpy(session.run(None, {{session.get_inputs()[0].name: io["x"].numpy()}})[0])
z = torch.export.load({str(tmp_path / 'model.pt2')!r}).module()(io["x"])
for out in (y, z):
    assert ((out - io["y"]).abs().max() / io["y"].abs().max()) <= 1e-5
assert not [m for m in sys.modules if m.startswith("easier_kernels")]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("pattern, residual, activation", [("pw_dw", True, "relu6"), ("dw_pw", False, "gelu"),
                                                          ("pw_dw", False, "identity")])
def test_a_lowered_block_computes_the_fused_block(pattern, residual, activation):
    torch.manual_seed(0)
    pw, dw = nn.Conv2d(6, 12, 1), nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
    if pattern == "dw_pw":
        pw, dw = nn.Conv2d(12, 6, 1), nn.Conv2d(12, 12, 3, padding=1, groups=12)
    first, second = (pw, dw) if pattern == "pw_dw" else (dw, pw)
    fused = fused_block(first, second, (activation, {}))
    x = torch.randn(2, first.in_channels, 9, 9)
    out_shape = fused(x).shape
    r = torch.randn(out_shape) if residual else None
    lowered = fused.standard()
    assert isinstance(lowered, StandardConvBlock)
    assert not any(isinstance(m, FusedConvBlock) for m in lowered.modules())
    torch.testing.assert_close(lowered(x, r), fused(x, r), rtol=1e-5, atol=1e-5)


def test_a_portable_fold_holds_standard_modules_only():
    net, x, _ = fused_mobilenet()
    replay = {row["chain"]: row["choice"] for row in decisions(fused_mobilenet()[2])}
    portable = ek.fold(net, x, decide=replay, portable=True)
    assert not any(isinstance(m, FusedConvBlock) for m in portable.modules())
    assert ek.recipe(portable)["fold"]["portable"] is True
    assert relative_error(portable(x), net(x)) <= 1e-5
    measured = ek.fold(net, x, portable=True)
    assert not any("fused" in row["choice"] for row in decisions(measured))


def test_export_bad_input_is_a_clear_error_and_writes_nothing(tmp_path):
    net, x = linearized_model("paper-resnet18", fraction=0.3)
    folded = ek.fold(net, x, decide="merge")
    with pytest.raises(ValueError, match="format must be one of onnx, pt2"):
        ek.export(folded, x, tmp_path / "m.tflite", format="tflite")
    with pytest.raises(RuntimeError, match="nothing was written"):
        ek.export(folded, x, tmp_path / "m.onnx", tolerance=-1.0)
    assert not list(tmp_path.iterdir())
