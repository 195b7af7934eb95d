"""scripts/evidence.py: the runs share a baseline and differ only in the rule, a killed run goes
on, and the report regenerates from the copied report.json files alone."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "scripts" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def evidence(tmp_path, monkeypatch):
    module = load_script()
    tiny = dict(model="resnet18", dataset="fashion-mnist-mini", data=None, width=0.125, baseline_train_size=256, epochs=1,
                train_size=128, val_size=64, layers_per_step=6, random_draws=2)
    monkeypatch.setattr(module, "EXPERIMENTS", {"tiny": tiny})
    monkeypatch.setattr(module, "EVIDENCE", tmp_path / "evidence")
    monkeypatch.setattr(module, "IMAGES", tmp_path / "images")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "RESULTS.md")
    return module


def test_every_rule_starts_from_the_one_baseline_with_the_same_schedule(evidence, tmp_path):
    jobs = evidence.jobs_of(evidence.EXPERIMENTS, tmp_path / "runs", tmp_path)
    assert [j["name"] for j in jobs] == ["tiny/baseline", "tiny/entropy", "tiny/entropy-batch_mean", "tiny/random",
                                         "tiny/first", "tiny/last", "tiny/random-1"]
    base, *rules = jobs
    assert "--weights" not in base["argv"] and base["argv"][-2:] == ["--max-steps", "0"]
    weights = str(base["out"] / "baseline.pt")
    for job in rules:
        argv = job["argv"]
        assert job["after"] == "tiny/baseline" and argv[argv.index("--weights") + 1] == weights
        assert argv[argv.index("--max-drop") + 1] == "100" and argv[argv.index("--seed") + 1] == "0"
        assert argv[argv.index("--train-size") + 1] == "128" and base["argv"][base["argv"].index("--train-size") + 1] == "256"
        assert [a for a in argv[:argv.index("--weights")] if a != "128"] == \
            [a for a in base["argv"][:argv.index("--weights")] if a != "256"]  # the same data and model


def test_run_latency_and_report_end_to_end(evidence, tmp_path):
    runs = tmp_path / "runs"
    evidence.main(["run", "--runs", str(runs), "--jobs", "2"])
    reports = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "evidence" / "tiny").glob("*.json")}
    assert set(reports) == {"entropy", "entropy-batch_mean", "random", "first", "last", "random-1"}
    for rule, run in reports.items():
        assert run["stopped"] == "no site left to linearize" and sorted(run["linearized"]) == sorted(run["sites"])
        assert run["baseline_test_accuracy"] == reports["entropy"]["baseline_test_accuracy"]  # one baseline
    assert reports["first"]["linearized"] == reports["first"]["sites"]
    assert reports["last"]["linearized"] == reports["last"]["sites"][::-1]
    assert reports["random"]["linearized"] != reports["random-1"]["linearized"]
    assert reports["entropy"]["settings"]["mode"] == "pooled"
    assert reports["entropy-batch_mean"]["settings"]["mode"] == "batch_mean"

    # a second `run` finds everything finished and starts nothing
    stamp = (runs / "tiny" / "entropy" / "report.json").stat().st_mtime_ns
    evidence.main(["run", "--runs", str(runs)])
    assert (runs / "tiny" / "entropy" / "report.json").stat().st_mtime_ns == stamp

    evidence.main(["latency", "--seconds", "0.05"])
    rows = json.loads((tmp_path / "evidence" / "tiny" / "latency.json").read_text())["rows"]
    assert [r["removed"] for r in rows] == [0, 6, 12, 17] and all(r["folded_ms"] > 0 for r in rows)

    evidence.RESULTS.write_text(f"# Results\n\nmy reading\n\n{evidence.BEGIN}\nstale table\n{evidence.END}\n\nmore text\n")
    shutil.rmtree(runs)  # the report needs only docs/evidence
    evidence.main(["report"])
    text = evidence.RESULTS.read_text()
    assert text.startswith("# Results\n\nmy reading\n\n") and text.endswith("\n\nmore text\n") and "stale table" not in text
    x, y = evidence.curve(reports["first"])
    row = next(line for line in text.splitlines() if line.startswith("| 6 | "))  # the step table: the runs' numbers
    assert row.strip("| ").split(" | ")[1 + list(evidence.rules_of("tiny")).index("first")] == f"{y[1]:.2f}"
    mean = evidence.mean_accuracy(reports["entropy"])
    assert f"{mean:.2f}" in text and min(y) <= evidence.mean_accuracy(reports["first"]) <= max(y)
    for name in ("accuracy", "shape", "latency"):
        assert (tmp_path / "images" / f"evidence_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_mean_accuracy_and_removed_within():
    module = load_script()
    run = {"baseline_accuracy": 90.0, "baseline_test_accuracy": 80.0, "steps": [
        {"removed": ["a"], "val_accuracy": 89.5, "test_accuracy": 80.0, "accepted": True},
        {"removed": ["b", "c"], "val_accuracy": 88.0, "test_accuracy": 77.0, "accepted": True},
        {"removed": ["d"], "val_accuracy": 89.2, "test_accuracy": 70.0, "accepted": True}]}
    # trapezoids over x = 0, 1, 3, 4: (80 + 2 * 78.5 + 73.5) / 4
    assert module.mean_accuracy(run) == pytest.approx((80 + 2 * 78.5 + 73.5) / 4)
    assert module.removed_within(run, 1.0, "val") == 1  # the first fall below 89 ends it, whatever follows
    assert module.removed_within(run, 1.0, "test") == 1
    assert module.removed_within(run, 20.0, "test") == 4


def test_versus_random_counts_where_entropy_is_above_below_or_among_the_draws():
    module = load_script()

    def run(*tests):
        return {"baseline_accuracy": 90.0, "baseline_test_accuracy": 80.0,
                "steps": [{"removed": ["s"], "val_accuracy": 0.0, "test_accuracy": t, "accepted": True} for t in tests]}

    rules = {"entropy": run(79, 70, 60, 50), "random": run(78, 72, 61, 40), "random-1": run(77, 71, 59, 45)}
    assert module.versus_random(rules) == (2, 1, 1)  # above at 1 and 4, below at 2, among at 3
    assert module.versus_random({"entropy": run(79)}) is None
