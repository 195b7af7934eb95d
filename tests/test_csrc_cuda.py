"""The CUDA sources compile on their own with nvcc for sm_80 and sm_90 (CI has no GPU to run
them, but this proves they build); GPU runs are in tests/ops with the `cuda` backend."""

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_SOURCES = sorted((Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))


def test_there_are_cuda_sources():
    names = {p.name for p in CUDA_SOURCES}
    assert {"count_on_cuda.cu", "act_count_cuda.cu", "conv_block_cuda.cu"} <= names


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_alone(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed on this machine")
    cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", str(source), "-o", str(tmp_path / "out.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


def test_cuda_registrations_compile_against_torch_headers(tmp_path):
    """csrc/cuda/bindings_cuda.cpp (the ops' CUDA kernels registered with TORCH_LIBRARY_IMPL) is
    host C++ built only where torch has CUDA: compile it here for syntax and types against this
    torch's headers. A CPU torch lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h);
    an empty stand-in is enough for a syntax check."""
    import runpy

    from torch.utils.cpp_extension import include_paths

    root = Path(__file__).resolve().parents[1]
    cuda_home = runpy.run_path(str(root / "setup.py"), run_name="setup_py_under_test")["find_cuda_home"]()
    compiler = shutil.which("c++") or shutil.which("g++")
    if cuda_home is None or compiler is None:
        pytest.skip("nvcc and a C++ compiler are needed to check the CUDA registrations")
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path}", f"-I{cuda_home}/include", f"-I{root / 'csrc'}"]
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-DEK_WITH_CUDA", *includes, str(root / "csrc" / "cuda" / "bindings_cuda.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
