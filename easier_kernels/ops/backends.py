"""Which implementation runs: the only place that knows about backends.

Order of precedence: `use_backend(name)` (a context manager), then the environment variable
EASIER_KERNELS_BACKEND (read once, when easier_kernels is imported), then the fastest available
for the tensor's device.

The cpp backend's counting kernels (count_on, act_count) are compiled for several instruction
sets and run the best this CPU has; `use_cpu_isa(name)` or EASIER_KERNELS_CPU_ISA (read once, by
the extension) forces one, e.g. to check that each gives the same counts.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")
ENV_VAR = "EASIER_KERNELS_BACKEND"
CPU_ISAS = ("default", "avx2", "avx512")  # baseline first; avx512 means AVX-512 F, BW, DQ and VL
CPU_ISA_ENV_VAR = "EASIER_KERNELS_CPU_ISA"

# Fastest first, per device type; anything not listed for a device falls back to `reference`.
# CUDA: no GPU has measured triton against cuda yet (bench/RESULTS.md), so the default is the one
# whose kernels the test suite executes (Triton, through its interpreter) until one does.
_DEFAULT_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")}

# A plain module global, not a ContextVar: torch.compile reads it while tracing and guards on its
# value, so a function compiled under one backend recompiles under another. Process-wide.
_forced: str | None = None
_from_env = os.environ.get(ENV_VAR) or None  # os.environ costs ~2 us a lookup: read it once


@functools.lru_cache(maxsize=None)
def native_extension():
    """The compiled `easier_kernels._C`, or None when the package was installed without it."""
    try:
        from .. import _C
    except ImportError:
        return None
    return _C


def triton_interpreted() -> bool:
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
        if triton_interpreted():
            return ("cpu",)
        return ("cuda",) if torch.cuda.is_available() else ()
    raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ['reference', 'cpp']."""
    return [name for name in BACKENDS if devices_for(name)]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block: `with ek.ops.use_backend("reference"): ...`.
    Process-wide (every thread), and compiled functions recompile for it."""
    global _forced
    if name not in available_backends():
        raise ValueError(f"backend {name!r} is not available here; available: {available_backends()}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def cpu_isas() -> list[str]:
    """Instruction sets the cpp counting kernels can run with on this CPU, baseline first, e.g.
    ['default', 'avx2', 'avx512']; empty without the native extension."""
    ext = native_extension()
    return list(ext.cpu_isas()) if ext is not None else []


def cpu_isa() -> str | None:
    """The instruction set the cpp counting kernels run with now (None without the extension)."""
    ext = native_extension()
    return ext.cpu_isa() if ext is not None else None


_forced_isa: str | None = None


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """Run the cpp counting kernels with one instruction set inside a `with` block:
    `with ek.ops.use_cpu_isa("avx2"): ...`. Process-wide; the counts are the same on every ISA."""
    global _forced_isa
    if name not in CPU_ISAS:
        raise ValueError(f"unknown CPU ISA {name!r}; use one of {', '.join(CPU_ISAS)}")
    if name not in cpu_isas():
        raise ValueError(f"CPU ISA {name!r} is not available here; available: {cpu_isas()}")
    ext = native_extension()
    previous, _forced_isa = _forced_isa, name
    ext.set_cpu_isa(name)
    try:
        yield
    finally:
        _forced_isa = previous
        ext.set_cpu_isa(previous or "")


def backend_name(device: torch.device) -> str:
    """The backend that runs ops on tensors of `device`."""
    name = _forced or _from_env
    return _checked(name, device.type) if name else _default_backend(device.type)


# Both are constant for given arguments on a machine: torch.compile evaluates them once while
# tracing (what they read, importlib and torch.cuda, it cannot trace).
@torch.compiler.assume_constant_result
def _checked(name: str, device_type: str) -> str:
    if device_type not in devices_for(name):
        where = ", ".join(devices_for(name)) or "nowhere on this machine"
        raise RuntimeError(
            f"easier_kernels backend {name!r} cannot run on {device_type} tensors (it runs on: {where}); "
            f"pick another with ek.ops.use_backend(...) or {ENV_VAR}"
        )
    _backend_module(name)  # imported here, outside tracing, where torch.compile evaluates this
    return name


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _default_backend(device_type: str) -> str:
    order = _DEFAULT_ORDER.get(device_type, ("reference",))
    name = next(n for n in order if device_type in devices_for(n))
    _backend_module(name)  # imported here, outside tracing, where torch.compile evaluates this
    return name


def kernels(name: str, traced: bool = False):
    """A backend's `count_on`, `act_count` and `conv_block`, each taking its op's schema arguments
    (csrc/library.cpp): in eager, and when `traced` (torch.compile, export: registered ops only).
    cpp and cuda are the registered ops (native.py); triton runs its launchers in eager and its
    own ops when traced; reference is plain torch, traceable as it is."""
    module = _modules.get(name) or _backend_module(name)
    if name == "reference":
        return module
    return module.traced if traced else module.eager


_modules: dict = {}  # backend name -> its module, imported once (where the backend is decided)


def _backend_module(name: str):
    if name in ("cpp", "cuda"):
        from . import native as module
    elif name == "triton":
        from . import triton_ops as module
    elif name == "reference":
        from . import reference as module
    else:
        raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    _modules[name] = module
    return module


def kernels_for(x: torch.Tensor):
    """The kernels that run an op on x. Eager calls on plain tensors take a backend's eager entries
    (triton's launchers, the native ops entered from C++); tracing (torch.compile, export, fake or
    meta tensors) goes through registered ops, which is what those systems see."""
    direct = type(x) is torch.Tensor and (x.is_cpu or x.is_cuda) and not torch.compiler.is_compiling()
    return kernels(backend_name(x.device), not direct)
