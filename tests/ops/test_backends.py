"""Backend selection: defaults, the context manager, the environment variable, clear errors."""

import pytest
import torch

import easier_kernels as ek
from easier_kernels.ops import backends


def test_reference_and_cpp_are_always_available_here():
    assert ek.ops.available_backends()[:2] == ["reference", "cpp"]


def test_default_on_cpu_is_the_cpp_kernel():
    assert backends.backend_name(torch.device("cpu")) == "cpp"


def test_use_backend_forces_and_restores():
    with ek.ops.use_backend("reference"):
        assert backends.backend_name(torch.device("cpu")) == "reference"
        with ek.ops.use_backend("cpp"):
            assert backends.backend_name(torch.device("cpu")) == "cpp"
        assert backends.backend_name(torch.device("cpu")) == "reference"
    assert backends.backend_name(torch.device("cpu")) == "cpp"


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv("EASIER_KERNELS_BACKEND", "reference")
    assert backends.backend_name(torch.device("cpu")) == "reference"
    with ek.ops.use_backend("cpp"):  # the context manager wins over the environment
        assert backends.backend_name(torch.device("cpu")) == "cpp"


def test_the_selected_backend_really_runs(monkeypatch):
    calls = []
    real = backends.kernels("reference").count_on
    monkeypatch.setattr(backends.kernels("reference"), "count_on", lambda *a: (calls.append(1), real(*a)))
    ek.ops.count_on(torch.randn(2, 3))
    assert calls == []
    with ek.ops.use_backend("reference"):
        ek.ops.count_on(torch.randn(2, 3))
    assert calls == [1]


def test_unknown_or_unavailable_backends_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="not available here; available:"):
        with ek.ops.use_backend("nope"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not available"):
            with ek.ops.use_backend("cuda"):
                pass
    monkeypatch.setenv("EASIER_KERNELS_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
            ek.ops.count_on(torch.randn(2, 3))
