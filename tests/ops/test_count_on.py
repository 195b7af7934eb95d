"""count_on: every backend against the plain-torch reference, bit for bit."""

import pytest
import torch
from helpers import DTYPES, random_cases, special_values

import easier_kernels as ek


def reference_counts(x, channel_dim):
    with ek.ops.use_backend("reference"):
        nans = torch.zeros(x.shape[channel_dim], dtype=torch.int64, device=x.device)
        return ek.ops.count_on(x, channel_dim, nan_counts=nans), nans


def case_budget(backend):
    # The Triton interpreter costs about 0.75 ms per program: keep its inputs small.
    return (24, 600) if backend == "triton" else (120, 6000)


def test_matches_reference_on_random_shapes_layouts_dtypes_and_specials(backend, device):
    count, max_numel = case_budget(backend)
    for name, x, cdim in random_cases(seed=1, count=count, max_numel=max_numel):
        x = x.to(device)
        expected, expected_nans = reference_counts(x, cdim)
        nans = torch.zeros_like(expected)
        with ek.ops.use_backend(backend):
            counts = ek.ops.count_on(x, cdim, nan_counts=nans)
        assert counts.dtype == torch.int64 and counts.shape == (x.shape[cdim],), name
        assert torch.equal(counts, expected), name
        assert torch.equal(nans, expected_nans), name


def test_reference_is_x_ge_zero_per_channel():
    x = torch.tensor([[0.0, -0.0, 1.0, -1.0], [float("inf"), float("-inf"), 2.0, 3.0]]).view(2, 2, 2)
    # channel 0 holds [0, -0, inf, -inf], channel 1 holds [1, -1, 2, 3]
    assert ek.ops.count_on(x, 1).tolist() == [3, 3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_negative_zero_count_as_on(backend, device, dtype):
    x = torch.tensor([[0.0, -0.0, -1e-30, 1e-30]], dtype=dtype, device=device)
    with ek.ops.use_backend(backend):
        counts = ek.ops.count_on(x, channel_dim=0)
    # -1e-30 underflows to -0 in float16 (on) and stays negative in the others (off)
    tiny_negative_on = int(dtype == torch.float16)
    assert counts.tolist() == [3 + tiny_negative_on]


def test_nan_is_never_silently_off(backend, device):
    x = torch.tensor([[1.0, float("nan")], [-1.0, float("nan")], [float("nan"), 2.0]], device=device)
    with ek.ops.use_backend(backend):
        with pytest.raises(ValueError, match="3 NaN values.*nan_counts"):
            ek.ops.count_on(x, channel_dim=1)
        nans = torch.zeros(2, dtype=torch.int64, device=device)
        counts = ek.ops.count_on(x, channel_dim=1, nan_counts=nans)
    assert counts.tolist() == [1, 1] and nans.tolist() == [1, 2]


def copies(fn) -> int:
    """How many tensor copies (aten::clone, from Python or C++) fn makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == "aten::clone")


def test_channels_last_and_tokens_need_no_copy(backend, device):
    """The fast layouts reach the kernel as the very same memory (no .contiguous() copy)."""
    x = torch.randn(3, 5, 4, 6, device=device)
    with ek.ops.use_backend(backend):
        assert copies(lambda: ek.ops.count_on(x.contiguous(memory_format=torch.channels_last), 1)) == 1  # that call's own
        assert copies(lambda: ek.ops.count_on(torch.randn(2, 7, 9, device=device), -1)) == 0
        assert copies(lambda: ek.ops.count_on(x.permute(0, 2, 3, 1), -1)) == 0
        assert copies(lambda: ek.ops.act_count(x.permute(0, 2, 3, 1), torch.zeros(5, dtype=torch.int64, device=device), "relu", -1)) == 0
        if backend != "reference":  # torch's reductions read any strides
            assert copies(lambda: ek.ops.count_on(x[..., ::2], 1)) == 1  # gapped: the documented slow path copies


def past_2_to_the_31_device(backend, device):
    """Where a backend's 2^31-element test runs: its own device, the reference on a CUDA GPU; or a
    skip for want of one (host memory here stays under ~10 GB)."""
    if backend == "triton" and device.type == "cpu":
        pytest.skip("needs a CUDA GPU: interpreted Triton (TRITON_INTERPRET=1) would take hours on 2^31 elements")
    if backend == "reference":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: the reference (plain torch) on the CPU would hold over 20 GB of host "
                        "memory past 2^31 elements (its int64 sums, its unfused chain)")
        return torch.device("cuda")
    return device


def two_channels_past_2_to_the_31(device):
    """[1, 2, 2^30 + 2^19] float16 (2^31 + 2^20 elements, 4.3 GB): zeros, a NaN early in channel
    0 and the last 2^20 elements, all past index 2^31, -1."""
    inner = 2**30 + 2**19
    x = torch.zeros(1, 2, inner, dtype=torch.float16, device=device)
    x[0, 1, -(2**20):] = -1.0
    x[0, 0, 123] = float("nan")
    return x


def test_count_is_exact_past_2_to_the_31_elements(backend, device):
    """64-bit indexing in every layout's kernel: channel-major rows, the same memory as tokens
    [inner, 2] (channel strided), and as [N, 2] rows with the channel fastest (columns)."""
    x = two_channels_past_2_to_the_31(past_2_to_the_31_device(backend, device))
    inner = x.shape[2]
    with ek.ops.use_backend(backend):
        nans = torch.zeros(2, dtype=torch.int64, device=x.device)
        assert ek.ops.count_on(x, 1, nan_counts=nans).tolist() == [inner - 1, inner - 2**20]
        assert nans.tolist() == [1, 0]
        tokens = x.view(2, inner).t()
        assert ek.ops.count_on(tokens, -1, nan_counts=nans.zero_()).tolist() == [inner - 1, inner - 2**20]
        # flat index i is channel i % 2 here: the 2^20 negatives split evenly, the NaN (123) is odd
        columns = x.view(-1, 2)
        assert ek.ops.count_on(columns, -1, nan_counts=nans.zero_()).tolist() == [inner - 2**19, inner - 2**19 - 1]
        assert nans.tolist() == [0, 1]


def test_special_values_in_every_dtype_match_reference(backend, device):
    gen = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        x = special_values((3, 4, 5, 6), dtype, gen).to(device)
        expected, expected_nans = reference_counts(x, 1)
        nans = torch.zeros_like(expected)
        with ek.ops.use_backend(backend):
            assert torch.equal(ek.ops.count_on(x, 1, nan_counts=nans), expected)
        assert torch.equal(nans, expected_nans)


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_subnormals_are_off(backend, device, dtype):
    """A kernel built with flush-to-zero would see tiny negatives as -0, i.e. on."""
    tiny = torch.finfo(dtype).smallest_normal / 4
    x = torch.tensor([[-tiny, tiny, -tiny, 0.0]], dtype=dtype, device=device)
    assert x[0, 0].item() < 0  # really subnormal, not flushed on creation
    with ek.ops.use_backend(backend):
        assert ek.ops.count_on(x, channel_dim=0).tolist() == [2]
