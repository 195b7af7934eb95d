"""The cpp backend's counting kernels on each instruction set this CPU has (`ops.use_cpu_isa`):
counts, NaN counts and act_count's y bit for bit against the reference backend, through both
kernel loops (per-channel runs, column tiles), tails and special values; and the ISA switch."""

import os

import pytest
import torch
from helpers import DTYPES, assert_bitwise_equal, run_python, special_values

import easier_kernels as ek
from easier_kernels.ops.backends import CPU_ISA_ENV_VAR, CPU_ISAS

# (name, shape, layout, channel_dim): each loop of csrc/counting_cpu.h with lengths that are no
# multiple of any vector width, so the vector loops' tails run too.
CASES = [
    ("runs", (3, 5, 17, 19), "contiguous", 1),  # H*W = 323 >= 256: per-channel runs
    ("long-runs", (2, 3, 33, 40), "contiguous", 1),  # 1320: several 1 KB blocks, then a tail
    ("tiles", (5, 70, 11, 13), "contiguous", 1),  # H*W = 143: two column tiles per row, 4 + 1 rows
    ("small-slabs", (7, 6, 5, 3), "contiguous", 1),  # slabs grouped into one wide row
    ("channels-last", (3, 37, 9, 11), "channels_last", 1),
    ("tokens", (2, 33, 300), "contiguous", -1),
    ("matrix", (37, 1000), "contiguous", 1),
    ("split-channels-runs", (1, 9, 20, 30), "contiguous", 1),  # outer = 1: threads split channels
    ("split-channels-tiles", (1, 40, 7, 7), "contiguous", 1),
]


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    """Runs the test with the cpp kernels forced to one ISA; skips the ones this CPU lacks."""
    if request.param not in ek.ops.cpu_isas():
        pytest.skip(f"this CPU cannot run {request.param} (it runs {ek.ops.cpu_isas()})")
    with ek.ops.use_cpu_isa(request.param):
        yield request.param


def inputs(seed):
    """(description, x, channel_dim) for every case and dtype: once with special values (+-0,
    +-inf, NaN) sprinkled in, once plain normals (the loops' path that never recounts)."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape, layout, cdim in CASES:
        for dtype in DTYPES:
            for specials in (True, False):
                x = special_values(shape, dtype, gen) if specials else torch.randn(shape, generator=gen).to(dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                yield f"{name}-{str(dtype)[6:]}-{'specials' if specials else 'plain'}", x, cdim


def counts_with(backend, x, cdim):
    nans = torch.zeros(x.shape[cdim], dtype=torch.int64)
    with ek.ops.use_backend(backend):
        return ek.ops.count_on(x, cdim, nan_counts=nans), nans


def act_count_with(backend, x, cdim, kind, kwargs):
    counts = torch.zeros(x.shape[cdim], dtype=torch.int64)
    nans = torch.zeros_like(counts)
    with ek.ops.use_backend(backend):
        y = ek.ops.act_count(x, counts, kind, cdim, nan_counts=nans, **kwargs)
    return y, counts, nans


def test_count_on_matches_reference(isa):
    for name, x, cdim in inputs(seed=0):
        counts, nans = counts_with("cpp", x, cdim)
        expected, expected_nans = counts_with("reference", x, cdim)
        assert torch.equal(counts, expected), (isa, name)
        assert torch.equal(nans, expected_nans), (isa, name)


def test_a_lone_nan_and_inf_are_counted_wherever_they_sit(isa):
    """One NaN and one -inf in an otherwise finite tensor (first, middle and last in memory):
    only the block holding them is recounted, and the NaN lands in its own channel."""
    gen = torch.Generator().manual_seed(3)
    for name, shape, layout, cdim in CASES:
        base = torch.randn(shape, generator=gen)
        base = base.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else base
        n = base.numel()
        for index in (0, n // 2, n - 1):
            x = base.clone()  # keeps the memory format
            memory = x.as_strided((n,), (1,))  # x's elements in memory order
            memory[index] = float("nan")
            memory[(index + 7) % n] = float("-inf")
            counts, nans = counts_with("cpp", x, cdim)
            expected, expected_nans = counts_with("reference", x, cdim)
            assert torch.equal(counts, expected) and torch.equal(nans, expected_nans), (isa, name, index)
            assert int(nans.sum()) == 1


def test_tensors_past_the_cache_size_take_the_prefetching_path_exactly(isa):
    """A tensor over 16 MiB (counting_cpu.h's kCachedBytes) is counted with prefetches ahead of
    the runs: the same counts, NaNs and relu y as the reference, specials near both ends."""
    x = torch.randn(2, 33, 256, 260, generator=torch.Generator().manual_seed(5))  # 17.4 MB float32
    memory = x.view(-1)
    memory[[0, 1000, memory.numel() // 2, memory.numel() - 1]] = torch.tensor([float("nan"), -0.0, float("inf"), float("nan")])
    assert x.numel() * x.element_size() > 16 << 20
    counts, nans = counts_with("cpp", x, 1)
    expected, expected_nans = counts_with("reference", x, 1)
    assert torch.equal(counts, expected) and torch.equal(nans, expected_nans) and int(nans.sum()) == 2
    y, counts, nans = act_count_with("cpp", x, 1, "relu", {})
    y_ref, counts_ref, nans_ref = act_count_with("reference", x, 1, "relu", {})
    assert torch.equal(counts, counts_ref) and torch.equal(nans, nans_ref)
    assert_bitwise_equal(y, y_ref)


# The kinds computed inside the counting loop (exact against the reference) and gelu, whose y
# comes from ATen chunk by chunk after counting (its counts and special-value patch are ours).
EXACT_KINDS = [("relu", {}), ("relu6", {}), ("leaky_relu", {"negative_slope": 0.1})]


@pytest.mark.parametrize("kind,kwargs", EXACT_KINDS, ids=[k for k, _ in EXACT_KINDS])
def test_act_count_matches_reference(isa, kind, kwargs):
    for name, x, cdim in inputs(seed=1):
        y, counts, nans = act_count_with("cpp", x, cdim, kind, kwargs)
        y_ref, counts_ref, nans_ref = act_count_with("reference", x, cdim, kind, kwargs)
        assert torch.equal(counts, counts_ref) and torch.equal(nans, nans_ref), (isa, name)
        assert y.stride() == x.stride(), (isa, name)
        assert_bitwise_equal(y, y_ref)


@pytest.mark.parametrize("kind,kwargs", [("hardswish", {}), ("gelu", {})], ids=["hardswish", "gelu"])
def test_act_count_is_the_same_on_every_isa(isa, kind, kwargs):
    """Kinds whose y may differ from torch's by rounding: each ISA's y is the baseline's, bit
    for bit, and the counts are the reference's."""
    for name, x, cdim in inputs(seed=2):
        y, counts, nans = act_count_with("cpp", x, cdim, kind, kwargs)
        with ek.ops.use_cpu_isa("default"):
            y_default, _, _ = act_count_with("cpp", x, cdim, kind, kwargs)
        _, counts_ref, nans_ref = act_count_with("reference", x, cdim, kind, kwargs)
        assert torch.equal(counts, counts_ref) and torch.equal(nans, nans_ref), (isa, name)
        assert_bitwise_equal(y, y_default)


def test_isas_listed_and_best_by_default():
    isas = ek.ops.cpu_isas()
    assert isas[0] == "default" and isas == [name for name in CPU_ISAS if name in isas]
    if not os.environ.get(CPU_ISA_ENV_VAR):
        assert ek.ops.cpu_isa() == isas[-1]


def test_use_cpu_isa_forces_and_restores():
    before = ek.ops.cpu_isa()
    with ek.ops.use_cpu_isa("default"):
        assert ek.ops.cpu_isa() == "default"
        with ek.ops.use_cpu_isa(ek.ops.cpu_isas()[-1]):
            assert ek.ops.cpu_isa() == ek.ops.cpu_isas()[-1]
        assert ek.ops.cpu_isa() == "default"
    assert ek.ops.cpu_isa() == before


def test_unknown_or_missing_isa_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^unknown CPU ISA 'avx9'; use one of default, avx2, avx512$"):
        with ek.ops.use_cpu_isa("avx9"):
            pass
    for name in [name for name in CPU_ISAS if name not in ek.ops.cpu_isas()]:
        with pytest.raises(ValueError, match=rf"^CPU ISA '{name}' is not available here; available: \["):
            with ek.ops.use_cpu_isa(name):
                pass


def test_environment_variable_selects_and_a_bad_value_fails_in_one_line():
    """One process (the variable is read on first use): a value naming a missing ISA (an
    unknown one where this CPU has them all) fails every count in one line until it is fixed;
    use_cpu_isa wins over it; the fixed value then selects."""
    missing = [name for name in CPU_ISAS if name not in ek.ops.cpu_isas()]
    bad = missing[0] if missing else "avx9"
    code = (
        "import os, torch, easier_kernels as ek\n"
        "try:\n"
        "    ek.ops.count_on(torch.randn(2, 3))\n"
        "except RuntimeError as error:\n"
        "    print(str(error).strip())\n"
        "with ek.ops.use_cpu_isa('default'):\n"
        "    print(ek.ops.cpu_isa(), int(ek.ops.count_on(torch.ones(2, 3)).sum()))\n"
        f"os.environ['{CPU_ISA_ENV_VAR}'] = 'default'\n"
        "print(ek.ops.cpu_isa(), int(ek.ops.count_on(torch.ones(2, 3)).sum()))\n"
    )
    out = run_python("-c", code, env_updates={CPU_ISA_ENV_VAR: bad}, drop_env=("TRITON_INTERPRET",))
    assert out.returncode == 0, out.stderr
    error, forced, selected = out.stdout.strip().splitlines()
    why = f"CPU ISA '{bad}' ({CPU_ISA_ENV_VAR}) is not supported" if missing else f"unknown CPU ISA 'avx9' ({CPU_ISA_ENV_VAR})"
    assert why in error, error
    assert forced == "default 6" and selected == "default 6"
