"""The prune loop's checkpoint folder: `step_NNN.pt` after every step (NNN = steps attempted so
far), written atomically by rank 0, read back by rank 0 and handed to every rank; and the random
states a checkpoint keeps so that a resumed run draws exactly what an uninterrupted one would.

A checkpoint that cannot be read (a torn disk, a file edited by hand) is skipped with a warning
naming it, and the run resumes from the newest readable one (the steps after it are done again,
identically); with none readable, one clear error.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from .files import atomic_write, load_file, unwritable
from .recipe_entry import RECIPE_ENTRY

__all__ = ["CheckpointFolder", "CheckpointError", "fingerprint", "rng_state", "set_rng_state", "seed_everything", "FORMAT"]

FORMAT = "easier_kernels.prune/1"
_NAME = re.compile(r"step_(\d+)\.pt")
_KEYS = ("fingerprint", "settings", "state")


class CheckpointError(ValueError):
    """The checkpoint folder cannot take or resume this run (the message says what to do)."""


def fingerprint(model: nn.Module, site_names: list) -> str:
    """What a checkpoint must have been written for: the architecture (class, sites, shapes)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith(RECIPE_ENTRY)}  # (its length varies)
    text = json.dumps([type(model).__name__, site_names, shapes], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read(path) -> dict:
    """A PruneResult file or a checkpoint: {format, ...}, one clear error when unreadable."""
    return load_file(path, FORMAT, "PruneResult.save or a checkpoint_dir")


class CheckpointFolder:
    def __init__(self, folder, fingerprint: str, settings: dict):
        self.folder, self.fingerprint, self.settings = Path(folder), fingerprint, settings

    def checkpoints(self) -> list:
        found = [(int(m.group(1)), p) for p in self.folder.glob("step_*.pt") if (m := _NAME.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def start(self, resume: bool) -> dict | None:
        """The loop state to resume from, or None for a fresh run (after checking the folder may
        be used). Decided on rank 0; every rank gets the same state or the same error."""
        return distributed.from_main(lambda: self._start(resume))

    def _start(self, resume: bool) -> dict | None:
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"checkpoint_dir {self.folder} is a file; pass a folder")
        if (denied := unwritable(self.folder)) is not None:  # (found now, not after the first step has trained)
            raise CheckpointError(f"checkpoint_dir {self.folder}: cannot write in {denied} (permission denied or "
                                  "read-only); pass a folder you can write to")
        checkpoints = self.checkpoints() if self.folder.is_dir() else []
        for stale in self.folder.glob(".step_*.tmp") if self.folder.is_dir() else ():  # left by a killed write
            stale.unlink(missing_ok=True)
        if checkpoints and not resume:
            raise CheckpointError(f"{self.folder} already holds a run ({checkpoints[-1].name}); pass resume=True to continue "
                             "it, or choose another folder")
        unreadable = []
        for left, path in reversed(list(enumerate(checkpoints))):  # left: how many earlier ones remain
            try:
                saved = _complete(read(path), path)
            except ValueError as exc:
                unreadable.append(path.name)
                then = "trying the one before it" if left else "no earlier checkpoint is left"
                warnings.warn(f"skipping unreadable checkpoint {path} ({exc}); {then}", stacklevel=4)
                continue
            self._check_matches(saved)
            return saved["state"]
        if unreadable:
            raise CheckpointError(f"{self.folder} holds no readable checkpoint ({', '.join(reversed(unreadable))} could not be "
                             "read); start afresh in another folder")
        return None

    def _check_matches(self, saved: dict) -> None:
        if saved["fingerprint"] != self.fingerprint:
            raise CheckpointError(f"{self.folder} holds a run of a different model; choose another folder, or pass the model "
                             "that run was started with")
        # an option absent on either side was at its default there (`prune._settings`)
        saved_settings = saved["settings"]
        differs = [k for k in {**saved_settings, **self.settings} if saved_settings.get(k) != self.settings.get(k)]
        if differs:
            shown = ", ".join(f"{k}={_shown(saved_settings, k)} (now {_shown(self.settings, k)})" for k in differs)
            raise CheckpointError(f"{self.folder} was started with {shown}; resume with the same options or choose another folder")

    def save(self, state: dict, step: int) -> None:
        """`state` (the loop's state_dict) as step_{step:03d}.pt; rank 0 writes, the others return."""
        if not distributed.is_main():
            return
        saved = {"format": FORMAT, "fingerprint": self.fingerprint, "settings": self.settings, "state": state}
        atomic_write(self.folder / f"step_{step:03d}.pt", lambda f: torch.save(saved, f))


def _shown(settings: dict, key: str) -> str:
    return repr(settings[key]) if key in settings else "its default"


def _complete(saved: dict, path) -> dict:
    """`saved`, checked to hold what a resume reads (a hand-edited file may not)."""
    state = saved.get("state")
    missing = [k for k in _KEYS if k not in saved] or \
        [k for k in ("history", "state_dict", "rng", "baseline") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return saved


# ---- random states

def _generators(loaders) -> list:
    """The torch.Generators a loader draws its order from (when it was given its own)."""
    found = []
    for loader in loaders:
        for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found


def rng_state(loaders) -> dict:
    """This process's random states: torch (CPU and CUDA), numpy, random and the loaders' own generators."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "random": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "loaders": [g.get_state() for g in _generators(loaders)],
    }


def set_rng_state(rng: dict, loaders) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    *internal, version, gauss = rng["random"]
    random.setstate((version, tuple(internal), gauss))
    generators = _generators(loaders)
    if len(generators) != len(rng["loaders"]):
        raise ValueError("the loaders have other generators than when the run was checkpointed; pass the same loaders")
    for generator, saved in zip(generators, rng["loaders"]):
        generator.set_state(saved)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
