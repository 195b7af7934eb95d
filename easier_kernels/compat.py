"""Workarounds for the environment, kept in one place.

torchvision 0.28.0's wheel expects its compiled ops to exist and fails to import on a CPU-only
torch 2.13.0 with "operator torchvision::nms does not exist". `import_torchvision()` defines the
two missing schemas (nms, qnms) through torch.library first, only when they are missing, and
only when called: `import easier_kernels` never does this by itself.
"""

from __future__ import annotations

import importlib
import sys

import torch

_MISSING_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # must outlive the call: dropping it would remove the definitions again


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def import_torchvision():
    """Import and return torchvision, defining its missing ops first where needed."""
    global _library
    if "torchvision" not in sys.modules:
        missing = [name for name in _MISSING_OPS if not _op_exists(name)]
        if missing:
            _library = _library or torch.library.Library("torchvision", "DEF")
            for name in missing:
                _library.define(_MISSING_OPS[name])
    try:
        return importlib.import_module("torchvision")
    except ImportError as exc:
        raise ImportError(
            f"torchvision is not importable ({exc}); install the build paired with torch {torch.__version__} "
            "(for torch 2.13.0: pip install torchvision==0.28.0)"
        ) from exc
