"""Backend selection: defaults, the context manager, the environment variable, clear errors."""

import pytest
import torch
from helpers import run_python

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


def run_with_env(code, **env):
    return run_python("-c", code, env_updates=env, drop_env=("TRITON_INTERPRET",))


def test_environment_variable_selects():
    code = (
        "import torch, easier_kernels as ek\n"
        "from easier_kernels.ops import backends\n"
        "print(backends.backend_name(torch.device('cpu')))\n"
        "with ek.ops.use_backend('cpp'):\n"  # the context manager wins over the environment
        "    print(backends.backend_name(torch.device('cpu')))\n"
    )
    out = run_with_env(code, EASIER_KERNELS_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "cpp"]


def test_the_selected_backend_really_runs(monkeypatch):
    calls = []
    real = backends.kernels("reference").count_on
    monkeypatch.setattr(backends.kernels("reference"), "count_on", lambda *a: (calls.append(1), real(*a)))
    ek.ops.count_on(torch.randn(2, 3))
    assert calls == []
    with ek.ops.use_backend("reference"):
        ek.ops.count_on(torch.randn(2, 3))
    assert calls == [1]


def test_unknown_or_unavailable_backends_are_clear_errors():
    with pytest.raises(ValueError, match="not available here; available:"):
        with ek.ops.use_backend("nope"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not available"):
            with ek.ops.use_backend("cuda"):
                pass
    if not torch.cuda.is_available():
        out = run_with_env("import torch, easier_kernels as ek; ek.ops.count_on(torch.randn(2, 3))", EASIER_KERNELS_BACKEND="cuda")
        assert out.returncode != 0
        assert "backend 'cuda' cannot run on cpu tensors" in out.stderr.strip().splitlines()[-1]
