"""Which implementation runs: the only place that knows about backends.

Order of precedence: `use_backend(name)` (a context manager), then the environment variable
EASIER_KERNELS_BACKEND (read once, when easier_kernels is imported), then the fastest available
for the tensor's device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import types

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")
ENV_VAR = "EASIER_KERNELS_BACKEND"

# Fastest first, per device type; anything not listed for a device falls back to `reference`.
# CUDA: no GPU has measured triton against cuda yet (bench/RESULTS.md), so the default is the one
# whose kernels the test suite executes (Triton, through its interpreter) until one does.
_DEFAULT_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("easier_kernels_backend", default=None)
_from_env = os.environ.get(ENV_VAR) or None  # os.environ costs ~2 us a lookup: read it once


@functools.lru_cache(maxsize=None)
def native_extension():
    """The compiled `easier_kernels._C`, or None when the package was installed without it."""
    try:
        from .. import _C
    except ImportError:
        return None
    return _C


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def devices_for(name: str) -> tuple[str, ...]:
    """Device types a backend can run on, on this machine (empty: not available)."""
    if name == "reference":
        return ("cpu", "cuda")
    if name == "cpp":
        return ("cpu",) if native_extension() is not None else ()
    if name == "cuda":
        ext = native_extension()
        return ("cuda",) if ext is not None and ext.has_cuda and torch.cuda.is_available() else ()
    if name == "triton":
        if not _triton_installed():
            return ()
        if _triton_interpreted():
            return ("cpu",)
        return ("cuda",) if torch.cuda.is_available() else ()
    raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ['reference', 'cpp']."""
    return [name for name in BACKENDS if devices_for(name)]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block: `with ek.ops.use_backend("reference"): ...`."""
    if name not in available_backends():
        raise ValueError(f"backend {name!r} is not available here; available: {available_backends()}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def backend_name(device: torch.device) -> str:
    """The backend that runs ops on tensors of `device`."""
    name = _forced.get() or _from_env
    if not name:
        return _default_backend(device.type)
    if device.type not in devices_for(name):
        where = ", ".join(devices_for(name)) or "nowhere on this machine"
        raise RuntimeError(
            f"easier_kernels backend {name!r} cannot run on {device.type} tensors (it runs on: {where}); "
            f"pick another with ek.ops.use_backend(...) or {ENV_VAR}"
        )
    return name


@functools.lru_cache(maxsize=None)
def _default_backend(device_type: str) -> str:
    order = _DEFAULT_ORDER.get(device_type, ("reference",))
    return next(n for n in order if device_type in devices_for(n))


@functools.lru_cache(maxsize=None)
def kernels(name: str):
    """The module-like object holding `count_on`, `act_count` and `conv_block` for a backend."""
    if name == "reference":
        from . import reference

        return reference
    if name == "triton":
        from . import triton_conv_block, triton_kernels

        return types.SimpleNamespace(count_on=triton_kernels.count_on, act_count=triton_kernels.act_count,
                                     conv_block=triton_conv_block.conv_block)
    from .native import NativeBackend

    return NativeBackend(native_extension(), "cpu" if name == "cpp" else "cuda")
