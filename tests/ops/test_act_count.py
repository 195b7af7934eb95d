"""act_count: activation output and counts in one pass, every backend against the reference."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, assert_bitwise_equal, random_cases
from test_count_on import past_2_to_the_31_device, two_channels_past_2_to_the_31

import easier_kernels as ek

# (public kind, kwargs, exact?) -- the relu family is bit-identical on every backend; the
# transcendental ones agree within the dtype's rounding.
KINDS = [
    ("relu", {}, True),
    ("relu6", {}, True),
    ("leaky_relu", {"negative_slope": 0.1}, True),
    ("gelu", {}, False),
    ("gelu", {"approximate": "tanh"}, False),
    ("silu", {}, False),
    ("hardswish", {}, False),
    ("elu", {"alpha": 0.7}, False),
]
KIND_IDS = [k + ("-" + "-".join(map(str, a.values())) if a else "") for k, a, _ in KINDS]

TORCH_FN = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "elu": F.elu,
}


def run(backend, x, kind, cdim, kwargs):
    counts = torch.zeros(x.shape[cdim], dtype=torch.int64, device=x.device)
    nans = torch.zeros_like(counts)
    with ek.ops.use_backend(backend):
        y = ek.ops.act_count(x, counts, kind, cdim, nan_counts=nans, **kwargs)
    return y, counts, nans


@pytest.mark.parametrize("seed,kind,kwargs,exact", [(i, *k) for i, k in enumerate(KINDS)], ids=KIND_IDS)
def test_matches_reference(backend, device, seed, kind, kwargs, exact):
    count, max_numel = (12, 400) if backend == "triton" else (60, 4000)
    for name, x, cdim in random_cases(seed=seed, count=count, max_numel=max_numel):
        x = x.to(device)
        y_ref, counts_ref, nans_ref = run("reference", x, kind, cdim, kwargs)
        y, counts, nans = run(backend, x, kind, cdim, kwargs)
        assert torch.equal(counts, counts_ref) and torch.equal(nans, nans_ref), name
        assert y.shape == x.shape and y.dtype == x.dtype, name
        if exact:
            assert_bitwise_equal(y, y_ref)
        else:
            torch.testing.assert_close(y, y_ref, equal_nan=True, msg=name)


@pytest.mark.parametrize("kind,kwargs,exact", KINDS, ids=KIND_IDS)
def test_reference_is_the_torch_activation(kind, kwargs, exact):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    y, counts, _ = run("reference", x, kind, 1, kwargs)
    assert_bitwise_equal(y, TORCH_FN[kind](x, **kwargs))
    assert counts.tolist() == (x >= 0).sum((0, 2)).tolist()


INF, NAN = float("inf"), float("nan")
SPECIAL_INPUTS = [0.0, -0.0, INF, -INF, NAN]
# The special-value rule (README, "Special values"), written out: the outputs at the inputs
# above. Every activation is 0 at 0 and keeps the zero's sign; at +-inf it gives its limit, a
# zero limit with the sign the formula gives to large finite inputs; NaN stays NaN.
SPECIAL_RULE = [
    ("identity", {}, [0.0, -0.0, INF, -INF, NAN]),
    ("relu", {}, [0.0, -0.0, INF, 0.0, NAN]),
    ("relu6", {}, [0.0, -0.0, 6.0, 0.0, NAN]),
    ("leaky_relu", {"negative_slope": 0.1}, [0.0, -0.0, INF, -INF, NAN]),
    ("leaky_relu", {"negative_slope": 0.0}, [0.0, -0.0, INF, -0.0, NAN]),
    ("gelu", {}, [0.0, -0.0, INF, -0.0, NAN]),
    ("gelu", {"approximate": "tanh"}, [0.0, -0.0, INF, -0.0, NAN]),
    ("silu", {}, [0.0, -0.0, INF, -0.0, NAN]),
    ("hardswish", {}, [0.0, -0.0, INF, -0.0, NAN]),
    ("elu", {"alpha": 0.7}, [0.0, -0.0, INF, -0.7, NAN]),
    ("elu", {"alpha": 0.0}, [0.0, -0.0, INF, -0.0, NAN]),
]


@pytest.mark.parametrize("kind,kwargs,expected", SPECIAL_RULE, ids=[k + "".join(f"-{v}" for v in a.values()) for k, a, _ in SPECIAL_RULE])
def test_special_values_follow_the_written_rule(backend, device, kind, kwargs, expected):
    """+-0, +-inf and NaN through every activation and dtype, bit for bit (the sign of zero
    included). The inputs repeat past a vector's width, so vectorized and scalar code paths
    (the loop's remainder) both see them."""
    for dtype in DTYPES:
        x = torch.tensor(SPECIAL_INPUTS * 7 + [1.5, -2.5], dtype=dtype, device=device).view(1, -1)
        y, counts, nans = run(backend, x, kind, 0, kwargs)
        want = torch.tensor(expected * 7, dtype=dtype, device=device)
        assert_bitwise_equal(y[0, :-2], want)
        assert counts.tolist() == [3 * 7 + 1] and nans.tolist() == [7]


# Kinds whose formula branches at 0 or whose value there is a product with 0, with parameters of
# both signs: the sign of a zero output is torch's CPU kernels' (relu(-0.0) is -0.0, leaky_relu(-0.0)
# with a negative slope +0.0, elu(+-0.0) +-0.0 for any alpha) on every backend and device. Torch's
# CUDA elu differs for a negative alpha (alpha * +-0.0): the CPU's is the one the rule keeps.
SIGNED_ZERO_KINDS = [
    ("relu", {}),
    ("relu6", {}),
    ("leaky_relu", {"negative_slope": 0.1}),
    ("leaky_relu", {"negative_slope": -0.1}),
    ("leaky_relu", {"negative_slope": 0.0}),
    ("hardswish", {}),
    ("elu", {"alpha": 0.7}),
    ("elu", {"alpha": -0.5}),
    ("gelu", {}),
    ("gelu", {"approximate": "tanh"}),
    ("silu", {}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind,kwargs", SIGNED_ZERO_KINDS,
                         ids=[k + "".join(f"-{v}" for v in a.values()) for k, a in SIGNED_ZERO_KINDS])
def test_signed_zeros_match_torch(backend, device, kind, kwargs, dtype):
    """+-0 through the activation give torch's (CPU) bits on every backend, through both kernel
    layouts (channel-major rows and channels-last columns), past a vector's width."""
    x = torch.tensor([-0.0, 0.0] * 37, dtype=dtype, device=device)
    expected = TORCH_FN[kind](x.cpu(), **kwargs).to(device)
    assert (expected == 0).all()
    for view, cdim in ((x.view(1, -1), 0), (x.view(-1, 2), -1)):
        y, _, _ = run(backend, view, kind, cdim, kwargs)
        assert torch.equal(torch.signbit(y).flatten(), torch.signbit(expected)), (kind, kwargs)
        assert (y == 0).all()


def test_output_keeps_the_input_memory_format(backend, device):
    x = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    y, _, _ = run(backend, x, "relu", 1, {})
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_bitwise_equal(y, F.relu(x))


def test_counts_accumulate_across_calls(backend, device):
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    xs = [torch.randn(4, 3, 2, device=device) for _ in range(3)]
    with ek.ops.use_backend(backend):
        for x in xs:
            ek.ops.act_count(x, counts, "relu")
    assert counts.tolist() == sum((x >= 0).sum((0, 2)) for x in xs).tolist()


def test_identity_counts_only_and_returns_x(backend, device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    counts = torch.zeros(6, dtype=torch.int64, device=device)
    with ek.ops.use_backend(backend):
        y = ek.ops.act_count(x, counts, "identity", channel_dim=-1)
    assert y is x
    assert counts.tolist() == (x >= 0).sum(0).tolist()


@pytest.mark.parametrize("kind,kwargs,exact", KINDS, ids=KIND_IDS)
def test_gradient_is_the_activations_own(backend, device, kind, kwargs, exact):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device)
    x[0, 0, :3] = 0.0  # the kinks
    x_ours = x.clone().requires_grad_()
    x_torch = x.clone().requires_grad_()
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    with ek.ops.use_backend(backend):
        y = ek.ops.act_count(x_ours, counts, kind, **kwargs)
    grad = torch.randn_like(x)
    y.backward(grad)
    TORCH_FN[kind](x_torch, **kwargs).backward(grad)
    torch.testing.assert_close(x_ours.grad, x_torch.grad, rtol=0, atol=0)
    assert not counts.requires_grad


def test_output_is_exact_past_2_to_the_31_elements(backend, device):
    """64-bit offsets in the written output too: leaky_relu (slope 0.5) of the 2^31 + 2^20 float16
    elements, the counts and every output element checked. (The columns layout's offsets past
    2^31 are test_count_on's; here they would double a minute of CPU time.)"""
    x = two_channels_past_2_to_the_31(past_2_to_the_31_device(backend, device))
    inner = x.shape[2]
    y, counts, nans = run(backend, x, "leaky_relu", 1, {"negative_slope": 0.5})
    assert counts.tolist() == [inner - 1, inner - 2**20] and nans.tolist() == [1, 0]
    flat = y.view(-1)
    assert bool((flat[-(2**20):] == -0.5).all()) and bool(flat[123].isnan())
    assert int(torch.count_nonzero(flat)) == 2**20 + 1  # every other element is 0


def test_act_count_nan_raises_without_nan_counts():
    x = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="1 NaN values \\(channels 1\\)"):
        ek.ops.act_count(x, torch.zeros(2, dtype=torch.int64), "relu")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: ek.ops.count_on(torch.arange(6).view(2, 3)), TypeError, "x.float"),
        (lambda: ek.ops.count_on(torch.randn(2, 3), channel_dim=2), ValueError, "out of range"),
        (lambda: ek.ops.count_on(torch.tensor(1.0)), ValueError, "out of range"),
        (lambda: ek.ops.act_count(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64)), ValueError, "shape \\[3\\]"),
        (lambda: ek.ops.act_count(torch.randn(2, 3), torch.zeros(3)), ValueError, "int64"),
        (lambda: ek.ops.act_count(torch.randn(2, 3), torch.zeros(3, dtype=torch.int64), "tanh"), ValueError, "unknown activation kind"),
        (lambda: ek.ops.act_count(torch.randn(2, 3), torch.zeros(3, dtype=torch.int64), "relu", alpha=1.0), TypeError, "accepts: none"),
        (lambda: ek.ops.act_count(torch.randn(2, 3), torch.zeros(3, dtype=torch.int64), "gelu", approximate="x"), ValueError, "approximate"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_ops_pass_torch_library_opcheck():
    """Schema, fake kernels and compile-time dispatch of the registered ops."""
    x = torch.randn(2, 3, 4)
    counts, nans = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    torch.library.opcheck(torch.ops.easier_kernels.act_count.default, (x, counts, nans, "gelu", 1, 0.0))
    torch.library.opcheck(torch.ops.easier_kernels.count_on.default, (x, counts, nans, 1))


def test_works_under_torch_compile():
    def scored_block(x, counts, nans):
        return ek.ops.act_count(x * 2.0, counts, "relu", nan_counts=nans) + 1.0

    compiled = torch.compile(scored_block, fullgraph=True)
    x = torch.randn(4, 3, 5)
    counts, nans = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    y = compiled(x, counts, nans)
    torch.testing.assert_close(y, F.relu(x * 2.0) + 1.0)
    assert counts.tolist() == (x >= 0).sum((0, 2)).tolist()


@pytest.mark.parametrize("kind,kwargs,exact", KINDS, ids=KIND_IDS)
def test_cpp_on_large_inputs_across_chunks_tiles_and_thread_splits(kind, kwargs, exact):
    """Inputs of several MB: many counter tiles and cache chunks, row groups with remainders,
    the split over rows (batch 33) and over channels (batch 1), contiguous and channels_last."""
    gen = torch.Generator().manual_seed(3)
    inputs = [
        torch.randn(33, 67, 29, 31, generator=gen),
        torch.randn(33, 67, 29, 31, generator=gen).contiguous(memory_format=torch.channels_last),
        torch.randn(1, 1031, 45, 47, generator=gen),
        torch.randn(7, 301, 3073, generator=gen),
    ]
    inputs[0][5, 3, 2, :7] = float("nan")
    inputs[1][30, 60, 28, 20:] = float("inf")  # the rule imposed after ATen's chunks
    inputs[2][0, 1030, 44, :5] = float("-inf")
    inputs[3][6, 300, -3:] = float("inf")
    for x in inputs:
        cdim = -1 if x.dim() == 3 else 1
        y_ref, counts_ref, nans_ref = run("reference", x, kind, cdim, kwargs)
        y, counts, nans = run("cpp", x, kind, cdim, kwargs)
        assert torch.equal(counts, counts_ref) and torch.equal(nans, nans_ref)
        if exact:
            assert_bitwise_equal(y, y_ref)
        else:
            torch.testing.assert_close(y, y_ref, equal_nan=True)
