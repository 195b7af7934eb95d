"""Numerics that must not change on first GPU contact: the activation against torch within one
stated table, the parameter rounded like torch's, launches on the tensor's own GPU, and the
compiled kernels' math (checked by compiling for sm_90 here, no GPU needed)."""

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise_equal, run_python

import easier_kernels as ek
from easier_kernels.ops import kinds

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
EPS = {dtype: torch.finfo(dtype).eps for dtype in (F32, F64, F16, BF16)}
EPS32, EPS64 = EPS[F32], EPS[F64]

# (rtol, atol) of each backend's activation against torch's on the same device (CPU: torch's own
# kernels; GPU: torch's CUDA kernels), for finite inputs; (0, 0) is bit for bit. The same table
# holds for the interpreted Triton here and for the compiled one (libdevice math) on a GPU.
#  * relu, relu6, leaky_relu, hardswish: compares, one multiply and one IEEE division, in
#    torch's math type (float32 for the 16-bit types) and torch's order: exact.
#  * silu, elu: exp / expm1 and a division, each within ~2 ulp (numpy or libdevice here, Sleef
#    or CUDA's libm in torch): rtol 4 eps covers 2 ulp on each side; atol 1 eps, for outputs
#    near the subnormals.
#  * gelu, gelu_tanh: 1 + erf (1 + tanh) cancels where x < 0: both sides carry ~2 ulp of a value
#    near -1, times 0.5 |x| before erf saturates (|x| < 9): atol 16 eps.
#  * float16 / bfloat16: computed in float32 and rounded once, as torch does: one ulp of the
#    16-bit type (rtol eps) where the float32 results straddle a rounding boundary, plus the
#    float32 atol where outputs are tiny.
EXACT = {F32: (0, 0), F64: (0, 0), F16: (0, 0), BF16: (0, 0)}


def _transcendental(atol_eps):
    return {F32: (4 * EPS32, atol_eps * EPS32), F64: (4 * EPS64, atol_eps * EPS64),
            F16: (EPS[F16], atol_eps * EPS32), BF16: (EPS[BF16], atol_eps * EPS32)}


TOLERANCES = {
    "relu": EXACT,
    "relu6": EXACT,
    "leaky_relu": EXACT,
    "hardswish": EXACT,
    "silu": _transcendental(1),
    "elu": _transcendental(1),
    "gelu": _transcendental(16),
    "gelu_tanh": _transcendental(16),
}
PARAMS = {"leaky_relu": 0.1, "elu": 0.7}  # 0.1 and 0.7 are not float32 values: rounding shows


def random_inputs(dtype, device):
    """Normals, a dense sweep over [-20, 20], values near 0 and the saturated tails."""
    gen = torch.Generator().manual_seed(16)
    tails = torch.tensor([0.0, -0.0, 88.0, -88.0, 700.0, -700.0], dtype=F64)
    x = torch.cat([torch.randn(3000, generator=gen, dtype=F64) * 3, torch.linspace(-20, 20, 801, dtype=F64),
                   torch.randn(200, generator=gen, dtype=F64) * 1e-3, tails])
    return x.to(dtype).view(1, -1).to(device)


def act(backend, x, kind, param, channel_dim=0):
    """The backend's act_count kernel itself: kernel kind names (gelu_tanh) and float parameters."""
    counts = torch.zeros(x.shape[channel_dim], dtype=torch.int64, device=x.device)
    return ek.ops.backends.kernels(backend).act_count(x, counts, torch.zeros_like(counts), kind, channel_dim, param)


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", list(TOLERANCES))
def test_activation_is_within_the_stated_tolerance_of_torch(backend, device, kind, dtype):
    x = random_inputs(dtype, device)
    param = PARAMS.get(kind, 0.0)
    got, expected = act(backend, x, kind, param), kinds.forward(x, kind, param)
    rtol, atol = TOLERANCES[kind][dtype]
    if rtol == atol == 0:
        assert_bitwise_equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=lambda d: str(d)[6:])
def test_parameter_is_rounded_to_torchs_math_type(backend, device, dtype):
    """leaky_relu's slope 0.1 multiplies in float64 for float64 x and in float32 otherwise, as in
    torch: bit for bit. elu's alpha shows alone at -inf, where the rule gives -alpha."""
    x = random_inputs(dtype, device)
    assert_bitwise_equal(act(backend, x, "leaky_relu", 0.1), torch.nn.functional.leaky_relu(x, 0.1))
    minus_inf = torch.full((1, 4), float("-inf"), dtype=dtype, device=device)
    assert_bitwise_equal(act(backend, minus_inf, "elu", 0.1), torch.full_like(minus_inf, -0.1))


needs_triton = pytest.mark.skipif("triton" not in ek.ops.available_backends(),
                                  reason="triton needs a CUDA GPU, or TRITON_INTERPRET=1 with triton installed")


@needs_triton
def test_parameter_bits_are_torchs_rounding():
    """The kernels get the parameter as the bits of its value in the math type: float64 bits for
    float64 x, float32 bits (rounded to nearest, +-inf past the range) otherwise; -0.0 kept."""
    import struct

    from easier_kernels.ops.triton_kernels import param_bits

    as_f64 = lambda bits: struct.unpack("<d", struct.pack("<q", bits))[0]  # noqa: E731
    as_f32 = lambda bits: struct.unpack("<f", struct.pack("<i", bits))[0]  # noqa: E731
    for value in (0.1, 0.7, -0.01, 1e-310, 1e300, -1e300, 0.0, -0.0):
        assert struct.pack("<d", as_f64(param_bits(value, True))) == struct.pack("<d", value)
        assert as_f32(param_bits(value, False)) == torch.tensor(value, dtype=F32).item()
    assert param_bits(-0.0, False) == -(2**31) and param_bits(0.0, False) == 0


@needs_triton
def test_launch_guard_is_the_tensors_cuda_device():
    from easier_kernels.ops.triton_kernels import device_guard

    guard = device_guard(torch.device("cuda", 1))  # built, never entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


@needs_triton
def test_every_triton_launch_runs_under_the_guard_of_x_device(monkeypatch):
    """count_on, act_count and conv_block each enter device_guard(x.device) around their launch;
    on the CPU (interpreted) that guard is no CUDA guard at all."""
    from easier_kernels.ops import triton_conv_block, triton_kernels

    seen = []
    real = triton_kernels.device_guard

    def spy(device):
        seen.append(device)
        return real(device)

    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU launch entered a CUDA device guard")

    for module in (triton_kernels, triton_conv_block):
        monkeypatch.setattr(module, "device_guard", spy)
    device = torch.device("cpu") if triton_kernels._INTERPRETED else torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        monkeypatch.setattr(torch.cuda, "device", no_cuda)
    x = torch.randn(2, 3, 4, device=device)
    with ek.ops.use_backend("triton"):
        ek.ops.count_on(x)
        ek.ops.act_count(x, torch.zeros(3, dtype=torch.int64, device=device), "elu")
        conv = [torch.randn(*shape, device=device) for shape in ((1, 2, 4, 4), (3, 2, 1, 1), (3, 1, 3, 3))]
        ek.ops.conv_block(conv[0], conv[1], None, conv[2], None, pattern="pw_dw", padding=1)
    assert seen == [device] * 3


@needs_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (a tensor on cuda:1, cuda:0 current)")
def test_triton_runs_on_the_tensors_gpu_not_the_current_one():
    x = torch.randn(4, 3, 5, device="cuda:1")
    counts = torch.zeros(3, dtype=torch.int64, device=x.device)
    with torch.cuda.device(0), ek.ops.use_backend("triton"):
        y = ek.ops.act_count(x, counts, "relu")
        conv = ek.ops.conv_block(torch.randn(1, 3, 5, 5, device=x.device), torch.randn(3, 3, 1, 1, device=x.device),
                                 None, torch.randn(3, 1, 3, 3, device=x.device), None, pattern="pw_dw", padding=1)
    torch.cuda.synchronize(x.device)
    assert_bitwise_equal(y, torch.relu(x))
    assert counts.tolist() == (x >= 0).sum((0, 2)).tolist() and conv.device == x.device


# Compiles the kernels for an H100 (sm_90) with the NVIDIA backend, in a process without
# TRITON_INTERPRET, and reports what a GPU would run: the math ops left in the Triton IR, and
# the PTX's division and dot instructions.
_COMPILE = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from easier_kernels.ops import kinds, triton_conv_block as tc, triton_kernels as tk

target = GPUTarget("cuda", 90, 32)
report = {}

def record(name, kernel, sig, const, options):
    sig = dict(sig, **{k: "constexpr" for k in const})
    c = triton.compile(ASTSource(kernel, sig, const), target=target, options=options)
    ttir, ptx = c.asm["ttir"], c.asm["ptx"]
    report[name] = {"ir_math": sorted(set(re.findall(r"\b(?:math\.\w+|arith\.divf)\b", ttir))),
                    "libdevice": sorted(set(re.findall(r"__nv_\w+", ttir))),
                    "param": sorted(set(re.findall(r"tt\.bitcast %param_bits : (\w+ -> \w+)", ttir))),
                    "div_full": "div.full" in ptx, "tf32": "tf32" in ttir + ptx,
                    "mma": bool(re.search(r"\bw?gmma|\bmma\.", ptx))}

for dtype, ty in (("float32", "fp32"), ("float64", "fp64")):
    for kind in ("leaky_relu", "gelu", "gelu_tanh", "silu", "hardswish", "elu"):
        sig = {"x_ptr": "*" + ty, "y_ptr": "*" + ty, "on_ptr": "*i64", "nan_ptr": "*i64", "n_rows": "i64",
               "C": "i32", "inner": "i32", "param_bits": "i64" if dtype == "float64" else "i32"}
        const = dict(KIND=kinds.KIND_IDS[kind], WRITE=True, F64=dtype == "float64", INF16=0, BLOCK_R=1, BLOCK_I=1024)
        record(f"act-{kind}-{dtype}", tk._runs_kernel, sig, const, tk.LAUNCH_OPTIONS)

for pattern, kernel, block in (("pw_dw", tc._pw_dw_kernel, "BLOCK_C"), ("dw_pw", tc._dw_pw_kernel, "BLOCK_O")):
    sig = {n: "*fp32" for n in ("x_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "res_ptr", "out_ptr")}
    sig.update({n: "i32" for n in ("Cin", "Cmid" if pattern == "pw_dw" else "Cout", "H", "W", "Ho", "Wo",
                                   "stride_h", "stride_w", "pad_h", "pad_w", "param_bits")})
    const = {"KH": 1, "KW": 1, "KIND": kinds.KIND_IDS["elu"], "HAS_RES": False, "USE_DOT": True, "DOT_F32": True,
             "BLOCK_P": 16, "BLOCK_K": 16, block: 16}
    record(f"conv-{pattern}-float32", kernel, sig, const, dict(tc._LAUNCH_OPTIONS, num_stages=1))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def compiled_for_sm90():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton's NVIDIA backend (compiler, ptxas) is not installed")
    root = Path(__file__).resolve().parents[2]
    out = run_python("-c", _COMPILE, cwd=str(root), drop_env=("TRITON_INTERPRET",))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compiled_activations_use_libdevice_and_ieee_division(compiled_for_sm90):
    """No tl.exp (ex2.approx), tl.log (lg2.approx), tl.math.erf or `/` (div.full.f32) reaches
    the compiled activation kernels: their math is libdevice's, the divisions div_rn; and the
    parameter is its bits reinterpreted in the math type, not a float32 argument."""
    acts = {name: r for name, r in compiled_for_sm90.items() if name.startswith("act-")}
    assert len(acts) == 12
    for name, report in acts.items():
        assert report["ir_math"] == [] and not report["div_full"], (name, report)
        if "-leaky_relu-" in name or "-elu-" in name:  # the kinds that take one
            assert report["param"] == (["i64 -> f64"] if name.endswith("float64") else ["i32 -> f32"]), (name, report)
    assert "__nv_fdiv_rn" in acts["act-silu-float32"]["libdevice"]
    assert "__nv_ddiv_rn" in acts["act-hardswish-float64"]["libdevice"]
    assert acts["act-elu-float32"]["libdevice"] == ["__nv_expm1f"]
    assert acts["act-gelu-float64"]["libdevice"] == ["__nv_erf"]


def test_compiled_float32_conv_block_dots_are_ieee(compiled_for_sm90):
    """float32 tl.dot with input_precision="ieee": FMA, no TF32 tensor-core instruction."""
    for pattern in ("pw_dw", "dw_pw"):
        report = compiled_for_sm90[f"conv-{pattern}-float32"]
        assert not report["tf32"] and not report["mma"] and not report["div_full"], (pattern, report)
        assert report["ir_math"] == [] and report["param"] == ["i32 -> f32"], (pattern, report)
