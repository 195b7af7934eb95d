"""The ops' registration: schemas and native kernels in C++ (csrc/library.cpp, TORCH_LIBRARY_IMPL
beside each kernel), fakes in Python, the Triton kernels as ops of their own. Every registered op
passes torch.library.opcheck, and an AOTInductor package calls the kernels with no Python of ours."""

import pytest
import torch
from helpers import run_python

import easier_kernels as ek
from easier_kernels.ops import library

OPS = tuple(library.SCHEMAS)


def registered_op(name: str, impl: str):
    """The op's overload: `native` is easier_kernels::<name> (the dispatcher's kernels), `triton`
    easier_kernels::<name>_triton."""
    if impl == "triton":
        if "triton" not in ek.ops.available_backends():
            pytest.skip("triton needs a CUDA GPU, or TRITON_INTERPRET=1 with triton installed")
        ek.ops.backends.kernels("triton", True)  # registers the triton ops
        name += "_triton"
    return getattr(torch.ops.easier_kernels, name).default


def test_python_schemas_are_the_native_ones():
    if ek.ops.backends.native_extension() is None:
        pytest.fail("the extension is not built (pip install --no-build-isolation .)")
    for name, schema in library.SCHEMAS.items():
        assert str(getattr(torch.ops.easier_kernels, name).default._schema) == f"easier_kernels::{schema}"


def counting_samples(with_nan: bool):
    """(x, channel_dim) in the layouts and dtypes the kernels walk differently. (opcheck compares
    outputs without equal_nan: NaNs only where the op returns nothing.)"""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=gen)
    if with_nan:
        x[0, 1, 2] = float("nan")
    return [
        (x, 1),
        (x.contiguous(memory_format=torch.channels_last), 1),
        (torch.randn(2, 6, 5, generator=gen).half(), -1),
        (x[..., ::2], 1),  # gapped: the copying path
    ]


def zeros(channels, device):
    return torch.zeros(channels, dtype=torch.int64, device=device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["native", "triton"])
@pytest.mark.parametrize("name", OPS)
def test_every_registered_op_passes_opcheck(name, impl, device):
    """Schema (declared mutations really happen, nothing else is mutated), fake kernels, and the
    op under torch.compile's dispatcher (aot_dispatch), for each layout and several kinds."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if impl == "triton" and device == "cpu" and torch.cuda.is_available():
        pytest.skip("triton runs on the GPU here (on CPU only in its interpreter)")
    op = registered_op(name, impl)
    if name == "conv_block":
        gen = torch.Generator().manual_seed(1)
        x, pw, dw, b1, b2, res, dw1, pw2 = (t.to(device) for t in (
            torch.randn(2, 4, 6, 6, generator=gen), torch.randn(8, 4, generator=gen), torch.randn(8, 3, 3, generator=gen),
            torch.randn(8, generator=gen), torch.randn(8, generator=gen), torch.randn(2, 8, 3, 3, generator=gen),
            torch.randn(4, 3, 3, generator=gen), torch.randn(8, 4, generator=gen)))
        torch.library.opcheck(op, (x, pw, b1, dw, b2, res, "pw_dw", [2, 2], [1, 1], "relu6", 0.0))
        torch.library.opcheck(op, (x, dw1, b1[:4].contiguous(), pw2, b2, None, "dw_pw", [1, 1], [1, 1], "identity", 0.0))
        return
    for x, channel_dim in counting_samples(with_nan=name == "count_on"):
        x = x.to(device)
        channels = x.shape[channel_dim]
        if name == "count_on":
            torch.library.opcheck(op, (x, zeros(channels, device), zeros(channels, device), channel_dim))
        else:
            for kind, param in (("relu", 0.0), ("leaky_relu", 0.2), ("gelu_tanh", 0.0)):
                torch.library.opcheck(op, (x, zeros(channels, device), zeros(channels, device), kind, channel_dim, param))


def test_native_ops_check_their_arguments_in_cpp():
    """Called directly (as an exported program or AOTInductor does), the C++ kernels refuse bad
    count buffers and kinds with a message that says what to pass."""
    if "cpp" not in ek.ops.available_backends():
        pytest.fail("the cpp backend is not built")
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"counts must be a contiguous int64 tensor of shape \[3\]"):
        torch.ops.easier_kernels.count_on(x, zeros(4, "cpu"), zeros(3, "cpu"), 1)
    with pytest.raises(RuntimeError, match="unknown activation kind 'swish'"):
        torch.ops.easier_kernels.act_count(x, zeros(3, "cpu"), zeros(3, "cpu"), "swish", 1, 0.0)
    with pytest.raises(RuntimeError, match="channel_dim=3 is out of range"):
        torch.ops.easier_kernels.count_on(x, zeros(3, "cpu"), zeros(3, "cpu"), 3)


class _Scored(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.register_buffer("counts", torch.zeros(4, dtype=torch.int64))
        self.register_buffer("nans", torch.zeros(4, dtype=torch.int64))

    def forward(self, x):
        return ek.ops.act_count(self.conv(x), self.counts, "relu", nan_counts=self.nans) * 2


_RUN_PACKAGE = """
import sys, torch
torch.ops.load_library(sys.argv[1])  # the kernels' library only: no easier_kernels Python
runner = torch._inductor.aoti_load_package(sys.argv[2])
x, expected = torch.load(sys.argv[3])
assert torch.equal(runner(x), expected)
assert not [m for m in sys.modules if m.startswith("easier_kernels")]
print("ok")
"""


def test_an_aotinductor_package_calls_the_native_kernels_without_python(tmp_path):
    """torch.export keeps easier_kernels::act_count as one op; AOTInductor compiles the program,
    and the package runs in a process that loaded only the compiled library."""
    if "cpp" not in ek.ops.available_backends():
        pytest.fail("the cpp backend is not built")
    model, x = _Scored().eval(), torch.randn(2, 3, 8, 8)
    with ek.ops.use_backend("cpp"):
        program = torch.export.export(model, (x,))
    assert [n.target for n in program.graph.nodes if "easier_kernels" in str(n.target)] == [
        torch.ops.easier_kernels.act_count.default
    ]
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "scored.pt2"))
    torch.save((x, model(x)), tmp_path / "io.pt")
    script = tmp_path / "run_package.py"
    script.write_text(_RUN_PACKAGE)
    out = run_python(str(script), ek.ops.backends.native_extension().__file__, package, str(tmp_path / "io.pt"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
