"""scripts/evidence.py: the runs share a baseline and differ only in the rule, a killed run goes
on, and the report regenerates from the copied report.json files alone."""

import importlib.util
import json
import math
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


def test_the_latency_study_runs_two_seeds_of_each_entropy_rule_and_three_random_orders(tmp_path):
    module = load_script()
    experiments, rules_of = module.study("latency")
    assert "mobilenet_v2-fashion-mnist" in experiments and "resnet18-cifar10-subset" in experiments
    jobs = module.jobs_of({"m": experiments["mobilenet_v2-fashion-mnist"]}, tmp_path, tmp_path, rules_of)
    names = [j["name"] for j in jobs]
    assert names[0] == "m/baseline" and sorted(names[1:]) == sorted(f"m/{r}" for r in module.LATENCY_RULES)
    argv = {j["name"].split("/")[1]: j["argv"] for j in jobs}
    for rule, args in argv.items():
        if rule == "baseline":
            continue
        seed = args[len(args) - 1 - args[::-1].index("--seed") + 1]  # the last --seed given is the one used
        assert seed == ("1" if rule.endswith("seed1") else "0")
        assert args[args.index("--max-steps") + 1] == "10"
        assert ("--split-seed" in args) == rule.endswith("seed1")  # the same split (and baseline) at every seed
        assert ("entropy-latency" in args) == rule.startswith("entropy-latency")
    assert {module.group_of(r) for r in module.LATENCY_RULES} == set(module.GROUPS) - {"output-change"}


def fake_run(val, test, ratios, baseline=(90.0, 89.0)):
    steps = [{"removed": [f"s{i}"], "val_accuracy": v, "test_accuracy": t, "accepted": True, "latency_ratio": r}
             for i, (v, t, r) in enumerate(zip(val, test, ratios))]
    return {"baseline_accuracy": baseline[0], "baseline_test_accuracy": baseline[1], "steps": steps,
            "sites": [f"s{i}" for i in range(len(steps))], "settings": {"width": 0.25, "layers_per_step": 1},
            "baseline_payoff": {"latency_ratio": 1.0, "latency_ms": 2.0, "runtime": "eager", "example_shape": [1, 1, 28, 28],
                                "macs": 1e6}}


def test_the_latency_report_answers_both_questions_from_the_copied_reports(tmp_path, monkeypatch):
    module = load_script()
    monkeypatch.setattr(module, "EVIDENCE", tmp_path / "evidence")
    monkeypatch.setattr(module, "IMAGES", tmp_path / "images")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "RESULTS.md")
    runs = {"entropy": fake_run([89.9, 89.5, 88.0], [89, 88.5, 87], [0.99, 0.97, 0.9]),
            "entropy-seed1": fake_run([89.8, 89.6, 87.0], [89, 88, 86], [0.98, 0.96, 0.92]),
            "entropy-latency": fake_run([89.5, 89.2, 88.5], [88.5, 88, 87.5], [0.8, 0.65, 0.5]),
            "entropy-latency-seed1": fake_run([89.4, 89.1, 88.0], [88, 87.5, 87], [0.82, 0.7, 0.55]),
            "random": fake_run([88.0, 87.0, 86.0], [87, 86, 85], [0.9, 0.8, 0.7]),
            "random-1": fake_run([89.5, 88.0, 87.0], [88, 86, 84], [0.95, 0.85, 0.75])}
    for rule, run in runs.items():
        path = tmp_path / "evidence" / "latency" / "mobilenet_v2-fashion-mnist" / f"{rule}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run))
    assert module.kept_within(runs["entropy-latency"], 1.0, "val") == (2, 0.65)
    assert module.kept_within(runs["random"], 1.0, "val") == (0, 1.0)  # the first step already fell 2 points
    assert module.accuracy_at(runs["entropy"], 0.95, "test") == pytest.approx(89.0 - 87.0)
    assert module.accuracy_at(runs["entropy"], 0.8, "test") is None  # never that fast
    module.RESULTS.write_text("# Results\n\nintro\n")
    module.main(["report", "--study", "latency"])
    text = module.RESULTS.read_text()
    assert text.startswith("# Results\n\nintro\n") and module.LATENCY_BEGIN in text
    # at <= 1 point (validation): ours 0.65 and 0.70, entropy 0.97 and 0.96, random 1.0 and 0.95
    assert ("Target (mobilenet_v2-fashion-mnist, validation): entropy-latency reaches 0.675x at <= 1 point (target <= 0.7x: met); entropy 0.965x, random 0.975x (mean "
            "of the draws): ahead of both") in text
    row = next(line for line in text.splitlines() if "| entropy-latency (ours) | 2 |" in line)
    # at 1 point: 0.65 and 0.70 after 2 layers; at 2 points every step of both seeds is kept
    assert row.split(" | ")[3:5] == ["0.68 (0.65-0.70) [2.00 (2.00-2.00)]", "0.53 (0.50-0.55) [3.00 (3.00-3.00)]"]
    row = next(line for line in text.splitlines() if "| entropy (the paper's rule) |" in line and "<=" not in line
               and line.count("|") > 8)  # the equal-latency table: at 0.95x, 0.9x (one seed only), 0.85x (none)
    assert row.split(" | ")[2:5] == ["2.50 (2.00-3.00)", "2.00 [1/2]", "-"]
    assert (tmp_path / "images" / "latency_study.png").read_bytes()[:4] == b"\x89PNG"
    module.main(["report", "--study", "latency"])  # regenerates in place
    assert module.RESULTS.read_text().count(module.LATENCY_BEGIN) == 1


def test_the_recovery_study_runs_each_option_alone_and_together_on_the_latency_study_s_path(tmp_path, monkeypatch):
    module = load_script()
    experiments, rules_of = module.study("recovery")
    assert set(experiments) == {"mobilenet_v2-fashion-mnist", "resnet18-cifar10-subset"}
    assert all(spec == module.LATENCY_EXPERIMENTS[name] for name, spec in experiments.items())
    jobs = module.jobs_of(experiments, tmp_path, tmp_path, rules_of)
    for name in experiments:
        argv = {j["name"].split("/")[1]: j["argv"] for j in jobs if j["name"].startswith(name + "/")}
        assert set(argv) == {"baseline", *rules_of(name)}
        assert {"plain", "plain-seed1", "distill", "anneal", "entropy-weight", "combined-seed1"} <= set(argv)
        for rule, args in argv.items():
            if rule == "baseline":
                continue
            last = lambda flag: args[len(args) - 1 - args[::-1].index(flag) + 1]  # noqa: E731  (argparse: the last wins)
            assert last("--select") == ("entropy" if "-entropy" in rule and "weight" not in rule else "entropy-latency")
            assert ("--distill" in args) == rule.startswith(("distill", "combined"))
            assert ("--anneal" in args) == rule.startswith(("anneal", "combined"))
            assert ("--split-seed" in args) == rule.endswith("-seed1")  # two loop seeds of each, one split
            assert last("--max-drop") == ("1" if "-patience" in rule else "100")
    mobilenet = rules_of("mobilenet_v2-fashion-mnist")
    assert mobilenet["plain-wallclock"][-2:] == ["--train-size", "3600"]  # plain given distillation's 1.2x wall-clock
    monkeypatch.setattr(module, "EVIDENCE", tmp_path / "evidence")
    monkeypatch.setattr(module, "IMAGES", tmp_path / "images")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "RESULTS.md")
    retried = fake_run([89.5, 88.0, 89.2], [88.5, 87.0, 88.4], [0.9, 0.8, 0.75])  # its second try was rejected
    retried["steps"][1]["accepted"] = False
    retried.update(max_drop=1.0, settings={**retried["settings"], "patience": 2})
    for rule, run in (("plain", fake_run([89.5, 88.0], [89.0, 87.5], [0.9, 0.7])),
                      ("combined", fake_run([89.9, 89.5], [89.5, 88.5], [0.9, 0.7])),
                      ("combined-seed1", fake_run([89.8, 89.4], [89.0, 88.0], [0.9, 0.7])),
                      ("plain-patience", retried)):
        path = tmp_path / "evidence" / "recovery" / "mobilenet_v2-fashion-mnist" / f"{rule}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        for step in run["steps"]:
            step["seconds"] = 20.0 if rule != "combined" else 30.0
        path.write_text(json.dumps(run))
    module.RESULTS.write_text("# Results\n")
    module.main(["report", "--study", "recovery"])
    text = module.RESULTS.read_text()
    combined = next(line for line in text.splitlines() if "| combined | 2 |" in line and "<=" not in line)
    assert combined.split(" | ")[3] == "0.70 (0.70-0.70) [2.00 (2.00-2.00)]"  # both seeds kept both steps at 1 point
    plain = next(line for line in text.splitlines() if "| plain | 1 |" in line and "<=" not in line)
    assert plain.split(" | ")[3] == "0.90 [1.00]"  # its second step fell 2 points: one step kept at 1 point
    # a run with the stopping rule is no path: not in the path tables (the cost table and the retry table have it)
    assert not any("| plain-patience |" in line and line.count("|") > 6 for line in text.splitlines())
    # without retry: plain stops at its second step (1 layer, 0.9x, 0.5 and 0.0 points below, 1 rejected);
    # with --patience 2: the rejected try undone, the third accepted (2 layers, 0.75x, 0.8 and 0.6 points below)
    assert "| mobilenet_v2-fashion-mnist | plain, --max-drop 1 | 1 | 1.00 | 0.90 | 0.50 | 0.00 | 1.00 |" in text
    assert "| mobilenet_v2-fashion-mnist | plain, --max-drop 1 --patience 2 | 1 | 2.00 | 0.75 | 0.80 | 0.60 | 1.00 |" in text
    assert (tmp_path / "images" / "recovery_study.png").read_bytes()[:4] == b"\x89PNG"
    assert "| combined | 2 | 25.00 (20.00-30.00) |" in text


def fake_costs(cost0, cost1, scores):
    """A `costs` record: sites s0.. with fine-tuned costs at seeds 0 and 1, and the given scores."""
    sites = [f"s{i}" for i in range(len(cost0))]
    return {"format": "easier_kernels.removability/1", "seeds": [0, 1], "epochs": 1, "train_size": 3000, "val_size": 2000,
            "max_drop": 1.0, "k": 2, "baseline": 90.0,
            "costs": {s: {"untrained": 2 * a, "finetuned": {"0": a, "1": b}} for s, a, b in zip(sites, cost0, cost1)},
            "split": {s: [0.0, 0.0] for s in sites},
            "scores": {name: dict(zip(sites, values)) for name, values in scores.items()}}


def test_the_mechanism_study_measures_costs_on_baselines_and_ranks_every_score(tmp_path, monkeypatch):
    module = load_script()
    experiments, rules_of = module.study("mechanism")
    assert {"resnet18-cifar10-subset", "mobilenet_v2-fashion-mnist", "vgg16_bn-fashion-mnist", "vit-fashion-mnist"} \
        == set(experiments)
    jobs = module.jobs_of(experiments, tmp_path, tmp_path, rules_of)
    baselines = [j["name"] for j in jobs if j["after"] is None]
    assert sorted(baselines) == sorted(f"{name}/baseline" for name in experiments)  # then `costs` on each
    loop = {j["name"]: j["argv"] for j in jobs if j["after"] is not None}  # and the loop with the new rule
    assert {name.split("/")[0] for name in loop} == set(module.MECHANISM_LOOP)
    argv = loop["mobilenet_v2-fashion-mnist/output-change-seed1"]
    assert argv[argv.index("--select") + 1] == "output-change" and "--split-seed" in argv
    vit = next(j for j in jobs if j["name"] == "vit-fashion-mnist/baseline")["argv"]
    assert vit[vit.index("--train-lr") + 1] == "0.05" and vit[vit.index("--max-steps") + 1] == "0"
    monkeypatch.setattr(module, "EVIDENCE", tmp_path / "evidence")
    monkeypatch.setattr(module, "IMAGES", tmp_path / "images")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "RESULTS.md")
    # four sites; costs rise with the output change exactly, the entropy ranks them backwards
    record = fake_costs([0.5, 1.0, 3.0, 8.0], [0.4, 1.5, 2.5, 9.0],
                        {"entropy": [0.9, 0.8, 0.7, 0.6], "output_change": [0.1, 0.2, 0.3, math.inf],
                         "random": [0.3, 0.1, 0.4, 0.2]})
    path = tmp_path / "evidence" / "mechanism" / "vgg16_bn-fashion-mnist.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    table = module.score_agreement(record, 2)
    assert table["output_change"]["spearman"] == [1.0, 1.0] and table["entropy"]["spearman"] == [-1.0, -1.0]
    assert table["oracle"]["spearman"] == [1.0] and len(table["random"]["spearman"]) == 2 * module.RANDOM_DRAWS
    assert module.beyond_spread(table, "output_change") and not module.beyond_spread(table, "random")
    module.RESULTS.write_text("# Results\n")
    module.main(["report", "--study", "mechanism"])
    text = module.RESULTS.read_text()
    assert "| output change | 1.00 (1.00 to 1.00) |" in text and "| entropy (the paper) | -1.00 (-1.00 to -1.00) |" in text
    assert "- output change: ranks the cost after fine-tuning better than the entropy beyond the seeds' spread (Spearman) on 1 of 1 models" in text
    assert (tmp_path / "images" / "mechanism_scatter.png").read_bytes()[:4] == b"\x89PNG"
