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
