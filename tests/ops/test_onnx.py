"""A plain `torch.onnx.export` of modules calling `easier_kernels::conv_block` (an eager fold's fused
blocks), with both of torch's exporters, runs in ONNX Runtime with the op's outputs
(easier_kernels/ops/onnx.py). Without ek.export's lowering."""

import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import fused_everywhere, randomize_batch_norms

import easier_kernels as ek
from easier_kernels.fold import FusedConvBlock
from easier_kernels.fold.graph import relative_error
from easier_kernels.ops import onnx as ek_onnx
from easier_kernels.ops import reference

# ek.ops.conv_block's argument checks read shapes, which the TorchScript tracer warns about.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

OP = torch.ops.easier_kernels.conv_block.default
EXPORTERS = {"torchscript": dict(dynamo=False), "dynamo": dict(dynamo=True, verbose=False)}

# Every kernel kind (kinds.py; params not the defaults), both patterns, with and without the
# residual; each case gets the next (kernel, stride, padding), square or not.
KINDS = [("identity", 0.0), ("relu", 0.0), ("relu6", 0.0), ("leaky_relu", 0.1), ("gelu", 0.0), ("gelu_tanh", 0.0),
         ("silu", 0.0), ("hardswish", 0.0), ("elu", 0.7)]
GEOMETRY = [(3, (1, 1), (1, 1)), (3, (2, 2), (1, 1)), (5, (1, 1), (2, 2)), (1, (2, 2), (0, 0)), (3, (1, 2), (0, 1)),
            (3, (1, 1), (0, 0)), (5, (2, 1), (2, 1))]
CASES = [(pattern, kind, param, residual, *geometry) for (pattern, residual, (kind, param)), geometry in
         zip(itertools.product(("pw_dw", "dw_pw"), (False, True), KINDS), itertools.cycle(GEOMETRY))]
CHANNELS, MID, OUT = 4, 6, 5  # pw_dw: 4 -> 6 (depthwise 6); dw_pw: depthwise 4 -> 5


def _onnx():
    pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install '.[onnx]')")
    return pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")


def _weights(pattern, k, g):
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if pattern == "pw_dw":  # kernel layouts: pointwise [O, I], depthwise [C, kh, kw]
        return rand(MID, CHANNELS), rand(MID), rand(MID, k, k), rand(MID)
    return rand(CHANNELS, k, k), rand(CHANNELS), rand(OUT, CHANNELS), rand(OUT)


class Blocks(nn.Module):
    """One direct op call per case, all on x; the residuals are inputs (one per case that has one)."""

    def __init__(self, cases, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cases = cases
        for i, (pattern, _, _, _, k, _, _) in enumerate(cases):
            for name, t in zip(("w1", "b1", "w2", "b2"), _weights(pattern, k, g)):
                self.register_buffer(f"{name}_{i}", t)

    def args(self, i, x, residual):
        pattern, kind, param, _, _, stride, padding = self.cases[i]
        w1, b1, w2, b2 = (getattr(self, f"{name}_{i}") for name in ("w1", "b1", "w2", "b2"))
        return x, w1, b1, w2, b2, residual, pattern, list(stride), list(padding), kind, param

    def forward(self, x, *residuals):
        residuals, outputs = iter(residuals), []
        for i, case in enumerate(self.cases):
            outputs.append(OP(*self.args(i, x, next(residuals) if case[3] else None)))
        return tuple(outputs)


def blocks_and_inputs(cases):
    """The module and its inputs: x, and a random residual of the output's shape per case that has one."""
    module = Blocks(cases).eval()
    x = torch.randn(2, CHANNELS, 9, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    shapes = [reference.conv_block(*module.args(i, x, None)).shape for i, case in enumerate(cases) if case[3]]
    return module, (x, *(torch.randn(shape, generator=g) for shape in shapes))


def run_onnx(ort, path, args):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(y) for y in session.run(None, feeds)]


def export(module, args, path, exporter, **options):
    torch.onnx.export(module, args, str(path), **EXPORTERS[exporter], **options)
    import onnx

    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operators in the file: {domains}"


# ---- the forms themselves, without ONNX


def test_the_decomposition_is_the_reference():
    module, (x, *residuals) = blocks_and_inputs(CASES)
    residuals = iter(residuals)
    for i, case in enumerate(CASES):
        args = module.args(i, x, next(residuals) if case[3] else None)
        torch.testing.assert_close(ek_onnx.decomposed(*args), reference.conv_block(*args), msg=lambda m: f"{case}: {m}")


def test_eager_dispatch_and_torch_export_keep_the_fused_op():
    """The decomposition lives in the table torch's tracers read, not on the op: no composite
    kernel, inductor does not decompose it, and torch.export's default decompositions leave the op
    in the graph."""
    from torch._inductor.decomposition import select_decomp_table

    assert not torch._C._dispatch_has_kernel_for_dispatch_key(OP.name(), "CompositeImplicitAutograd")
    assert OP not in select_decomp_table()
    module, args = blocks_and_inputs(CASES[:2])
    program = torch.export.export(module, args).run_decompositions()
    assert sum(node.target is OP for node in program.graph.nodes) == 2


def test_importing_the_package_does_not_import_onnx():
    code = "import sys, easier_kernels; assert not {'onnx', 'onnxscript'} & set(sys.modules), 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- plain torch.onnx.export, both exporters, in ONNX Runtime


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_every_pattern_kind_and_geometry_exports(exporter, tmp_path):
    """All cases in one module (one export per exporter: the dynamo exporter takes seconds)."""
    ort = _onnx()
    module, args = blocks_and_inputs(CASES)
    export(module, args, tmp_path / "blocks.onnx", exporter)
    got = run_onnx(ort, tmp_path / "blocks.onnx", args)
    x, residuals = args[0], iter(args[1:])
    assert len(got) == len(CASES)
    for i, (case, y) in enumerate(zip(CASES, got)):
        expected = reference.conv_block(*module.args(i, x, next(residuals) if case[3] else None))
        assert y.shape == expected.shape, case
        assert relative_error(y, expected) <= 1e-4, case


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_the_torchscript_symbolic_serves_older_opsets(opset, tmp_path):
    """Unsqueeze and Clip changed form at opsets 11 and 13; HardSwish came at 14."""
    ort = _onnx()
    cases = [c for c in CASES if c[1] in ("relu6", "hardswish", "gelu")]
    module, args = blocks_and_inputs(cases)
    export(module, args, tmp_path / "blocks.onnx", "torchscript", opset_version=opset)
    got = run_onnx(ort, tmp_path / "blocks.onnx", args)
    with torch.no_grad():
        expected = module(*args)
    assert relative_error(got, expected) <= 1e-4


class _CountOp(TorchDispatchMode):
    calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is OP
        return func(*args, **(kwargs or {}))


def fused_fold():
    """A small MobileNetV2, half its sites linearized, every pointwise/depthwise chain fused."""
    model = randomize_batch_norms(ek.models.build("mobilenet_v2", num_classes=10, in_channels=1, width=0.25), 0).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sites = [s.name for s in ek.find_sites(model, x)]
    net = ek.linearize(model, sites[::2], x, plan="merge").eval()
    return ek.fold(net, x, decide=fused_everywhere(net, x)), x


@pytest.fixture(scope="module")
def folded():
    _onnx()  # skip before building
    return fused_fold()


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_an_eager_fold_with_fused_blocks_exports(folded, exporter, tmp_path):
    ort = _onnx()
    module, x = folded
    with torch.no_grad(), _CountOp() as counted:
        expected = module(x)
    assert counted.calls == sum(isinstance(m, FusedConvBlock) for m in module.modules()) > 0  # not vacuous
    export(module, (x,), tmp_path / "folded.onnx", exporter)
    (got,) = run_onnx(ort, tmp_path / "folded.onnx", (x,))
    assert relative_error(got, expected) <= 1e-4
