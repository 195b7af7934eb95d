"""The evidence runs of docs/RESULTS.md: the EASIER loop to the end on real data, against naive
selection rules, and the latency each removed layer buys after folding.

    python scripts/evidence.py run          # every experiment's baseline, then every rule (hours on 2 cores)
    python scripts/evidence.py latency      # folded latency vs layers removed (run it on a quiet machine)
    python scripts/evidence.py report       # docs/RESULTS.md's generated part and docs/images/evidence_*.png

    python scripts/evidence.py run --study latency      # latency-aware selection against entropy and random
    python scripts/evidence.py report --study latency   # its part of docs/RESULTS.md and plots
    python scripts/evidence.py run --study recovery     # issue 28: each recovery option on the latency study's path
    python scripts/evidence.py report --study recovery
    python scripts/evidence.py run --study mechanism    # issue 30: each site's true removal cost against every score
    python scripts/evidence.py report --study mechanism
    python scripts/evidence.py run --study language     # issue 29: EASIER on a GPT-2 LM and a BERT classifier vs block removal
    python scripts/evidence.py report --study language

`run` drives the `easier-kernels prune` CLI, exactly as a user would type it (every command is
printed and logged), `--jobs` at a time with the cores split between them. A baseline is trained
once per experiment; every rule starts from its weights with the same seed, schedule and data,
so the rules differ only in which sites they remove. A killed `run` picks up where it stopped
(finished runs are skipped, unfinished ones `--resume`). `report` reads only the runs' report.json
files, copied to docs/evidence/, so the document regenerates without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence_language as language  # noqa: E402  (the language study, beside this script)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EVIDENCE = ROOT / "docs" / "evidence"  # the runs' report.json and latency.json, committed
IMAGES = ROOT / "docs" / "images"
RESULTS = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- evidence:begin (scripts/evidence.py report) -->", "<!-- evidence:end -->"

# Sized for 2 CPU cores: the baseline trains on the whole training split (`baseline_train_size`
# None) or part of it; each step fine-tunes one epoch on a subset, validates on a 1000-image subset
# (only recorded: there is no stopping rule) and tests on the full test split.
EXPERIMENTS = {
    "resnet18-fashion-mnist": dict(model="resnet18", dataset="fashion-mnist", data="fashion-mnist", width=0.25,
                                   baseline_train_size=None, epochs=2, train_size=3000, val_size=1000,
                                   layers_per_step=1),
    "mobilenet_v2-fashion-mnist": dict(model="mobilenet_v2", dataset="fashion-mnist", data="fashion-mnist", width=0.25,
                                       baseline_train_size=None, epochs=2, train_size=3000, val_size=1000,
                                       layers_per_step=3),
    "vgg16_bn-fashion-mnist": dict(model="vgg16_bn", dataset="fashion-mnist", data="fashion-mnist", width=0.25,
                                   baseline_train_size=None, epochs=2, train_size=3000, val_size=1000,
                                   layers_per_step=1, random_draws=3),
    "resnet18-cifar10-subset": dict(model="resnet18", dataset="cifar10-subset", data="cifar10-subset", width=0.25,
                                    baseline_train_size=None, epochs=30, train_size=None, val_size=None,
                                    layers_per_step=1, rules=("entropy", "random")),
}
# rule -> extra CLI options; every rule runs with --max-drop 100 (never stops) and --seed 0.
# `rules` / `random_draws` in an experiment: which rules and how many random orders it runs (what
# one session on this machine had time for).
RULES = {
    "entropy": [],
    "entropy-batch_mean": ["--mode", "batch_mean"],
    "random": ["--select", "random", "--select-seed", "0"],
    "first": ["--select", "first"],
    "last": ["--select", "last"],
}
SUMMARY = list(RULES)  # the columns of the summaries: the random draws are summarized together

# The latency study (docs/RESULTS.md, "Latency-aware selection"): every step records the folded
# network's latency ratio in the run's report. Per experiment one baseline (seed 0); `entropy`
# and `entropy-latency` with two training seeds of the loop (--seed 1 --split-seed 0: other data
# order and augmentation, the same split and baseline), `random` with three orders. Runs stop
# after `max_steps` (past the region that keeps the accuracy, to fit one session on 2 cores).
LATENCY_EXPERIMENTS = {
    "mobilenet_v2-fashion-mnist": dict(model="mobilenet_v2", dataset="fashion-mnist", data="fashion-mnist", width=0.25,
                                       baseline_train_size=None, epochs=2, train_size=3000, val_size=2000,
                                       layers_per_step=2, max_steps=10),
    "resnet18-cifar10-subset": dict(model="resnet18", dataset="cifar10-subset", data="cifar10-subset", width=0.25,
                                    baseline_train_size=None, epochs=30, train_size=None, val_size=None,
                                    layers_per_step=1, max_steps=10),
    # the same baseline, one site per step and twice the fine-tuning: a finer look at the first point
    "mobilenet_v2-fashion-mnist-fine": dict(model="mobilenet_v2", dataset="fashion-mnist", data="fashion-mnist",
                                            width=0.25, baseline_of="mobilenet_v2-fashion-mnist", epochs=2,
                                            train_size=6000, val_size=2000, layers_per_step=1, max_steps=14),
    "mobilenet_v2-cifar10-subset": dict(model="mobilenet_v2", dataset="cifar10-subset", data="cifar10-subset",
                                        width=0.25, baseline_train_size=None, epochs=30, train_size=None,
                                        val_size=None, layers_per_step=2, max_steps=10),
    "resnet18-fashion-mnist": dict(model="resnet18", dataset="fashion-mnist", data="fashion-mnist", width=0.25,
                                   baseline_train_size=None, epochs=2, train_size=3000, val_size=2000,
                                   layers_per_step=1, max_steps=10),
}
SEED1 = ["--seed", "1", "--split-seed", "0"]
LATENCY_RULES = {
    "entropy": [], "entropy-seed1": SEED1,
    "entropy-latency": ["--select", "entropy-latency"], "entropy-latency-seed1": ["--select", "entropy-latency", *SEED1],
    "random": ["--select", "random", "--select-seed", "0"], "random-1": ["--select", "random", "--select-seed", "1"],
    "random-2": ["--select", "random", "--select-seed", "2"],
}
# The recovery study (docs/RESULTS.md, "Recovery"; issue 28): the latency study's MobileNetV2 and
# ResNet-18 experiments (their baselines and schedules), entropy-latency with each recovery option
# alone and all together, each at two loop seeds. `plain` is entropy-latency with plain
# fine-tuning, run again from this study's baseline in the same sitting, so that accuracies and
# wall-clock times compare. MobileNetV2 further runs: plain fine-tuning given distillation's
# wall-clock (1.2x the images per step, the cost measured in the first sitting), distillation with
# the paper's rule, the entropy term towards either end, a shorter anneal; on both, the stopping
# rule (--max-drop 1) with retry on rejection, with and without distillation (on MobileNetV2 with
# the paper's rule too).
RECOVERY_EXPERIMENTS = {name: LATENCY_EXPERIMENTS[name] for name in ("mobilenet_v2-fashion-mnist", "resnet18-cifar10-subset")}
LATENCY_AWARE = ["--select", "entropy-latency"]
COMBINED = [*LATENCY_AWARE, "--distill", "--anneal", "0.3", "--entropy-weight", "0.1"]
RECOVERY_OPTIONS = {"plain": [], "distill": ["--distill"], "combined": COMBINED[2:], "anneal": ["--anneal", "0.3"],
                    "entropy-weight": ["--entropy-weight", "0.1"]}
RETRY = {"plain-patience": ["--max-drop", "1", "--patience", "2"],
         "distill-patience": ["--distill", "--max-drop", "1", "--patience", "2"]}
RECOVERY_MORE = {
    "mobilenet_v2-fashion-mnist": {
        "plain-wallclock": ["--train-size", "3600"],
        "distill-entropy": ["--select", "entropy", "--distill"],
        **RETRY,
        "entropy-weight-both": ["--entropy-weight", "0.1", "--entropy-side", "both"],
        "anneal-0.1": ["--anneal", "0.1"],
        "distill-entropy-patience": ["--select", "entropy", *RETRY["distill-patience"]]},
    "resnet18-cifar10-subset": RETRY}
FIGURE_VARIANTS = ("plain", "distill", "combined", "plain-wallclock")  # the tables have every variant

def recovery_rules(experiment: str) -> dict:
    """Each variant at loop seeds 0 and 1 (`name`, `name-seed1`; a variant's seeds one after the
    other); later options override earlier ones."""
    variants = {**RECOVERY_OPTIONS, **RECOVERY_MORE.get(experiment, {})}
    return {key: [*LATENCY_AWARE, *extra, *seed] for name, extra in variants.items()
            for key, seed in ((name, []), (f"{name}-seed1", SEED1))}


# The mechanism study (docs/RESULTS.md, "What makes a layer removable"; issue 30): per experiment
# a baseline, then `easier-kernels costs` on it: every site linearized alone and fine-tuned with the
# loop's schedule (one epoch on `train_size` images, validation on `val_size`) at seeds 0 and 1,
# against every training-free score. The ViT is timm's at a size these 2 cores train (6 blocks,
# width 128, 7-pixel patches of the 28-pixel images: 16 tokens and the class token).
MECHANISM_EXPERIMENTS = {
    "resnet18-cifar10-subset": LATENCY_EXPERIMENTS["resnet18-cifar10-subset"],
    "mobilenet_v2-fashion-mnist": LATENCY_EXPERIMENTS["mobilenet_v2-fashion-mnist"],
    "vgg16_bn-fashion-mnist": dict(model="vgg16_bn", dataset="fashion-mnist", data="fashion-mnist", width=0.25,
                                   baseline_train_size=None, epochs=2, train_size=3000, val_size=2000),
    "vit-fashion-mnist": dict(model="timm:vit_tiny_patch16_224:img_size=28,patch_size=7,depth=6,embed_dim=128,num_heads=4",
                              dataset="fashion-mnist", data="fashion-mnist", width=1.0, baseline_train_size=None,
                              epochs=2, train_size=3000, val_size=2000, baseline_options=["--train-lr", "0.05"]),
}
MECHANISM_SEEDS = ["0", "1"]
# The loop with the score that predicts the cost best (`--select output-change`) against the
# paper's rule and random, from the same baselines as the recovery study (whose `plain` runs,
# entropy-latency, join the comparison), with the latency study's schedule.
MECHANISM_LOOP = ("mobilenet_v2-fashion-mnist", "resnet18-cifar10-subset")
MECHANISM_RULES = {"output-change": ["--select", "output-change"], "output-change-seed1": ["--select", "output-change", *SEED1],
                   "entropy": [], "entropy-seed1": SEED1,
                   "random": ["--select", "random", "--select-seed", "0"], "random-1": ["--select", "random", "--select-seed", "1"]}
STUDIES = {"rules": "evidence", "latency": "latency", "recovery": "recovery", "mechanism": "mechanism",
           "language": "language"}  # study -> its folder under runs/ and docs/evidence/
SEED = 0
# The paper's published CIFAR-10 top-1 (DESIGN.md): (layers removed, accuracy) per model.
PAPER = {"resnet18": [(0, 92.47), (8, 92.10), (9, 90.35), (16, 77.74)],
         "mobilenet_v2": [(0, 93.65), (15, 92.77)], "vgg16_bn": [(0, 93.50), (10, 93.04)]}


def rules_of(experiment: str) -> dict:
    """The experiment's rules (all RULES unless it names some) and its further random draws
    (random-1, ...: run last)."""
    spec = EXPERIMENTS[experiment]
    rules = {r: RULES[r] for r in spec.get("rules", RULES)}
    extra = range(1, spec.get("random_draws", 1))
    return {**rules, **{f"random-{k}": ["--select", "random", "--select-seed", str(k)] for k in extra}}


# ---- run

def common_options(spec: dict, data_root: Path, train_size: int | None) -> list[str]:
    options = ["--model", spec["model"], "--dataset", spec["dataset"], "--width", str(spec["width"]), "--seed", str(SEED),
               "--quiet"]
    if spec.get("data"):  # a shipped dataset needs no folder
        options += ["--data-root", str(data_root / spec["data"])]
    for name, size in (("--train-size", train_size), ("--val-size", spec["val_size"])):
        if size:
            options += [name, str(size)]
    return options


def study(name: str) -> tuple[dict, Callable]:
    """(experiments, experiment -> rules) of a study."""
    if name == "latency":
        return LATENCY_EXPERIMENTS, lambda experiment: dict(LATENCY_RULES)
    if name == "recovery":
        return RECOVERY_EXPERIMENTS, recovery_rules
    if name == "mechanism":
        # baselines, the loop's rules where it runs; then `costs` on every baseline (mechanism_costs)
        return MECHANISM_EXPERIMENTS, lambda experiment: dict(MECHANISM_RULES) if experiment in MECHANISM_LOOP else {}
    return EXPERIMENTS, rules_of


def jobs_of(experiments: dict, runs: Path, data_root: Path, rules_of: Callable = rules_of,
            draws_last: bool = True) -> list[dict]:
    """Every CLI invocation, as {name, out, argv, after}: a baseline per experiment, then its rules
    (with `draws_last`, every experiment's extra random draws after all the other rules)."""
    jobs = []
    for name, spec in experiments.items():
        common = common_options(spec, data_root, spec["train_size"])
        trained = spec.get("baseline_of", name)  # an experiment may start from another's baseline
        base = runs / trained / "baseline"
        if all(j["name"] != f"{trained}/baseline" for j in jobs):
            owner = experiments.get(trained) or LATENCY_EXPERIMENTS[trained]  # the spec that trains it
            jobs.append({"name": f"{trained}/baseline", "out": base, "after": None,
                         "argv": ["prune", *common_options(owner, data_root, owner["baseline_train_size"]),
                                  "--epochs", str(owner["epochs"]), "--max-steps", "0",
                                  *owner.get("baseline_options", [])]})
        for rule, extra in rules_of(name).items():
            jobs.append({"name": f"{name}/{rule}", "out": runs / name / rule, "after": f"{trained}/baseline",
                         "argv": ["prune", *common, "--weights", str(base / "baseline.pt"), "--max-drop", "100",
                                  "--layers-per-step", str(spec["layers_per_step"]),
                                  *(["--max-steps", str(spec["max_steps"])] if spec.get("max_steps") else []), *extra]})
    # baselines first, then the rules, the costly experiments first and the extra random draws last
    return sorted(jobs, key=lambda j: (j["after"] is not None,
                                       draws_last and j["name"].split("/")[1].startswith("random-")))


def finished(out: Path, baseline: bool) -> bool:
    report = out / "report.json"
    if not report.exists():
        return False
    stopped = json.loads(report.read_text()).get("stopped", "")
    return stopped.startswith("reached max_steps=0") if baseline else bool(stopped)  # a rule run: to the end or its cap


def run(args) -> None:
    runs = Path(args.runs or ROOT / "runs" / STUDIES[args.study])
    if args.study == "language":
        experiments, jobs = {}, language.jobs(runs, Path(args.data_root), args.only)
    else:
        experiments, rules = study(args.study)
        experiments = {k: v for k, v in experiments.items() if not args.only or k in args.only}
        jobs = jobs_of(experiments, runs, Path(args.data_root), rules,
                       draws_last=args.study == "rules")  # the latency study: one experiment whole after another
    evidence = EVIDENCE / ("" if args.study == "rules" else args.study)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done, failed, running, pending = set(), [], {}, list(jobs)
    while pending or running:
        for job in list(pending):  # finished here or by another `run` (a lock file marks a run in progress)
            if finished(job["out"], job["after"] is None):
                pending.remove(job)
                done.add(job["name"])
                if job["after"] is not None:
                    copy_report(job["out"], evidence / f"{job['name']}.json")
        elsewhere = sum(locked(j["out"]) for j in pending)  # runs of another `run` share the --jobs slots
        ready = [j for j in pending if (j["after"] is None or j["after"] in done) and not locked(j["out"])]
        for job in ready[:max(0, args.jobs - len(running) - elsewhere)]:
            pending.remove(job)
            running[job["name"]] = start(job, env)
        if not running and pending and not any(locked(j["out"]) for j in pending):
            break  # what is left waits on a failed baseline
        time.sleep(2)
        for name, (process, log, job) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            lock_path(job["out"]).unlink(missing_ok=True)
            del running[name]
            ok = process.returncode == 0 and finished(job["out"], job["after"] is None)
            print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {name}", flush=True)
            if ok:
                pending.append(job)  # the check at the top of the loop copies its report
            else:
                failed.append(name)
                pending = [j for j in pending if j["after"] != name]  # its rules cannot start
    if failed or pending:
        sys.exit(f"failed: {', '.join(failed + [j['name'] for j in pending])} (logs beside their run folders)")
    if args.study == "mechanism":
        mechanism_costs(experiments, runs, env)
    if args.study == "language":
        os.environ.update(OMP_NUM_THREADS=str(threads))
        language.block_removal(runs, Path(args.data_root), args.only)
        language.rule_generation(runs, Path(args.data_root), args.only)


def mechanism_costs(experiments: dict, runs: Path, env: dict) -> None:
    """`easier-kernels costs` on each experiment's baseline, one after another (each resumes from
    its cache), its removability.json copied to docs/evidence/mechanism/."""
    for name, spec in experiments.items():
        base = runs / name / "baseline"
        argv = ["easier-kernels", "costs", str(base), "--seeds", *MECHANISM_SEEDS, "--quiet"]
        for flag, size in (("--train-size", spec["train_size"]), ("--val-size", spec["val_size"])):
            if size:
                argv += [flag, str(size)]
        print(f"[{time.strftime('%H:%M:%S')}] start {name}/costs: {' '.join(argv)}", flush=True)
        with open(runs / name / "costs.log", "a") as log:
            log.write(" ".join(argv) + "\n")
            log.flush()
            if subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                sys.exit(f"failed: {name}/costs (log: {runs / name / 'costs.log'})")
        target = EVIDENCE / "mechanism" / f"{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / "removability.json", target)
        print(f"[{time.strftime('%H:%M:%S')}] done {name}/costs", flush=True)


def start(job: dict, env: dict) -> tuple:
    argv = ["easier-kernels", *job["argv"], "--out", str(job["out"])]
    if (job["out"] / "run.json").exists():
        argv.append("--resume")
    job["out"].parent.mkdir(parents=True, exist_ok=True)
    log = open(job["out"].parent / f"{job['out'].name}.log", "a")
    print(f"[{time.strftime('%H:%M:%S')}] start {job['name']}: {' '.join(argv)}", flush=True)
    log.write(" ".join(argv) + "\n")
    log.flush()
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    lock_path(job["out"]).write_text(str(process.pid))
    return process, log, job


def lock_path(out: Path) -> Path:
    return out.parent / f"{out.name}.lock"


def locked(out: Path) -> bool:
    """Whether a live process (of this or another `run`) works on `out`."""
    try:
        os.kill(int(lock_path(out).read_text()), 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False


def copy_report(out: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "report.json", target)


# ---- latency

def latency(args) -> None:
    """Latency (batch --batch-size) of the folded network after each step of the entropy run, over
    the original with batch norms folded (paired ratios, in turns), on this machine's CPU; and the
    trained final model folded, where the run folder is here."""
    import torch

    import easier_kernels as ek
    from easier_kernels.benchmark import fold_variants, latency_ratios

    torch.set_num_threads(os.cpu_count() or 1)
    for name in [k for k in EXPERIMENTS if not args.only or k in args.only]:
        path = EVIDENCE / name / "entropy.json"
        if not path.exists():
            print(f"skip {name}: no {path}")
            continue
        run = json.loads(path.read_text())
        settings = run["settings"]
        model = ek.models.build(settings["model"], num_classes=settings["num_classes"],
                                in_channels=settings["in_channels"], width=settings["width"]).eval()
        example = torch.randn([args.batch_size, *run["example_shape"][1:]], generator=torch.Generator().manual_seed(0))
        rows, removed = [], []
        for step in [None, *run["steps"]]:
            removed += step["removed"] if step else []
            variants = fold_variants(model, removed, example, compile=False)
            timed = latency_ratios({k: variants[k] for k in ("original", "bn_folded", "folded")}, example,
                                   seconds=args.seconds)
            rows.append({"removed": len(removed), "original_ms": timed["original"]["ms"],
                         "bn_folded_ms": timed["bn_folded"]["ms"], "folded_ms": timed["folded"]["ms"],
                         "ratio": timed["folded"]["ratio"], "q1": timed["folded"]["q1"], "q3": timed["folded"]["q3"],
                         "decisions": [d["choice"] for d in ek.recipe(variants["folded"])["fold"]["decisions"]]})
            print(f"{name}: {len(removed):>2} removed  folded {rows[-1]['folded_ms']:.2f} ms  "
                  f"bn_folded {rows[-1]['bn_folded_ms']:.2f} ms  ratio {rows[-1]['ratio']:.2f}", flush=True)
        record = {"batch_size": args.batch_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "machine": machine(), "rows": rows, "final": fold_final(Path(args.runs) / name / "entropy")}
        (EVIDENCE / name / "latency.json").write_text(json.dumps(record, indent=2) + "\n")


def fold_final(run_dir: Path) -> dict | None:
    """The trained final model of a run, folded: its test accuracy before and after folding."""
    import torch

    import easier_kernels as ek
    from easier_kernels.prune import read_record
    from easier_kernels.train import accuracy

    path = run_dir / "pruned.pt"
    if not path.exists():
        return None
    settings = read_record(path)["settings"]
    result = ek.load(path, lambda: ek.models.build(settings["model"], num_classes=settings["num_classes"],
                                                   in_channels=settings["in_channels"], width=settings["width"]))
    splits = ek.data.load(settings["dataset"], settings["data_root"], seed=settings["seed"], augment=False)
    test = torch.utils.data.DataLoader(splits.test, batch_size=256)
    net = result.model.eval()
    folded = ek.fold(net, next(iter(test))[0][:1])
    return {"pruned_test_accuracy": accuracy(net, test), "folded_test_accuracy": accuracy(folded, test),
            "relative_error": ek.recipe(folded)["fold"]["relative_error"],
            "plans": [d["choice"] for d in ek.recipe(folded)["fold"]["decisions"]]}


def machine() -> str:
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"


# ---- report

COLORS = {"entropy": "#1f77b4", "entropy-batch_mean": "#17becf", "random": "#7f7f7f", "first": "#d62728",
          "last": "#2ca02c"}
LABELS = {"entropy": "entropy (pooled)", "entropy-batch_mean": "entropy (batch_mean)", "random": "random",
          "first": "first layers first", "last": "last layers first"}


def load_runs() -> dict:
    """experiment -> rule -> report.json, for what docs/evidence/ holds."""
    runs = {}
    for name in EXPERIMENTS:
        for rule in rules_of(name):
            path = EVIDENCE / name / f"{rule}.json"
            if path.exists():
                runs.setdefault(name, {})[rule] = json.loads(path.read_text())
    return runs


def curve(run: dict, key: str = "test") -> tuple[list, list]:
    """(layers removed, accuracy) from the baseline through every step."""
    from easier_kernels.report import accuracy_series

    accepted, _ = accuracy_series(run)
    return accepted["x"], accepted[key]


def mean_accuracy(run: dict) -> float:
    """Test accuracy averaged over the removal path: the area under the linearly interpolated
    curve from 0 to all sites removed, over the number of sites (rules that remove two sites in
    one step are not favoured)."""
    x, y = curve(run)
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(x, x[1:], y, y[1:]))
    return area / x[-1]


def removed_within(run: dict, drop: float, key: str) -> int:
    """Layers removed before the accuracy first fell more than `drop` points below the baseline
    (what --max-drop would have kept, judged on `key`: val as the loop does, or test)."""
    x, y = curve(run, key)
    kept = 0
    for removed, accuracy in zip(x[1:], y[1:]):
        if accuracy < y[0] - drop:
            break
        kept = removed
    return kept


def random_rules(rules: dict) -> list:
    return [r for r in rules if r.startswith("random")]


def summary_rows(runs: dict) -> list[dict]:
    rows = []
    for name, rules in runs.items():
        first = next(iter(rules.values()))
        row = {"experiment": name, "sites": len(first["sites"]),
               "baseline test": first["baseline_test_accuracy"]}
        for rule in SUMMARY:
            draws = [rules[r] for r in (random_rules(rules) if rule == "random" else [rule]) if r in rules]
            if draws:
                means = [mean_accuracy(run) for run in draws]
                row[rule] = (statistics.mean(means), min(means), max(means), len(means))
                row[f"{rule} kept@1"] = (statistics.mean(removed_within(r, 1.0, "val") for r in draws),
                                         statistics.mean(removed_within(r, 1.0, "test") for r in draws))
        row["versus random"] = versus_random(rules)
        rows.append(row)
    return rows


def versus_random(rules: dict) -> tuple[int, int, int] | None:
    """At the removal counts that entropy and every random draw share: how often entropy's test
    accuracy is above every draw, below every draw, or among them."""
    draws = [dict(zip(*curve(rules[r]))) for r in random_rules(rules)]
    if "entropy" not in rules or not draws:
        return None
    ours = dict(zip(*curve(rules["entropy"])))
    shared = [x for x in ours if x > 0 and all(x in d for d in draws)]
    above = sum(ours[x] > max(d[x] for d in draws) for x in shared)
    below = sum(ours[x] < min(d[x] for d in draws) for x in shared)
    return above, below, len(shared) - above - below


def fmt(x, digits=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(head: list, rows: list) -> list[str]:
    from easier_kernels.report import _md_row

    return [_md_row(head), "|" + "---|" * len(head), *(_md_row(row) for row in rows)]


def summary_table(rows: list[dict]) -> list[str]:
    head = ["experiment", "sites", "baseline test"] + [LABELS[r] for r in SUMMARY]
    body = []
    for row in rows:
        cells = [row["experiment"], str(row["sites"]), fmt(row["baseline test"])]
        best = max(row[r][0] for r in SUMMARY if r in row)
        for rule in SUMMARY:
            if rule not in row:
                cells.append("-")
                continue
            mean, low, high, n = row[rule]
            text = fmt(mean) + (f" ({fmt(low)}-{fmt(high)})" if n > 1 else "")
            cells.append(f"**{text}**" if mean == best else text)
        body.append(cells)
    return markdown_table(head, body)


def kept_table(rows: list[dict]) -> list[str]:
    head = ["experiment"] + [LABELS[r] for r in SUMMARY] + ["entropy vs the random draws: above all / below all / among"]
    body = []
    for row in rows:
        cells = [row["experiment"]]
        for rule in SUMMARY:
            kept = row.get(f"{rule} kept@1")
            cells.append("-" if kept is None else f"{kept[0]:.3g} / {kept[1]:.3g}")
        versus = row.get("versus random")
        cells.append("-" if versus is None else " / ".join(map(str, versus)))
        body.append(cells)
    return markdown_table(head, body)


def step_table(name: str, rules: dict) -> list[str]:
    """Test accuracy per number of layers removed, one column per rule (every random draw)."""
    columns = [r for r in rules_of(name) if r in rules]
    points = {rule: dict(zip(*curve(rules[rule]))) for rule in columns}
    xs = sorted(set().union(*points.values()))
    return markdown_table(["removed"] + [LABELS.get(c, c) for c in columns],
                          [[x] + [fmt(points[c].get(x)) for c in columns] for x in xs])


def removal_orders(name: str, rules: dict) -> list[str]:
    lines = []
    for rule in ("entropy", "entropy-batch_mean"):
        if rule in rules:
            steps = [", ".join(s["removed"]) for s in rules[rule]["steps"]]
            lines.append(f"- {LABELS[rule]}: " + " -> ".join(f"`{s}`" for s in steps))
    return lines


def latency_table(name: str) -> list[str]:
    path = EVIDENCE / name / "latency.json"
    if not path.exists():
        return ["(no latency.json: run `python scripts/evidence.py latency`)"]
    record = json.loads(path.read_text())
    body = [[row["removed"], fmt(row["original_ms"]), fmt(row["bn_folded_ms"]), fmt(row["folded_ms"]),
             f"{fmt(row['ratio'])} ({fmt(row['q1'])}-{fmt(row['q3'])})",
             ", ".join(f"{n}x {c}" for c, n in sorted(Counter(row["decisions"]).items())) or "-"]
            for row in record["rows"]]
    lines = [f"Batch {record['batch_size']}, {record['threads']} threads, torch {record['torch']}, {record['machine']}.",
             "", *markdown_table(["removed", "original ms", "BN-folded ms", "ek.fold ms", "ek.fold / BN-folded (q1-q3)",
                                  "plans"], body)]
    if final := record.get("final"):
        lines += ["", f"The trained final model (every site linear), folded: test accuracy "
                      f"{fmt(final['pruned_test_accuracy'])} before, {fmt(final['folded_test_accuracy'])} after folding "
                      f"(relative output error {final['relative_error']:.1e}; plans: {', '.join(final['plans'])})."]
    return lines


def accuracy_figure(runs: dict, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from easier_kernels.report import _figure, _save_png

    fig = _figure(11, 8)
    axes = fig.subplots(2, 2).ravel()
    for ax, (name, rules) in zip(axes, runs.items()):
        for rule, run in rules.items():
            base = "random" if rule.startswith("random") else rule
            x, y = curve(run)
            style = {"random": dict(linestyle="--", alpha=0.6, linewidth=1.2),  # batch_mean over pooled: both show
                     "entropy-batch_mean": dict(linestyle=":", marker="x", linewidth=2.2)}.get(base, dict(marker="."))
            ax.plot(x, y, color=COLORS[base], label=LABELS[base] if rule == base else None, **style)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("activation layers removed")
        ax.set_ylabel("test accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    _save_png(fig, path)


def shape_figure(runs: dict, path: Path) -> None:
    """Accuracy drop from the baseline vs fraction of layers removed: our entropy runs beside the
    paper's published CIFAR-10 points (shape only: other data, other schedule)."""
    from easier_kernels.report import _figure, _save_png

    model_colors = {"resnet18": "#1f77b4", "vgg16_bn": "#ff7f0e", "mobilenet_v2": "#2ca02c"}
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for name, rules in runs.items():
        if "entropy" in rules:
            x, y = curve(rules["entropy"])
            sites = len(rules["entropy"]["sites"])
            cifar = "cifar" in EXPERIMENTS[name]["dataset"]
            ax.plot([v / sites for v in x], [v - y[0] for v in y], marker=".", linestyle="-." if cifar else "-",
                    color=model_colors[EXPERIMENTS[name]["model"]], label=f"ours: {name}")
    for model, points in PAPER.items():
        sites = {"resnet18": 17, "mobilenet_v2": 35, "vgg16_bn": 15}[model]
        ax.plot([p[0] / sites for p in points], [p[1] - points[0][1] for p in points], marker="s", linestyle=":",
                color=model_colors[model], alpha=0.7, label=f"paper, CIFAR-10: {model}")
    ax.set_xlabel("fraction of activation layers removed (entropy order)")
    ax.set_ylabel("test accuracy - baseline (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save_png(fig, path)


def latency_figure(path: Path) -> bool:
    from easier_kernels.report import _figure, _save_png

    records = {n: json.loads((EVIDENCE / n / "latency.json").read_text()) for n in EXPERIMENTS
               if (EVIDENCE / n / "latency.json").exists()}
    if not records:
        return False
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for name, record in records.items():
        rows = record["rows"]
        x = [r["removed"] for r in rows]
        ax.plot(x, [r["ratio"] for r in rows], marker=".", label=name)
        ax.fill_between(x, [r["q1"] for r in rows], [r["q3"] for r in rows], alpha=0.15)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("activation layers removed (entropy order)")
    ax.set_ylabel("latency: ek.fold / BN-folded original")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


def report(args) -> None:
    if args.study == "latency":
        return latency_report()
    if args.study == "recovery":
        return recovery_report()
    if args.study == "mechanism":
        return mechanism_report()
    if args.study == "language":
        return language.report(RESULTS)
    runs = load_runs()
    if not runs:
        sys.exit(f"nothing in {EVIDENCE}: run `python scripts/evidence.py run` first")
    IMAGES.mkdir(parents=True, exist_ok=True)
    accuracy_figure(runs, IMAGES / "evidence_accuracy.png")
    shape_figure(runs, IMAGES / "evidence_shape.png")
    has_latency = latency_figure(IMAGES / "evidence_latency.png")
    rows = summary_rows(runs)
    lines = [BEGIN, "", "### Test accuracy averaged over the whole removal path", "",
             "Area under the test-accuracy curve from 0 to every layer removed, over the number of layers "
             "(higher is better; random: mean of its draws, (min-max)).", "", *summary_table(rows), "",
             "### Layers removed before the accuracy fell more than 1 point below the baseline", "",
             "What `--max-drop 1` would have kept, judged on the validation subset (as the loop judges) / on the "
             "test split (random: mean of the draws). Last column: at how many removal counts the entropy run's "
             "test accuracy is above every random draw, below every one, or among them.", "", *kept_table(rows), "",
             "![test accuracy vs layers removed](images/evidence_accuracy.png)", "",
             "![shape beside the paper](images/evidence_shape.png)", ""]
    if has_latency:
        lines += ["![latency vs layers removed](images/evidence_latency.png)", ""]
    for name, rules in runs.items():
        settings = next(iter(rules.values()))["settings"]
        schedule = ", ".join(f"{k} {settings.get(k)}" for k in ("width", "train_size", "val_size", "epochs_per_step",
                                                              "layers_per_step", "lr", "batch_size", "seed"))
        lines += [f"### {name}", "", f"{schedule}; baseline: {EXPERIMENTS[name]['epochs']} epochs. Removal order:", "",
                  *removal_orders(name, rules), "", "Test accuracy (%) per layers removed:", "",
                  *step_table(name, rules), "", "Folded latency along the entropy run:", "", *latency_table(name), ""]
    lines.append(END)
    text = RESULTS.read_text() if RESULTS.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    RESULTS.write_text(head + "\n".join(lines) + tail)
    print(f"wrote {RESULTS} and {IMAGES}/evidence_*.png")


# ---- the latency study's report

LATENCY_BEGIN, LATENCY_END = "<!-- latency:begin (scripts/evidence.py report --study latency) -->", "<!-- latency:end -->"
GROUPS = {"entropy": "entropy (the paper's rule)", "entropy-latency": "entropy-latency (ours)", "random": "random",
          "output-change": "output-change"}
GROUP_COLORS = {"entropy": "#1f77b4", "entropy-latency": "#d62728", "random": "#7f7f7f", "output-change": "#2ca02c"}
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")  # other groups
RATIO_LEVELS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
DROP_LEVELS = (1.0, 2.0, 3.0)


def group_of(rule: str) -> str:
    """entropy-seed1 -> entropy, random-2 -> random: the runs summarized together."""
    return "random" if rule.startswith("random") else rule.removesuffix("-seed1")


def load_study_runs(name: str) -> dict:
    """experiment -> group -> [report.json of each seed or draw], for what docs/evidence/<study>/ holds."""
    experiments, rules_of_study = study(name)
    runs = {}
    for experiment in experiments:
        for rule in rules_of_study(experiment):
            path = EVIDENCE / name / experiment / f"{rule}.json"
            if path.exists():
                runs.setdefault(experiment, {}).setdefault(group_of(rule), []).append(json.loads(path.read_text()))
    return runs


def path_points(run: dict, key: str = "val") -> list[tuple]:
    """(layers removed, latency ratio, accuracy) from the unpruned network (folded) through every accepted step."""
    from easier_kernels.report import accuracy_series

    accepted, _ = accuracy_series(run)
    ratios = [run["baseline_payoff"]["latency_ratio"]] + [s["latency_ratio"] for s in run["steps"] if s["accepted"]]
    return list(zip(accepted["x"], ratios, accepted[key]))


def kept_index(run: dict, drop: float, key: str) -> int:
    """Where on the path the last network lies before the accuracy first fell more than `drop`
    points below the baseline: what --max-drop would have returned."""
    points = path_points(run, key)
    return next((i - 1 for i, point in enumerate(points) if point[2] < points[0][2] - drop), len(points) - 1)


def kept_within(run: dict, drop: float, key: str) -> tuple:
    """(layers removed, latency ratio) of what --max-drop `drop` would have returned."""
    layers, ratio, _ = path_points(run, key)[kept_index(run, drop, key)]
    return layers, ratio


def accuracy_at(run: dict, level: float, key: str) -> float | None:
    """Accuracy drop (points) of the first network on the path at or below latency ratio `level`."""
    points = path_points(run, key)
    return next((points[0][2] - acc for _, ratio, acc in points if ratio <= level), None)


def spread(values: list, sep: str = "-") -> str:
    """mean (min-max) of the values present; "n/N" when some runs never got there. `sep`: " to "
    where the values may be negative."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    text = fmt(statistics.mean(present)) + (f" ({fmt(min(present))}{sep}{fmt(max(present))})" if len(present) > 1 else "")
    return text + (f" [{len(present)}/{len(values)}]" if len(present) < len(values) else "")


def latency_tables(runs: dict) -> list[str]:
    lines = ["#### At most 1 (2, 3) points below the baseline: the latency ratio reached", "",
             "What `--max-drop` would have returned: its latency ratio (folded / original with batch norms folded, "
             "measured in the run) and, in brackets, layers removed; judged on validation (as the loop judges) at 1, 2 "
             "and 3 points, and on test at 1 point; mean (min-max) over seeds / draws.", ""]
    head = ["experiment", "rule", "runs"] + [f"<= {d} pt (val)" for d in DROP_LEVELS] + ["<= 1 pt (test)"]
    body = []
    for name, groups in runs.items():
        for group, members in groups.items():
            cells = [name, GROUPS.get(group, group), len(members)]
            for drop, key in [(d, "val") for d in DROP_LEVELS] + [(1.0, "test")]:
                kept = [kept_within(r, drop, key) for r in members]
                cells.append(f"{spread([k[1] for k in kept])} [{spread([k[0] for k in kept])}]")
            body.append(cells)
    lines += markdown_table(head, body)
    lines += ["", "#### At equal latency ratio: the accuracy kept", "",
              "Test accuracy drop (points below the baseline) of the first network on each path at or below the ratio; "
              "mean (min-max); [k/n]: only k of the n runs got that fast.", ""]
    body = []
    for name, groups in runs.items():
        for group, members in groups.items():
            body.append([name, GROUPS.get(group, group)] + [spread([accuracy_at(r, level, "test") for r in members])
                                                 for level in RATIO_LEVELS])
    lines += markdown_table(["experiment", "rule"] + [f"<= {level:g}x" for level in RATIO_LEVELS], body)
    return lines


def target_verdict(runs: dict) -> list[str]:
    """The issue's target on MobileNetV2: <= 0.7x at <= 1 point (validation), ahead of entropy and random."""
    lines = []
    for name, groups in runs.items():
        if LATENCY_EXPERIMENTS[name]["model"] != "mobilenet_v2" or not {"entropy", "entropy-latency", "random"} <= set(groups):
            continue
        mean = {g: statistics.mean(kept_within(r, 1.0, "val")[1] for r in groups[g]) for g in groups}
        ours, ahead = mean["entropy-latency"], mean["entropy-latency"] < min(mean["entropy"], mean["random"])
        lines += [f"Target ({name}, validation): entropy-latency reaches {ours:.3f}x at <= 1 point (target <= 0.7x: "
                  f"{'met' if ours <= 0.7 else 'missed'}); entropy {mean['entropy']:.3f}x, random {mean['random']:.3f}x "
                  f"(mean of the draws): {'ahead of both' if ahead else 'not ahead of both'}.", ""]
    return lines


def latency_figure_of_study(runs: dict, path: Path) -> None:
    from easier_kernels.report import _figure, _save_png

    rows = math.ceil(len(runs) / 2)
    fig = _figure(11, 4 * rows)
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, (name, groups) in zip(axes, runs.items()):
        for group, members in groups.items():
            color = GROUP_COLORS.get(group) or PALETTE[list(groups).index(group) % len(PALETTE)]
            for k, run in enumerate(members):  # a path per seed / draw: thin lines, the points are the data
                _, ratios, accuracy = zip(*path_points(run, "val"))
                ax.plot(ratios, accuracy, marker="o", markersize=3.5, linewidth=0.8, color=color,
                        alpha=0.85 if k == 0 else 0.5, linestyle="-" if group != "random" else "--",
                        label=GROUPS.get(group, group) if k == 0 else None)
        base = groups[next(iter(groups))][0]["baseline_accuracy"]
        ax.axhline(base - 1.0, color="0.3", linestyle=":", linewidth=1, label="1 point below the baseline")
        ax.invert_xaxis()
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("latency: folded / original with BN folded (eager, batch 1)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    _save_png(fig, path)


def latency_orders(name: str, groups: dict) -> list[str]:
    lines = []
    for group in ("entropy", "entropy-latency"):
        if group in groups:
            run = groups[group][0]
            steps = [f"`{', '.join(s['removed'])}` ({s['latency_ratio']:.2f}x)" for s in run["steps"]]
            lines.append(f"- {GROUPS[group]}, seed 0: " + " -> ".join(steps))
    return lines


def latency_report() -> None:
    runs = load_study_runs("latency")
    if not runs:
        sys.exit(f"nothing in {EVIDENCE / 'latency'}: run `python scripts/evidence.py run --study latency` first")
    IMAGES.mkdir(parents=True, exist_ok=True)
    latency_figure_of_study(runs, IMAGES / "latency_study.png")
    lines = [LATENCY_BEGIN, "", *target_verdict(runs), *latency_tables(runs), "",
             "![validation accuracy against latency ratio, per rule](images/latency_study.png)", ""]
    for name, groups in runs.items():
        run = next(iter(groups.values()))[0]
        settings, before = run["settings"], run["baseline_payoff"]
        lines += [f"#### {name}", "",
                  f"{len(run['sites'])} sites; width {settings['width']}, {settings['layers_per_step']} per step, "
                  f"baseline validation {run['baseline_accuracy']:.2f}%, test {run['baseline_test_accuracy']:.2f}%; "
                  f"original {before['latency_ms']:.3f} ms ({before['runtime']}, input {before['example_shape']}), "
                  f"{before['macs'] / 1e6:.2f} M MACs. Removal order (latency ratio after each step):", "",
                  *latency_orders(name, groups), ""]
    lines.append(LATENCY_END)
    write_section(LATENCY_BEGIN, LATENCY_END, lines)
    print(f"wrote {RESULTS} (latency study) and {IMAGES}/latency_study.png")


def write_section(begin: str, end: str, lines: list[str]) -> None:
    """`lines` (from `begin` to `end`) in place of that section of docs/RESULTS.md, appended where missing."""
    text = RESULTS.read_text()
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    RESULTS.write_text(head + "\n".join(lines) + rest.split(end, 1)[1])


# ---- the recovery study's report

RECOVERY_BEGIN, RECOVERY_END = "<!-- recovery:begin (scripts/evidence.py report --study recovery) -->", "<!-- recovery:end -->"


def cost_table(runs: dict) -> list[str]:
    """Wall-clock seconds per step (fine-tuning, validation, test, folding and timing), per variant."""
    body = [[name, group, len(members), spread([statistics.mean(s["seconds"] for s in r["steps"]) for r in members])]
            for name, groups in runs.items() for group, members in groups.items()]
    return markdown_table(["experiment", "variant", "runs", "seconds per step"], body)


def stops_early(run: dict) -> bool:
    """A run with the stopping rule: a --max-drop under the studies' 100 (which never stops)."""
    return run.get("max_drop", 100) < 100


def outcome(run: dict, index: int, rejected: int) -> list:
    """Cells of the network at `index` on the run's path: layers removed, latency ratio, validation
    and test drop (points below the baseline), tries rejected."""
    val, test = path_points(run, "val"), path_points(run, "test")
    layers, ratio, accuracy = val[index]
    return [layers, ratio, val[0][2] - accuracy, test[0][2] - test[index][2], rejected]


def retry_table(runs: dict) -> list[str]:
    """The stopping rule as a user runs it: per variant, what `--max-drop D` returns without retry
    (its path cut where validation first fell more than D points: the run would have stopped there)
    and what the variant's `-patience` runs (--max-drop D --patience N) returned."""
    body = []
    for name, groups in runs.items():
        for group, members in groups.items():
            retried = groups.get(f"{group}-patience")
            if stops_early(members[0]) or not retried:
                continue
            drop, patience = retried[0]["max_drop"], retried[0]["settings"]["patience"]
            cut = []
            for run in members:
                index = kept_index(run, drop, "val")
                cut.append(outcome(run, index, int(index < len(run["steps"]))))
            stopped = [outcome(run, -1, sum(not s["accepted"] for s in run["steps"])) for run in retried]
            for label, cells in ((f"{group}, --max-drop {drop:g}", cut),
                                 (f"{group}, --max-drop {drop:g} --patience {patience}", stopped)):
                body.append([name, label, len(cells), *(spread(list(column)) for column in zip(*cells))])
    head = ["experiment", "variant", "runs", "layers removed", "latency ratio", "val drop (pt)", "test drop (pt)",
            "tries rejected"]
    return markdown_table(head, body) if body else []


def recovery_report() -> None:
    runs = load_study_runs("recovery")
    if not runs:
        sys.exit(f"nothing in {EVIDENCE / 'recovery'}: run `python scripts/evidence.py run --study recovery` first")
    paths = {name: {g: m for g, m in groups.items() if not stops_early(m[0])} for name, groups in runs.items()}
    IMAGES.mkdir(parents=True, exist_ok=True)
    drawn = {name: {g: m for g, m in groups.items() if g in FIGURE_VARIANTS} for name, groups in paths.items()}
    latency_figure_of_study(drawn, IMAGES / "recovery_study.png")
    lines = [RECOVERY_BEGIN, "", *latency_tables(paths), "",
             "![validation accuracy against latency ratio: plain, distill, combined, plain-wallclock]"
             "(images/recovery_study.png)", ""]
    retries = retry_table(runs)
    if retries:
        lines += ["#### The stopping rule, without and with retry on rejection", "",
                  "What a run with the stopping rule returns: without retry, the variant's path cut where validation "
                  "first fell past the line (that run stops there); with `--patience`, the runs themselves (rejected "
                  "tries count towards `--max-steps`). Mean (min-max) over seeds.", "", *retries, ""]
    lines += ["#### What each variant costs", "", *cost_table(runs), "", RECOVERY_END]
    write_section(RECOVERY_BEGIN, RECOVERY_END, lines)
    print(f"wrote {RESULTS} (recovery study) and {IMAGES}/recovery_study.png")


# ---- the mechanism study's report

MECHANISM_BEGIN, MECHANISM_END = ("<!-- mechanism:begin (scripts/evidence.py report --study mechanism) -->",
                                  "<!-- mechanism:end -->")
SCORE_LABELS = {"entropy": "entropy (the paper)", "off_fraction": "off fraction", "linearization_error":
                "linearization error", "output_change": "output change", "random": "random (10 draws)"}
RANDOM_DRAWS = 10


def load_mechanism() -> dict:
    """experiment -> the `costs` record copied to docs/evidence/mechanism/."""
    return {name: json.loads(path.read_text()) for name in MECHANISM_EXPERIMENTS
            if (path := EVIDENCE / "mechanism" / f"{name}.json").exists()}


def seed_costs(record: dict, oracle: str = "finetuned") -> dict:
    """oracle seed -> site -> points lost after fine-tuning; for oracle="untrained", the one
    measurement before any training."""
    if oracle == "untrained":
        return {"untrained": {site: c["untrained"] for site, c in record["costs"].items() if "untrained" in c}}
    return {seed: {site: c["finetuned"][seed] for site, c in record["costs"].items() if seed in c["finetuned"]}
            for seed in map(str, record["seeds"])}


def loop_k(name: str, record: dict) -> int:
    """The number of layers the loop removes at <= 1 point (validation): the latency study's
    entropy runs where they exist (mean, rounded), else the sites that cost <= 1 point alone."""
    runs = [json.loads(path.read_text()) for path in sorted((EVIDENCE / "latency" / name).glob("entropy*.json"))
            if path.stem in ("entropy", "entropy-seed1")]
    if not runs:
        return max(1, record["k"])
    return max(1, round(statistics.mean(kept_within(run, 1.0, "val")[0] for run in runs)))


def score_agreement(record: dict, k: int, oracle: str = "finetuned") -> dict:
    """score -> statistic -> [its value against each oracle seed's costs] (random: every draw too),
    and "oracle" -> the two seeds' costs against each other (how well the oracle ranks itself)."""
    from easier_kernels.oracle import agreement
    from easier_kernels.scores import random_scores

    costs = seed_costs(record, oracle)
    table = {}
    for score, values in record["scores"].items():
        draws = [random_scores(values, seed) for seed in range(RANDOM_DRAWS)] if score == "random" else [values]
        found = [agreement(draw, cost, k) for draw in draws for cost in costs.values()]
        table[score] = {stat: [f[stat] for f in found] for stat in ("spearman", "kendall", "top_k")}
    if len(costs) >= 2:
        first, second, *_ = costs.values()
        table["oracle"] = {stat: [value] for stat, value in agreement(first, second, k).items()}
    return table


def beyond_spread(table: dict, score: str, stat: str = "spearman", floor: bool = False) -> bool:
    """Whether `score` ranks better than the entropy on every oracle seed: its worst above the
    entropy's best; with `floor`, above every random draw's too (where one measurement has no
    seeds' spread, chance is the yardstick)."""
    worst = min(table[score][stat])
    return worst > max(table["entropy"][stat]) and (not floor or worst > max(table["random"][stat]))


def agreement_tables(records: dict, oracle: str = "finetuned") -> tuple[list[str], dict]:
    names = list(records)
    tables = {name: score_agreement(record, loop_k(name, record), oracle) for name, record in records.items()}
    against = "the cost after fine-tuning" if oracle == "finetuned" else "the cost before any training"
    lines = []
    for stat, title in (("spearman", "Spearman rank correlation"), ("kendall", "Kendall's tau-b"),
                        ("top_k", "Top-k overlap (k = layers the loop removes at <= 1 point)")):
        head = ["score"] + [f"{n} (k={loop_k(n, records[n])})" if stat == "top_k" else n for n in names]
        labels = {**SCORE_LABELS, "oracle": "the oracle's seed 0 against its seed 1 (the ceiling)"}
        body = [[label] + [spread(tables[n][score][stat], " to ") if score in tables[n] else "-" for n in names]
                for score, label in labels.items() if any(score in tables[n] for n in names)]
        lines += [f"#### {title} of each score with {against}", "", *markdown_table(head, body), ""]
    return lines, tables


def mechanism_figure(records: dict, path: Path) -> None:
    """Score (x) against the mean fine-tuned cost (y), one point per site, labelled: models in rows, scores in columns."""
    from easier_kernels.oracle import finetuned_cost
    from easier_kernels.report import _figure, _save_png

    scores = [s for s in SCORE_LABELS if s != "random"]
    fig = _figure(4.2 * len(scores), 3.6 * len(records))
    axes = fig.subplots(len(records), len(scores), squeeze=False)
    for row, (name, record) in zip(axes, records.items()):
        cost = finetuned_cost(record["costs"])
        for ax, score in zip(row, scores):
            values = record["scores"].get(score, {})
            finite = [v for v in values.values() if math.isfinite(v)]
            top = max(finite) * 1.1 if finite else 1.0
            for site, value in values.items():  # an infinite score (an always-off site) drawn at the right edge
                x = value if math.isfinite(value) else top
                ax.scatter([x], [cost[site]], s=14, color="#d62728" if not math.isfinite(value) else "#1f77b4")
                ax.annotate(site.replace("_relu", ".r").replace("features_", "f").replace("blocks_", "b"), (x, cost[site]),
                            fontsize=5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
            ax.set_title(f"{name}: {SCORE_LABELS[score]}", fontsize=8)
            ax.set_xlabel(SCORE_LABELS[score], fontsize=7)
            ax.set_ylabel("points lost (alone, fine-tuned)", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
    _save_png(fig, path)


def site_table(record: dict) -> list[str]:
    """Every site of one model by cost: the oracle and every score."""
    from easier_kernels.oracle import finetuned_cost

    cost = finetuned_cost(record["costs"])
    scores = record["scores"]
    head = ["site", "cost (fine-tuned)", "cost (untrained)", "always on / off", "entropy", "off fraction",
            "lin. error", "output change"]
    body = []
    for site in sorted(cost, key=lambda n: cost[n]):
        on, off = record["split"][site]
        body.append([site, spread(list(record["costs"][site]["finetuned"].values()), " to "),
                     fmt(record["costs"][site].get("untrained")), f"{on:.2f} / {off:.2f}",
                     *(fmt(scores[s][site], 3) if s in scores else "-" for s in
                       ("entropy", "off_fraction", "linearization_error", "output_change"))])
    return markdown_table(head, body)


def mechanism_loop() -> list[str]:
    """The loop study with --select output-change, entropy and random (and the recovery study's
    entropy-latency `plain` runs, from the same baselines): tables and the figure."""
    runs = load_study_runs("mechanism")
    for name, groups in runs.items():
        recovered = [json.loads(path.read_text()) for rule in ("plain", "plain-seed1")
                     if (path := EVIDENCE / "recovery" / name / f"{rule}.json").exists()]
        if recovered:
            groups["entropy-latency"] = recovered
    if not runs:
        return []
    latency_figure_of_study(runs, IMAGES / "mechanism_loop.png")
    return ["#### The loop with `--select output-change`", "",
            "The latency study's schedule from the recovery study's baselines; two loop seeds per rule, two random "
            "orders.", "", *latency_tables(runs), "",
            "![validation accuracy against latency ratio, per rule](images/mechanism_loop.png)", ""]


def verdicts(records: dict, tables: dict, against: str, floor: bool = False) -> list[str]:
    how = "than the entropy and every random draw" if floor else "than the entropy beyond the seeds' spread"
    lines = []
    for score in SCORE_LABELS:
        if score in ("entropy", "random"):
            continue
        better = [n for n in records if score in tables[n] and beyond_spread(tables[n], score, floor=floor)]
        lines.append(f"- {SCORE_LABELS[score]}: ranks {against} better {how} (Spearman) on {len(better)} of "
                     f"{len(records)} models{': ' + ', '.join(better) if better else ''}.")
    return lines


def mechanism_report() -> None:
    records = load_mechanism()
    if not records:
        sys.exit(f"nothing in {EVIDENCE / 'mechanism'}: run `python scripts/evidence.py run --study mechanism` first")
    IMAGES.mkdir(parents=True, exist_ok=True)
    mechanism_figure(records, IMAGES / "mechanism_scatter.png")
    tables_lines, tables = agreement_tables(records)
    untrained_lines, untrained = agreement_tables(records, "untrained")
    lines = [MECHANISM_BEGIN, "", "Mean (min-max) over the oracle's two fine-tuning seeds (random: over 10 draws too). "
             "Positive: the score ranks the sites as their cost does (low score, cheap removal).", "", *tables_lines,
             *verdicts(records, tables, "the cost after fine-tuning"), "",
             "The cheaper oracle: the points lost with the site linearized and no training at all (one measurement "
             "per site; random over 10 draws).", "", *untrained_lines,
             *verdicts(records, untrained, "the cost before training", floor=True)]
    lines += ["", "![score against cost, one point per site](images/mechanism_scatter.png)", ""]
    lines += mechanism_loop()
    for name, record in records.items():
        lines += [f"<details><summary>{name}: {len(record['costs'])} sites, baseline validation "
                  f"{record['baseline']:.2f}% ({record['val_size']} images), fine-tuned {record['epochs']} epoch on "
                  f"{record['train_size']} images</summary>", "", *site_table(record), "", "</details>", ""]
    lines.append(MECHANISM_END)
    write_section(MECHANISM_BEGIN, MECHANISM_END, lines)
    print(f"wrote {RESULTS} (mechanism study) and {IMAGES}/mechanism_scatter.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the prune runs (baseline, then every rule, per experiment)")
    p.add_argument("--study", default="rules", choices=list(STUDIES), help="rules: the entropy against naive rules; "
                   "latency: latency-aware selection against entropy and random")
    p.add_argument("--runs", help="folder of the run folders and logs (default: runs/evidence or runs/latency)")
    p.add_argument("--data-root", default=str(DATA), help="the folder holding fashion-mnist/ and cifar10-subset/")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    p.add_argument("--threads", type=int, help="threads per run (default: the cores over --jobs)")
    p.add_argument("--only", nargs="+", choices=sorted({*EXPERIMENTS, *LATENCY_EXPERIMENTS, *language.LANGUAGE_EXPERIMENTS}),
                   help="these experiments only")
    p.set_defaults(func=run)
    p = sub.add_parser("latency", help="folded latency vs layers removed, along each entropy run")
    p.add_argument("--runs", default=str(ROOT / "runs" / "evidence"), help="where `run` put the run folders (for "
                   "folding the trained final models)")
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0, help="timing time per point")
    p.set_defaults(func=latency)
    p = sub.add_parser("report", help="docs/RESULTS.md's generated part and the plots, from docs/evidence/")
    p.add_argument("--study", default="rules", choices=list(STUDIES))
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
