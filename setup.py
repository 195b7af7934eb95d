"""Build of easier_kernels and its native extension `easier_kernels._C`.

The extension is compiled against the torch that is already installed, so install with
`pip install --no-build-isolation .` (as flash-attn and other PyTorch extensions do). The CUDA
kernels are added only where that torch was built with CUDA and nvcc is present. No language
standard is set here: torch's BuildExtension picks the one its headers need (C++17 for torch
2.13, C++20 for 2.14).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    sys.exit(
        "easier_kernels: torch is not importable at build time; install torch first "
        "(pip install torch==2.13.0), then run: pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def has_cuda_headers(folder):
    return folder is not None and os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h"))


def nvcc_toolkit():
    """The toolkit folder of the nvcc on PATH, as nvcc itself reports it: a launcher script in
    /usr/local/bin makes torch guess /usr/local, which holds no CUDA headers."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.dirname(match.group(1).strip()) if match else os.path.dirname(os.path.dirname(nvcc))


def find_cuda_home(fallbacks=("/usr/local/cuda",)):
    """CUDA_HOME / CUDA_PATH when set; else the first of nvcc's own toolkit and the fallbacks
    that holds CUDA's headers; None when there is no nvcc. Exits with one line when nvcc is
    there but its headers are not."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    if shutil.which("nvcc") is None:
        return None
    for folder in (nvcc_toolkit(), *fallbacks):
        if has_cuda_headers(folder):
            return folder
    sys.exit(
        "easier_kernels: nvcc is on PATH but CUDA's headers (include/cuda_runtime.h) were not found next to it; "
        "set CUDA_HOME to the CUDA toolkit's folder, or EASIER_KERNELS_NO_CUDA=1 to build the CPU kernels only"
    )


def cuda_wanted():
    return torch.version.cuda is not None and os.environ.get("EASIER_KERNELS_NO_CUDA", "0") != "1"


def native_extension():
    # torch.utils.cpp_extension reads CUDA_HOME once, when imported: decide it first.
    cuda_home = find_cuda_home() if cuda_wanted() else None
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]
    if cuda_home is None:
        return CppExtension(
            "easier_kernels._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    # No --use_fast_math: flushing denormals to zero would turn tiny negatives into "on".
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    return CUDAExtension(
        "easier_kernels._C",
        cpu_sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("EK_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )


if __name__ == "__main__":
    extension = native_extension()  # first: it decides CUDA_HOME before cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["easier_kernels", "easier_kernels.*"]),
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension},
    )
