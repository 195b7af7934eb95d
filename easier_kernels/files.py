"""Files: written atomically, read back with one clear error. Shared by the prune loop, its report,
the fold's saved modules and the CLI."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import torch

__all__ = ["atomic_write", "load_file", "read_weights"]


def atomic_write(path, write: Callable) -> None:
    """`write(binary file)` into a temporary file beside `path`, fsync, then rename over `path`: a
    kill leaves either the old file or the new one, never a torn one. os.open (not mkstemp), so
    the umask sets the mode, not 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_file(path, file_format: str, written_by: str) -> dict:
    """A file of easier_kernels' {format, record, state_dict} kind, read with weights_only=True;
    one clear error when it is missing, torn or of another kind."""
    saved = read_weights(path)
    if not isinstance(saved, dict) or saved.get("format") != file_format:
        raise ValueError(f"{path} is not of the kind expected here (format {file_format}); pass a file from {written_by}")
    return saved


def read_weights(path):
    """What torch.save wrote to `path`, read with weights_only=True (on the CPU); one clear error
    when it is missing or torn."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as exc:
        raise ValueError(f"{path} is not a readable easier_kernels file ({type(exc).__name__}); was it fully written?") from exc
