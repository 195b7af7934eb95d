"""Build of easier_kernels and its native extension `easier_kernels._C`.

The extension is compiled against the torch that is already installed, so install with
`pip install --no-build-isolation .` (as flash-attn and other PyTorch extensions do). The CUDA
kernels are added only where that torch was built with CUDA and nvcc is present.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "easier_kernels: torch is not importable at build time; install torch first "
        "(pip install torch==2.13.0), then run: pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("EASIER_KERNELS_NO_CUDA", "0") != "1"
    )
    if not with_cuda:
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
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["easier_kernels", "easier_kernels.*"]),
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension},
)
