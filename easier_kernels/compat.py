"""Workarounds for the environment, kept in one place.

torchvision 0.28.0's wheel fails to import on a CPU-only torch 2.13.0 with "operator
torchvision::nms does not exist": its compiled ops do not load there, and its fake-tensor
registrations then find no nms/qnms. `import_torchvision()` imports torchvision as it is first;
only when that fails with this missing-operator error does it define the missing schemas (nms,
qnms) through torch.library, drop the half-imported torchvision modules and import again. On a
healthy install (torchvision registers these ops itself) it is a plain import and defines
nothing. Only when called: `import easier_kernels` never does this by itself.
"""

from __future__ import annotations

import importlib
import re
import sys

import torch

_MISSING_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP_ERROR = re.compile(r"operator torchvision::(\w+) does not exist")
_library = None  # must outlive the call: dropping it would remove the definitions again


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _missing_op(exc: BaseException) -> str | None:
    """The torchvision operator an import error says does not exist, if that is what it says."""
    match = _MISSING_OP_ERROR.search(str(exc))
    return match.group(1) if match else None


def _unusable(exc: BaseException) -> ImportError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ImportError(
        f"torchvision is not importable ({reason}); install the build paired with torch {torch.__version__} "
        "(for torch 2.13.0: pip install torchvision==0.28.0)"
    )


def _define_missing_ops() -> list[str]:
    """Defines those of nms/qnms that do not exist; returns their names."""
    global _library
    missing = [name for name in _MISSING_OPS if not _op_exists(name)]
    if missing:
        _library = _library or torch.library.Library("torchvision", "DEF")
        for name in missing:
            _library.define(_MISSING_OPS[name])
    return missing


def _forget_torchvision() -> None:
    """Drops what a failed import left in sys.modules (torchvision.extension, ...), so that the
    next import runs torchvision's __init__ from the start."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    """Import and return torchvision; where it fails only for want of nms/qnms, with those defined."""
    try:
        return importlib.import_module("torchvision")
    except ImportError as exc:
        raise _unusable(exc) from exc
    except RuntimeError as exc:
        missing = _missing_op(exc)
        if missing is None:
            raise  # not the missing-operator error: not ours to handle
        if missing not in _MISSING_OPS or not _define_missing_ops():
            raise _unusable(exc) from exc  # an op this workaround does not know, or defined and still missing
    _forget_torchvision()
    try:
        return importlib.import_module("torchvision")
    except (ImportError, RuntimeError) as exc:
        _forget_torchvision()
        raise _unusable(exc) from exc
