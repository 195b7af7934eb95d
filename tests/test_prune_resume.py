"""A pruning run killed with SIGKILL at any moment and resumed ends exactly like an uninterrupted one."""

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import easier_kernels as ek

WORKER = str(Path(__file__).with_name("prune_worker.py"))


def _start(checkpoint_dir, result_path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, WORKER, str(checkpoint_dir), str(result_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process


def _finish(process) -> None:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert out.strip() == "done"


def _model():
    return ek.models.resnet18(num_classes=10, in_channels=1, width=0.125)


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    started = time.perf_counter()
    _finish(_start("-", tmp_path / "uninterrupted.pt"))
    duration = time.perf_counter() - started
    expected = ek.load(tmp_path / "uninterrupted.pt", _model)
    assert len(expected.linearized) == 4

    # kill at spread-out moments of the work (imports excluded), each time resuming what is there
    checkpoints, kills, delay = tmp_path / "checkpoints", 0, 0.12 * duration
    while True:
        process = _start(checkpoints, tmp_path / "resumed.pt")
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            if process.wait() == -signal.SIGKILL:  # (else it finished just before the signal)
                kills += 1
                delay *= 1.35
                continue
        _finish(process)
        break
    assert kills >= 3, "the run finished before it could be killed several times: make the worker slower"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == [f"step_{i:03d}.pt" for i in range(5)]
    assert not [p for p in checkpoints.iterdir() if ".tmp" in p.name], "a temporary file was left behind"

    resumed = ek.load(tmp_path / "resumed.pt", _model)
    assert resumed.linearized == expected.linearized
    assert [s.removed for s in resumed.history] == [s.removed for s in expected.history]
    assert [s.entropy for s in resumed.history] == [s.entropy for s in expected.history]
    assert [s.val_accuracy for s in resumed.history] == [s.val_accuracy for s in expected.history]
    got, want = resumed.model.state_dict(), expected.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
