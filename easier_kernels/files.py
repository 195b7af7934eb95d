"""Files: written atomically, read back with one clear error. Shared by the prune loop, its report,
the fold's saved modules and the CLI."""

from __future__ import annotations

import os
import pickle
import re
import uuid
from pathlib import Path
from typing import Callable

import torch

__all__ = ["atomic_write", "load_file", "read_weights", "why_unreadable", "unwritable"]


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
        raise ValueError(f"{path} is not a readable easier_kernels file: {why_unreadable(path, exc)}") from exc


_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")  # (torch colours some of its messages)


def why_unreadable(path, exc: Exception) -> str:
    """Why torch.load(path, weights_only=True) raised `exc`, in words that say what the file is."""
    message = _ESCAPES.sub("", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in message.lower():
        found = re.search(r"GLOBAL (\S+)", message)
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds pickled Python objects{what}, not only tensors; they are never loaded, as loading them "
                "can run code: save tensors only, e.g. torch.save(model.state_dict(), path)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as error:
        return f"it cannot be opened ({error.strerror})"
    if not head:
        return "it is empty; was it fully written?"
    if head == b"PK\x03\x04" or head[0] == 0x80:  # a zip archive (torch.save since 1.6), or a pickle (before)
        return "it is truncated or damaged; was it fully written?"
    return "it is not a file torch.save wrote"


def unwritable(path) -> Path | None:
    """The folder that keeps `path` from being written (created, or replaced by a rename beside
    it): its nearest existing ancestor (itself for a folder), where this process may not create
    files; None where it may."""
    folder = Path(path).absolute()
    while not folder.is_dir():  # a file's folder, or the folder a missing path would be created in
        if folder.parent == folder:
            return folder
        folder = folder.parent
    return None if os.access(folder, os.W_OK | os.X_OK) else folder
