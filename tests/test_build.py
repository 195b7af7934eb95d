"""The build contract: the extension is there, the package works without it, and setup.py
refuses cleanly where torch cannot be imported (plain `pip install .` with build isolation)."""

import os
import re
import runpy
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import run_python

import easier_kernels as ek

ROOT = Path(__file__).resolve().parents[1]


def native_kernel_file(op: str, key: str) -> str | None:
    """The source file that registered op's kernel for a dispatch key (None: no kernel)."""
    dump = torch._C._dispatch_dump(f"easier_kernels::{op}")
    line = next((line for line in dump.splitlines() if line.startswith(f"{key}: registered at ")), None)
    return None if line is None else line.split("registered at ", 1)[1].split(":", 1)[0]


def test_the_native_extension_is_built_and_registers_the_cpu_kernels():
    from easier_kernels import _C  # noqa: F401

    assert "cpp" in ek.ops.available_backends()
    for op in ("count_on", "act_count", "conv_block"):
        assert native_kernel_file(op, "CPU").endswith(f"csrc/{op}_cpu.cpp")


def test_the_package_works_without_the_extension():
    code = (
        "import sys; sys.modules['easier_kernels._C'] = None\n"  # makes `from .. import _C` fail
        "import torch, easier_kernels as ek\n"
        "assert ek.ops.available_backends() == ['reference'], ek.ops.available_backends()\n"
        "x = torch.tensor([[1.0, -1.0], [0.0, -2.0]])\n"
        "c = torch.zeros(2, dtype=torch.int64)\n"
        "y = ek.ops.act_count(x, c, 'relu')\n"
        "assert c.tolist() == [2, 0] and y.tolist() == [[1.0, 0.0], [0.0, 0.0]]\n"
        "print('ok')"
    )
    out = run_python("-c", code, drop_env=("TRITON_INTERPRET", "EASIER_KERNELS_BACKEND"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_setup_py_without_torch_stops_with_one_clear_line():
    code = (
        "import sys, runpy; sys.modules['torch'] = None\n"
        "sys.argv = ['setup.py', '--name']\n"
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    out = run_python("-c", code, cwd=ROOT)
    assert out.returncode == 1
    message = out.stderr.strip().splitlines()
    assert len(message) == 1, out.stderr
    assert "install torch first" in message[0] and "--no-build-isolation" in message[0]


def test_build_requirements_never_pull_torch():
    text = (ROOT / "pyproject.toml").read_text()
    build_system = text.split("[build-system]", 1)[1].split("\n[", 1)[0]
    requires = next(line for line in build_system.splitlines() if line.startswith("requires"))
    assert "setuptools" in requires and "torch" not in requires.lower()


@pytest.mark.gpu
def test_cuda_kernels_are_built_where_torch_has_cuda_and_nvcc_is_here():
    """The newest torch's CUDA build is checked by scripts/check_torch_range.sh, which runs this."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} has no CUDA: only the CPU kernels are built")
    if os.environ.get("EASIER_KERNELS_NO_CUDA") == "1":
        pytest.skip("EASIER_KERNELS_NO_CUDA=1 builds the CPU kernels only")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no nvcc here: the CUDA kernels are built only where nvcc is")
    from easier_kernels import _C

    assert _C.has_cuda
    for op in ("count_on", "act_count", "conv_block"):
        assert native_kernel_file(op, "CUDA").endswith("csrc/cuda/bindings_cuda.cpp")


def test_setup_py_sets_no_language_standard():
    """torch's BuildExtension picks the standard its headers need (C++20 from torch 2.14): a
    hard-coded -std breaks the build on the newest torch."""
    assert "-std" not in (ROOT / "setup.py").read_text()


def fake_toolkit(folder: Path, headers: bool) -> Path:
    """A CUDA toolkit folder whose bin/nvcc reports its location as the real nvcc does, and a
    launcher script elsewhere (as /usr/local/bin/nvcc is on our machines). Returns the launcher's folder."""
    (folder / "toolkit" / "bin").mkdir(parents=True)
    real = folder / "toolkit" / "bin" / "nvcc"
    real.write_text(f"#!/bin/sh\necho '#$ _HERE_={real.parent}' >&2\n")
    if headers:
        (folder / "toolkit" / "include").mkdir()
        (folder / "toolkit" / "include" / "cuda_runtime.h").write_text("")
    (folder / "launcher").mkdir()
    launcher = folder / "launcher" / "nvcc"
    launcher.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    for script in (real, launcher):
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "launcher"


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions, without running setup(); no CUDA_HOME/CUDA_PATH set."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(variable, raising=False)
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_py_under_test")


def test_setup_py_finds_cuda_headers_through_a_launcher_script(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_toolkit(tmp_path, headers=True)))
    assert setup_py["find_cuda_home"](fallbacks=()) == str(tmp_path / "toolkit")


def test_setup_py_names_what_to_set_when_cuda_headers_are_missing(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_toolkit(tmp_path, headers=False)))
    with pytest.raises(SystemExit) as stop:
        setup_py["find_cuda_home"](fallbacks=())
    message = str(stop.value)
    assert "\n" not in message and "CUDA_HOME" in message and "EASIER_KERNELS_NO_CUDA=1" in message


def test_setup_py_respects_cuda_home_and_builds_cpu_only_without_nvcc(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc
    assert setup_py["find_cuda_home"](fallbacks=()) is None
    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")
    assert setup_py["find_cuda_home"](fallbacks=()) == "/opt/my-cuda"


def test_installed_test_extras_are_in_their_declared_ranges():
    """What README command (2) installed (the test and onnx extras) is inside the ranges
    pyproject.toml declares."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    lines = [line for line in text.splitlines() if line.startswith(("test = [", "onnx = ["))]
    requirements = [Requirement(r) for line in lines for r in re.findall(r'"([^"]+)"', line)]
    assert {r.name for r in requirements} >= {"pytest", "pytest-benchmark", "triton", "onnx", "onnxruntime"}
    for requirement in requirements:
        assert version(requirement.name) in requirement.specifier, f"{requirement.name} {version(requirement.name)} outside {requirement}"
