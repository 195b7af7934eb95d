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


@pytest.fixture(scope="session")
def transformers():
    """Hugging Face transformers (the hf extra), or the test skipped saying how to install it."""
    from easier_kernels.compat import import_torchvision

    import_torchvision()
    return pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")


@pytest.fixture
def tiny_gpt2(transformers):
    """A 2-block, d=32 GPT-2 causal LM of 64 token ids, random init (seed 0), in eval mode."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()
