"""The CUDA sources compile on their own with nvcc for sm_80 and sm_90 (CI has no GPU to run
them, but this proves they build); GPU runs are in tests/ops with the `cuda` backend."""

import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def cuda_home():
    """The CUDA toolkit setup.py would build with (None: no nvcc here)."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_py_under_test")["find_cuda_home"]()


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
    from torch.utils.cpp_extension import include_paths

    root, toolkit = ROOT, cuda_home()
    compiler = shutil.which("c++") or shutil.which("g++")
    if toolkit is None or compiler is None:
        pytest.skip("nvcc and a C++ compiler are needed to check the CUDA registrations")
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path}", f"-I{toolkit}/include", f"-I{root / 'csrc'}"]
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-DEK_WITH_CUDA", *includes, str(root / "csrc" / "cuda" / "bindings_cuda.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_count_kernels_pass_the_cpu_simulation(tmp_path):
    """csrc/cuda/counting_cuda.cuh's kernels (the real source) run in a SIMT emulator on the CPU
    (tests/cuda_sim: every thread a fiber, warp intrinsics and barriers checked for convergence,
    every load and store checked for bounds and alignment): counts equal a per-element reference,
    every element of x is read once and of y written once, on many shapes, layouts, dtypes,
    misalignments and tensors past 2^31 and 2^32 elements. What a GPU run must still check:
    speed, and the device-only instructions (redux.sync, __ldg)."""
    root, toolkit = ROOT, cuda_home()
    compiler = shutil.which("g++")
    if toolkit is None or compiler is None:
        pytest.skip("the simulation needs CUDA's headers (cuda_fp16.h, with nvcc) and g++")
    sim = root / "tests" / "cuda_sim"
    binary = tmp_path / "sim"
    build = subprocess.run([compiler, "-std=c++17", "-O2", f"-I{toolkit}/include", f"-I{root / 'csrc'}", "-include",
                            str(sim / "sim_cuda.h"), str(sim / "sim_main.cpp"), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary), "quick"], capture_output=True, text=True)
    assert run.returncode == 0 and "FAILURES: 0" in run.stdout, (run.stdout + run.stderr)[-3000:]
