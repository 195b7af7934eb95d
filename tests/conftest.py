"""Shared test setup. Triton runs on the CPU only through its interpreter, and the variable must
be set before any @triton.jit is applied, so it is set here, before easier_kernels is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from easier_kernels.ops import BACKENDS, available_backends  # noqa: E402

# Why a backend may be missing here: only device-bound ones may skip; a missing cpp is a failure
# (tests/test_build.py), not a skip.
_MISSING = {
    "cuda": "the cuda backend needs a CUDA GPU and a CUDA build of the extension",
    "triton": "triton needs a CUDA GPU, or TRITON_INTERPRET=1 with triton installed",
}


# The device backends' cases carry the `gpu` marker: scripts/gpu_check.sh runs them with -m gpu.
@pytest.fixture(params=[pytest.param(b, marks=pytest.mark.gpu) if b in ("triton", "cuda") else b for b in BACKENDS])
def backend(request):
    name = request.param
    if name not in available_backends():
        if name in _MISSING:
            pytest.skip(_MISSING[name])
        pytest.fail(f"backend {name!r} is not available; was the extension built? (pip install --no-build-isolation .)")
    return name


@pytest.fixture
def device(backend):
    """The device a backend's tensors live on (triton on CPU when interpreted)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def ieee_float32():
    """Oracles in IEEE float32: on CUDA, torch runs float32 convolutions (cudnn) in TF32 by default,
    10-bit mantissas that an exactness test would mistake for a kernel's error. Restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
