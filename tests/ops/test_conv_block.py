"""conv_block: the fused pointwise/depthwise pair, every backend against the unfused reference."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_bitwise_equal
from test_count_on import past_2_to_the_31_device

import easier_kernels as ek

ACTIVATIONS = [("identity", {}), ("relu", {}), ("relu6", {}), ("hardswish", {}), ("gelu", {}), ("leaky_relu", {"negative_slope": 0.1})]


def unfused(x, w1, b1, w2, b2, pattern, stride, padding, residual, activation, kind_args):
    """The chain as separate torch convolutions: what the fused op must compute."""
    if pattern == "pw_dw":
        out = F.conv2d(F.conv2d(x, w1, b1), w2, b2, stride=stride, padding=padding, groups=w2.shape[0])
    else:
        out = F.conv2d(F.conv2d(x, w1, b1, stride=stride, padding=padding, groups=w1.shape[0]), w2, b2)
    if residual is not None:
        out = out + residual
    kind, param = ek.ops.kinds.resolve(activation, kind_args)
    return ek.ops.kinds.forward(out, kind, param)


def case(pattern, n, cin, cout, h, w, k, stride, padding, residual, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    x = rand(n, cin, h, w)
    if pattern == "pw_dw":
        w1, b1, w2, b2 = rand(cout, cin, 1, 1), rand(cout), rand(cout, 1, k, k), rand(cout)
    else:
        w1, b1, w2, b2 = rand(cin, 1, k, k), rand(cin), rand(cout, cin, 1, 1), rand(cout)
    ho, wo = ((s + 2 * padding - k) // stride + 1 for s in (h, w))
    r = rand(n, cout, ho, wo) if residual else None
    return [t.to(device) if t is not None else None for t in (x, w1, b1, w2, b2, r)]


SHAPES = [  # pattern, n, cin, cout, h, w, k, stride, padding
    ("pw_dw", 1, 5, 12, 7, 9, 3, 1, 1),
    ("pw_dw", 2, 8, 24, 11, 10, 3, 2, 1),
    ("pw_dw", 1, 16, 32, 9, 9, 5, 1, 2),
    ("pw_dw", 2, 6, 6, 8, 8, 1, 2, 0),
    ("pw_dw", 1, 4, 8, 6, 7, 3, 1, 0),
    ("dw_pw", 1, 12, 5, 7, 9, 3, 1, 1),
    ("dw_pw", 2, 24, 8, 11, 10, 3, 2, 1),
    ("dw_pw", 1, 32, 16, 9, 9, 5, 1, 2),
    ("dw_pw", 2, 20, 40, 6, 5, 3, 2, 2),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True])
def test_matches_the_unfused_convolutions(backend, device, shape, residual):
    pattern, *dims = shape
    for seed, (activation, kind_args) in enumerate(ACTIVATIONS):
        if backend == "triton" and seed % 2:  # the interpreter is slow: half the activations per shape
            continue
        x, w1, b1, w2, b2, r = case(pattern, *dims, residual, seed=seed, device=device)
        stride, padding = dims[6], dims[7]
        expected = unfused(x, w1, b1, w2, b2, pattern, stride, padding, r, activation, kind_args)
        with ek.ops.use_backend(backend):
            got = ek.ops.conv_block(x, w1, b1, w2, b2, pattern=pattern, stride=stride, padding=padding, residual=r,
                                    activation=activation, **kind_args)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), msg=activation)


@pytest.mark.parametrize("pattern", ["pw_dw", "dw_pw"])
def test_epilogue_follows_the_special_value_rule(backend, device, pattern):
    """A residual holding +-inf and NaN sends them through the epilogue's activation: every
    backend gives the reference's values there bit for bit (the rule, tests/ops/test_act_count.py)."""
    x, w1, b1, w2, b2, r = case(pattern, 1, 8, 8, 6, 7, 3, 1, 1, True, device=device)
    special = torch.zeros_like(r, dtype=torch.bool)
    special.view(-1)[::5] = True
    r[special] = torch.tensor([float("inf"), float("-inf"), float("nan")], device=device).repeat(r.numel())[: int(special.sum())]
    for activation, kind_args in ACTIVATIONS + [("silu", {}), ("elu", {"alpha": 0.5}), ("gelu", {"approximate": "tanh"})]:
        outputs = []
        for name in ("reference", backend):
            with ek.ops.use_backend(name):
                outputs.append(ek.ops.conv_block(x, w1, b1, w2, b2, pattern=pattern, padding=1, residual=r,
                                                 activation=activation, **kind_args))
        expected, got = outputs
        assert_bitwise_equal(got[special], expected[special])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected[~special].abs().max()), equal_nan=True)


@pytest.mark.parametrize("pattern", ["pw_dw", "dw_pw"])
def test_float64_is_exact_to_rounding_on_cpu(pattern):
    x, w1, b1, w2, b2, r = case(pattern, 2, 8, 16, 9, 9, 3, 2, 1, True, dtype=torch.float64)
    expected = unfused(x, w1, b1, w2, b2, pattern, 2, 1, r, "relu6", {})
    for backend in ("reference", "cpp"):
        with ek.ops.use_backend(backend):
            got = ek.ops.conv_block(x, w1, b1, w2, b2, pattern=pattern, stride=2, padding=1, residual=r, activation="relu6")
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern,cin,cout,h,stride", [("pw_dw", 24, 144, 56, 1), ("pw_dw", 16, 96, 112, 2),
                                                       ("dw_pw", 144, 24, 56, 1), ("dw_pw", 960, 160, 7, 1)])
def test_mobilenet_v2_shapes_on_cpu(pattern, cin, cout, h, stride):
    """MobileNetV2's real block shapes at 224 px (the C++ kernel tiles these)."""
    x, w1, b1, w2, b2, _ = case(pattern, 1, cin, cout, h, h, 3, stride, 1, False)
    expected = unfused(x, w1, b1, w2, b2, pattern, stride, 1, None, "relu6", {})
    got = ek.ops.conv_block(x, w1, b1, w2, b2, pattern=pattern, stride=stride, padding=1, activation="relu6")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_biases_may_be_none():
    x, w1, _, w2, _, _ = case("pw_dw", 1, 4, 8, 6, 6, 3, 1, 1, False)
    expected = unfused(x, w1, None, w2, None, "pw_dw", 1, 1, None, "identity", {})
    torch.testing.assert_close(ek.ops.conv_block(x, w1, None, w2, None, pattern="pw_dw", padding=1), expected)


def test_registered_op_traces_with_fake_tensors_compile_and_export():
    x, w1, b1, w2, b2, r = case("dw_pw", 2, 8, 4, 9, 9, 3, 2, 1, True)

    class Block(torch.nn.Module):
        def forward(self, x, r):
            return ek.ops.conv_block(x, w1, b1, w2, b2, pattern="dw_pw", stride=2, padding=1, residual=r, activation="relu")

    expected = Block()(x, r)
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in (x, w1.view(8, 3, 3), b1, w2.flatten(1), b2)]
    with mode:
        fake = torch.ops.easier_kernels.conv_block(*fakes, None, "dw_pw", [2, 2], [1, 1], "relu", 0.0)
    assert fake.shape == expected.shape
    exported = torch.export.export(Block(), (x, r))
    assert any("conv_block" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x, r), expected)
    torch.testing.assert_close(torch.compile(Block(), fullgraph=True)(x, r), expected)


@pytest.mark.parametrize("pattern", ["pw_dw", "dw_pw"])
def test_output_offsets_past_2_to_the_31(backend, device, pattern):
    """(n * Cout + o) * Ho * Wo past 2^31: one input channel to 2^15 + 16 output channels of
    256 x 256 (2^31 + 2^20 float32 outputs, 8.6 GB); the first channels and the last 16 (all past
    2^31) against the unfused convolutions of those channels alone."""
    cout, big = 2**15 + 16, past_2_to_the_31_device(backend, device)
    x, w1, b1, w2, b2, _ = case(pattern, 1, 1, cout, 256, 256, 1, 1, 0, False, device=big)
    with ek.ops.use_backend(backend):
        got = ek.ops.conv_block(x, w1, b1, w2, b2, pattern=pattern, activation="relu")
    assert got.shape == (1, cout, 256, 256)
    for channels in (slice(0, 2), slice(cout - 16, cout)):
        # pw_dw: each channel is its own chain; dw_pw: the one depthwise channel feeds every output
        if pattern == "pw_dw":
            parts = (w1[channels], b1[channels], w2[channels], b2[channels])
        else:
            parts = (w1, b1, w2[channels], b2[channels])
        expected = unfused(x, *parts, pattern, 1, 0, None, "relu", {})
        torch.testing.assert_close(got[:, channels], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_oracles_run_in_ieee_float32():
    """tests/conftest.py turns TF32 off for every test: torch's CUDA convolutions are then IEEE
    float32, fit to be an exactness oracle."""
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "pattern": "dw_dw"}, "pattern must be one of"),
    (lambda a: {**a, "x": a["x"][0]}, "4-D"),
    (lambda a: {**a, "x": a["x"].long()}, "floating-point"),
    (lambda a: {**a, "w1": a["w1"].expand(-1, -1, 3, 3)}, "pointwise weight"),
    (lambda a: {**a, "w2": a["w2"][:4]}, "must chain"),
    (lambda a: {**a, "b1": a["b1"][:3]}, "b1 has shape"),
    (lambda a: {**a, "stride": 0}, "stride must be >= 1"),
    (lambda a: {**a, "padding": (1, 2, 3)}, "padding must be an int or a pair"),
    (lambda a: {**a, "residual": torch.zeros(1, 8, 3, 3)}, "residual has shape"),
    (lambda a: {**a, "w2": a["w2"].double()}, "one dtype and device"),
    (lambda a: {**a, "x": a["x"][:, :, :1, :1], "padding": 0}, "does not fit"),
])
def test_bad_input_is_a_clear_error(change, match):
    x, w1, b1, w2, b2, _ = case("pw_dw", 1, 4, 8, 6, 6, 3, 1, 1, False)
    args = change({"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "pattern": "pw_dw", "stride": 1, "padding": 1})
    with pytest.raises((ValueError, TypeError), match=match):
        ek.ops.conv_block(args.pop("x"), args.pop("w1"), args.pop("b1"), args.pop("w2"), args.pop("b2"), **args)
