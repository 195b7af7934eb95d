"""One rank of tests/test_distributed.py's CLI runs: `python distributed_cli_worker.py LOG_DIR prune ...`
(under torchrun, or started by hand with its RANK/WORLD_SIZE/MASTER_* environment).

Runs `easier-kernels prune ...` unchanged, except that every step this rank takes is appended to
LOG_DIR/rank<r>.jsonl (as the loop computed it, before anything is written) and the process id is
in LOG_DIR/rank<r>.pid."""

import dataclasses
import json
import os
import sys
from pathlib import Path

from easier_kernels import cli
from easier_kernels.prune import Pruner


def log_steps(path: Path) -> None:
    step = Pruner.step

    def logged(self):
        record = step(self)
        if record is not None:
            with path.open("a") as f:
                f.write(json.dumps(dataclasses.asdict(record)) + "\n")
        return record

    Pruner.step = logged


if __name__ == "__main__":
    log_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = os.environ.get("RANK", "0")
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    log_steps(log_dir / f"rank{rank}.jsonl")
    sys.exit(cli.main(argv))
