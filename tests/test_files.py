"""files: what an unreadable file is said to be, and which folder keeps a path from being written."""

import os

import pytest
import torch

from easier_kernels import files


class _Code:
    def __reduce__(self):  # (never run: weights_only refuses it)
        return (os.system, ("exit 1",))


def _written(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize("content, says", [
    ({"w": _Code()}, "it holds pickled Python objects (posix.system), not only tensors; they are never loaded"),
    (b"", "it is empty; was it fully written?"),
    (b"hello, not weights\n", "it is not a file torch.save wrote"),
    ("torn", "it is truncated or damaged; was it fully written?"),
])
def test_an_unreadable_file_is_said_to_be_what_it_is(tmp_path, content, says):
    path = tmp_path / "f.pt"
    if content == "torn":
        whole = _written(path, {"w": torch.zeros(1000)}).read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    else:
        _written(path, content)
    with pytest.raises(ValueError) as raised:
        files.read_weights(path)
    message = str(raised.value)
    assert message.startswith(f"{path} is not a readable easier_kernels file: {says}"), message
    assert "\n" not in message and "\x1b" not in message


def test_unwritable_names_the_nearest_existing_folder(tmp_path, monkeypatch):
    assert files.unwritable(tmp_path / "new" / "deeper" / "file.pt") is None
    denied = []
    monkeypatch.setattr(os, "access", lambda path, mode: denied.append(path) and False)
    assert files.unwritable(tmp_path / "new" / "deeper" / "file.pt") == tmp_path  # (the folder it would be made in)
    assert files.unwritable(tmp_path) == tmp_path and denied[-1] == tmp_path
