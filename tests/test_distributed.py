"""The whole pruning loop data-parallel (torchrun, gloo on CPU): two ranks through the CLI on the
CIFAR-10 subset (the shipped Fashion-MNIST subset where it is absent), a killed job resumed, a
killed or hung rank, and the API's contract checks."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from easier_kernels import cli, data, distributed, train as training
from helpers import data_root

WORKER = str(Path(__file__).with_name("distributed_cli_worker.py"))
API_WORKER = str(Path(__file__).with_name("distributed_prune_worker.py"))
VAL_SIZE = 201  # odd: a DistributedSampler would pad it to 202, which the accuracy must not count


def _dataset() -> list:
    """The CIFAR-10 subset where the shared data is here, else the Fashion-MNIST subset the
    package ships, so that these tests run on every clone."""
    root = data_root()
    if root is not None and (root / "cifar10-subset").is_dir():
        return ["--dataset", "cifar10-subset", "--data-root", str(root)]
    return ["--dataset", "fashion-mnist-mini"]


def _args(out, max_steps: int = 3) -> list:
    # plan merge: chains planned by timing may differ between two runs (as the clock does)
    return ["prune", *_dataset(), "--train-size", "384", "--val-size", str(VAL_SIZE), "--epochs", "1",
            "--epochs-per-step", "1", "--batch-size", "64", "--max-steps", str(max_steps), "--max-drop", "100",
            "--plan", "merge", "--quiet", "--out", str(out)]


def _torchrun(log_dir, argv, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", WORKER,
                             str(log_dir), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tempfile.gettempdir(), **popen)


def _steps(log_dir, rank) -> list:
    path = Path(log_dir) / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One whole 2-rank run: (its --out, its step logs)."""
    folder = tmp_path_factory.mktemp("ddp")
    process = _torchrun(folder / "logs", _args(folder / "out"))
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "data-parallel over 2 processes (world_size 2)" in out
    return folder / "out", folder / "logs"


def test_two_ranks_take_the_same_steps_and_rank_0_writes_them(uninterrupted):
    out, logs = uninterrupted
    ranks = [_steps(logs, r) for r in (0, 1)]
    assert len(ranks[0]) == 3
    for field in ("removed", "entropy", "val_accuracy", "test_accuracy", "accepted", "latency_ratio", "macs"):
        assert [s[field] for s in ranks[0]] == [s[field] for s in ranks[1]], field
    written = json.loads((out / "report.json").read_text())
    assert written["world_size"] == 2
    assert written["steps"] == ranks[0]  # what rank 0 computed, as it computed it
    assert not [p for p in out.rglob("*.tmp")]


def test_an_error_found_on_rank_0_stops_every_rank_with_one_line(uninterrupted, tmp_path):
    """The run folder is checked on rank 0 alone; its verdict reaches every rank (none waits for it)."""
    process = _torchrun(tmp_path / "logs", _args(uninterrupted[0]))
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    assert err.count("already holds a run; pass --resume to continue it") == 2, err[-3000:]


def test_validation_accuracy_is_over_the_whole_split(uninterrupted):
    """Every sample on exactly one rank, none twice: the accuracy is k / 201, the one a single
    process computes for the saved network."""
    out, logs = uninterrupted
    path, settings, result = cli._load_run(str(out), "check")
    accuracy = json.loads((out / "report.json").read_text())["accuracy"]
    assert accuracy == result.accuracy
    correct = accuracy * VAL_SIZE / 100
    assert abs(correct - round(correct)) < 1e-9, "the accuracy is not a count out of the whole validation split"
    splits = data.load(settings["dataset"], settings["data_root"], seed=0)
    val = torch.utils.data.Subset(splits.val, range(VAL_SIZE))
    single = training.accuracy(result.model, torch.utils.data.DataLoader(val, batch_size=64))
    assert abs(single - accuracy) <= 100 / VAL_SIZE + 1e-9  # (one sample's rounding at most)


def test_a_killed_job_resumed_ends_as_the_uninterrupted_run(uninterrupted, tmp_path):
    expected_out, expected_logs = uninterrupted
    out = tmp_path / "out"
    process = _torchrun(tmp_path / "logs", _args(out), start_new_session=True)
    _wait_for(out / "checkpoints" / "step_001.pt", process)
    pids = [int(p.read_text()) for p in (tmp_path / "logs").glob("rank*.pid")] + [process.pid]
    for pid in pids:  # the whole job at once: the launcher and both ranks
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate(timeout=60)
    assert not (out / "report.json").exists() or len(json.loads((out / "report.json").read_text())["steps"]) < 3

    resumed = _torchrun(tmp_path / "logs2", _args(out) + ["--resume"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    got, want = (json.loads((o / "report.json").read_text()) for o in (out, expected_out))
    for field in ("removed", "entropy", "val_accuracy", "test_accuracy", "accepted"):
        assert [s[field] for s in got["steps"]] == [s[field] for s in want["steps"]], field
    assert got["world_size"] == 2
    weights = [torch.load(o / "pruned.pt", weights_only=True)["state_dict"] for o in (out, expected_out)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[1]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_a_run_of_two_ranks_resumes_on_one_process(uninterrupted, tmp_path):
    """Another world size: the weights and decisions so far carry over (random streams are seeded afresh)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(uninterrupted[0], out)
    with pytest.warns(UserWarning, match=r"resuming a run checkpointed with 2 process\(es\) on 1"):
        assert cli.main(_args(out, max_steps=4) + ["--resume"]) == 0
    before, after = (json.loads((o / "report.json").read_text()) for o in (uninterrupted[0], out))
    assert len(after["steps"]) == 4 and after["steps"][:3] == before["steps"]
    assert after["world_size"] == 1


def test_a_killed_rank_ends_the_job_with_an_error(tmp_path):
    out = tmp_path / "out"
    process = _torchrun(tmp_path / "logs", _args(out) + ["--dist-timeout", "60"])
    _wait_for(out / "checkpoints" / "step_000.pt", process)
    os.kill(int((tmp_path / "logs" / "rank1.pid").read_text()), signal.SIGKILL)
    started = time.monotonic()
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - started < 60, "the job outlived its dead rank"
    assert "rank1" in err.replace(" ", "") or "local_rank: 1" in err, err[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_fails_the_others_with_one_line(tmp_path, fault):
    """Without torchrun's supervisor (as on another machine): the surviving rank stops with one
    line within --dist-timeout and exit code 2."""
    out, port = tmp_path / "out", _free_port()
    ranks = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                   RANK=str(rank), LOCAL_RANK=str(rank))
        ranks.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / "logs"), *_args(out),
                                       "--dist-timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=tempfile.gettempdir()))
    try:
        _wait_for(out / "checkpoints" / "step_000.pt", ranks[0])
        ranks[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        _, err = ranks[0].communicate(timeout=120)
        assert time.monotonic() - started < 60
        assert ranks[0].returncode == 2, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("easier-kernels prune: rank 0 lost contact with the other ranks (waited up to 20 s)")
        assert "rerun the same command with --resume" in last
    finally:
        ranks[1].kill()
        ranks[1].communicate()


@pytest.mark.parametrize("message", ["[../gloo/transport/tcp/pair.cc:534] Connection closed by peer",
                                     "Application timeout caused pair closure"])
def test_every_transport_error_of_a_lost_rank_is_recognised(monkeypatch, message):
    """gloo reports a hung peer in words that name neither gloo nor the connection, as CI met once."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    assert distributed.lost_rank(RuntimeError(message))
    assert not distributed.lost_rank(RuntimeError("size mismatch for fc.weight"))


def test_the_api_checks_what_every_rank_must_agree_on(tmp_path):
    """ek.prune under a process group: the default loop keeps ranks together (with every recovery
    option too); a user's evaluate that differs per rank and a finetune that lets weights drift apart are
    errors on every rank; a site one rank never reached is counted from the others."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           API_WORKER, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    got = ranks[0]
    assert got["default"]["world_size"] == 2 and len(got["default"]["removed"]) == 2
    assert got["default"]["recipe"]["plans"], "no chain was planned: the plans broadcast from rank 0 went untested"
    assert all(plan["batch"] == 4 for plan in got["default"]["recipe"]["plans"])  # timed at the deploy batch
    assert "the accuracy evaluate returned differs between ranks (rank 0: 50.0, rank 1: 51.0)" in got["evaluate"]
    assert "the ranks trained apart; wrap the model in torch.nn.parallel.DistributedDataParallel" in got["finetune"]
    # [2, 4, 6, 6] activations per rank: the conv's site counted on both ranks, the gated one on rank 0 only
    assert got["one_rank_site"]["conv_per_channel"] == 2 * 72 and got["one_rank_site"]["gated_per_channel"] == 72
    assert 0 <= got["one_rank_site"]["entropy"] <= 1
    # the recovery options under DDP: each rank's own teacher, rank 0's unpruned network; the students agree
    assert got["recovered"]["teacher"] == got["recovered"]["unpruned"] != got["recovered"]["student"]


# ---- single process: the helpers are the identity

def test_without_a_process_group_everything_is_local():
    loader = torch.utils.data.DataLoader(list(range(5)), batch_size=2)
    assert distributed.shard(loader, train=True) is loader
    assert distributed.from_main(lambda: 7) == 7 and distributed.all_gather("x") == ["x"]
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert not distributed.init_from_env(torch.device("cpu"))


def test_shards_cover_every_sample_once():
    shards = [list(distributed.ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11)) and [len(distributed.ShardSampler(11, r, 3)) for r in range(3)] == [4, 4, 3]


@pytest.mark.parametrize("line", [0, 1])
def test_the_readme_cpu_commands_work_as_written(tmp_path, line):
    """The README's two-CPU-process commands (shortened with quick options; their own --out)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = [c for c in readme.splitlines() if c.startswith("torchrun --standalone --nproc-per-node 2")]
    assert len(commands) == 2
    argv = commands[line].split()
    argv = argv[:argv.index("--out")] + ["--epochs", "1", "--train-size", "256", "--val-size", "64", "--width", "0.125",
                                         "--max-steps", "1", "--quiet", "--out", str(tmp_path / "out")]
    bin_dir = Path(sys.executable).parent  # this environment's torchrun and console script
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data-parallel over 2 processes (world_size 2)" in proc.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["world_size"] == 2


def test_a_causal_lm_run_on_two_ranks_takes_the_same_steps(tmp_path):
    """Text under torchrun: rank 0 trains the BPE and tokenizes into the run folder, the other
    reads them; perplexities are summed over ranks, so both take the same steps."""
    pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")
    from easier_kernels import text

    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = ["prune", "--model", "hf-gpt2:n_layer=2,n_embd=32,n_head=2", "--dataset", f"text:{text.TINY_TEXT}",
            "--tokenizer", "bpe:300", "--seq-len", "32", "--epochs", "1", "--batch-size", "8", "--train-size", "64",
            "--max-steps", "2", "--max-increase", "10", "--plan", "merge", "--gen-tokens", "2", "--quiet",
            "--out", str(out)]
    process = _torchrun(logs, argv)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    ranks = [_steps(logs, r) for r in (0, 1)]
    assert len(ranks[0]) == 2
    for field in ("removed", "val_accuracy", "test_accuracy", "accepted"):
        assert [s[field] for s in ranks[0]] == [s[field] for s in ranks[1]], field
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["settings"]["task"] == "causal_lm"
    assert (out / "hf_model" / "config.json").is_file() and (out / "tokenizer.json").is_file()
