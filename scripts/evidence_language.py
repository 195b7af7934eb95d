"""The language study of docs/RESULTS.md ("Language models"): EASIER on a GPT-2-style causal LM
(Tiny Shakespeare) and a BERT-style classifier (SST-2), against removing whole blocks by Block
Influence (ShortGPT), the depth-pruning anchor for transformers.

    python scripts/evidence.py run --study language      # baselines, the rules (CLI), then block removal
    python scripts/evidence.py report --study language   # its part of docs/RESULTS.md and the plot

The EASIER runs are `easier-kernels prune` commands (evidence.py runs them); the block removal
runs here, in Python, with the loop's own pieces: the same baseline weights, tokenizer, data,
fine-tuning schedule per step (one block removed, then the epochs a step fine-tunes), evaluation
and latency timing (`ek.payoff.measure`: the forward at the deploy batch, paired rounds against
the original), and for the LM the generation speed (`ek.payoff.generation`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "docs" / "evidence" / "language"

# Schedules these 2 cores afford: each step fine-tunes on the first --train-size training samples. The
# runs go to the end (every site; `quality` never stops them) and are cut where validation first
# crossed `line` (+5% perplexity, -1 point): exactly what the loop with that line returns, as the
# runs are deterministic and share every choice up to there.
LANGUAGE_EXPERIMENTS = {
    "gpt2-tinyshakespeare": dict(
        model="hf-gpt2:n_layer=6,n_embd=256,n_head=4", dataset="text/tinyshakespeare.txt", tokenizer="bpe:4096",
        seq_len=128, batch_size=32, epochs=4, train_size=640, quality=["--max-increase", "10"], line=0.05, blocks=5),
    "bert-sst2": dict(
        model="hf-bert:num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024",
        dataset="text/sst2", tokenizer="bpe:4096", seq_len=64, batch_size=64, epochs=2, baseline_train_size=20000,
        train_size=4000, quality=["--max-drop", "100"], line=1.0, blocks=3),
}
SEED1 = ["--seed", "1"]
LANGUAGE_RULES = {
    "entropy": [], "entropy-seed1": SEED1,
    "entropy-latency": ["--select", "entropy-latency"], "entropy-latency-seed1": ["--select", "entropy-latency", *SEED1],
    "random": ["--select", "random", "--select-seed", "0"], "random-1": ["--select", "random", "--select-seed", "1"],
    "random-2": ["--select", "random", "--select-seed", "2"],
}
BLOCK_SEEDS = (0, 1)


def _dataset(spec: dict, data_root: Path) -> str:
    prefix = "text:" if spec["dataset"].endswith(".txt") else "tsv:"
    return prefix + str(data_root / spec["dataset"])


def jobs(runs: Path, data_root: Path, only=None) -> list[dict]:
    """Every CLI invocation of the study, as evidence.py's jobs: a baseline per experiment, then its rules."""
    out = []
    for name, spec in LANGUAGE_EXPERIMENTS.items():
        if only and name not in only:
            continue
        base = runs / name / "baseline"
        common = ["--model", spec["model"], "--dataset", _dataset(spec, data_root), "--seq-len", str(spec["seq_len"]),
                  "--batch-size", str(spec["batch_size"]), "--quiet"]
        baseline_size = ["--train-size", str(spec["baseline_train_size"])] if spec.get("baseline_train_size") else []
        out.append({"name": f"{name}/baseline", "out": base, "after": None,
                    "argv": ["prune", *common, "--tokenizer", spec["tokenizer"], "--epochs", str(spec["epochs"]),
                             "--max-steps", "0", "--seed", "0", *baseline_size]})
        for rule, extra in LANGUAGE_RULES.items():
            out.append({"name": f"{name}/{rule}", "out": runs / name / rule, "after": f"{name}/baseline",
                        "argv": ["prune", *common, "--tokenizer", f"file:{base / 'tokenizer.json'}",
                                 "--weights", str(base / "baseline.pt"), "--train-size", str(spec["train_size"]),
                                 *spec["quality"], "--seed", "0", *extra]})
    return sorted(out, key=lambda j: j["after"] is not None)


# ---- the anchor: whole blocks removed by Block Influence


def block_removal(runs: Path, data_root: Path, only=None) -> None:
    """For each experiment and seed: Block Influence on the baseline, then one block removed per
    step (lowest first), each step fine-tuned as an EASIER step is; written to
    docs/evidence/language/<experiment>/blocks-seed<k>.json."""
    for name, spec in LANGUAGE_EXPERIMENTS.items():
        if only and name not in only:
            continue
        for seed in BLOCK_SEEDS:
            target = EVIDENCE / name / f"blocks-seed{seed}.json"
            if target.exists():
                continue
            print(f"[{time.strftime('%H:%M:%S')}] start {name}/blocks-seed{seed}", flush=True)
            record = _remove_blocks(name, spec, runs / name / "baseline", data_root, seed)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(record, indent=1))
            print(f"[{time.strftime('%H:%M:%S')}] done {name}/blocks-seed{seed}", flush=True)


def _remove_blocks(name: str, spec: dict, base: Path, data_root: Path, seed: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset

    from easier_kernels.compat import import_torchvision

    import_torchvision()
    import easier_kernels as ek
    from easier_kernels import checkpoints, depth, models, payoff, tasks, text, train

    splits = text.load(_dataset(spec, data_root), f"file:{base / 'tokenizer.json'}", seq_len=spec["seq_len"],
                       cache_dir=base / "tokens", split_seed=0)
    tok = splits.tokenizer
    text_spec = models.TextSpec(splits.task, tok.vocab_size, spec["seq_len"], tok.pad_id, tok.eos_id)
    task = tasks.CausalLM() if splits.task == "causal_lm" else tasks.Classification()
    baseline = models.build(spec["model"], num_classes=splits.num_labels, text=text_spec)
    baseline.load_state_dict(torch.load(base / "baseline.pt", weights_only=True)["state_dict"])
    baseline.eval()
    checkpoints.seed_everything(seed)
    loader = lambda data, shuffle: DataLoader(data, batch_size=spec["batch_size"], shuffle=shuffle,  # noqa: E731
                                              collate_fn=splits.collate)
    train_loader = loader(Subset(splits.train, range(min(spec["train_size"], len(splits.train)))), True)
    val_loader, test_loader = loader(splits.val, False), loader(splits.test, False)
    example = next(iter(val_loader))
    deploy = {k: v[:1] for k, v in example.items() if k != "labels"}  # the CLI's deploy batch: 1 sample (keywords)
    scores = depth.block_influence(baseline, train_loader, max_batches=20)
    order = depth.order_by_influence(scores)
    list_path = order[0].rpartition(".")[0]
    remaining = list(range(len(order)))
    steps, current = [], baseline
    base_val = task.evaluate(baseline, val_loader)
    base_test = task.evaluate(baseline, test_loader)
    for k, block in enumerate(order[:spec["blocks"]], 1):
        started = time.perf_counter()
        index = int(block.rpartition(".")[2])
        current = depth.remove_blocks(current, [f"{list_path}.{remaining.index(index)}"])
        remaining.remove(index)
        current.train()
        train.fit(current, train_loader, 1, lr=3e-4, weight_decay=1e-4, optimizer="adamw", loss_fn=task.loss)
        current.eval()
        paid = payoff.measure(current, baseline, deploy)
        step = {"step": k, "removed": block, "val": task.evaluate(current, val_loader),
                "test": task.evaluate(current, test_loader), "latency_ratio": paid["latency_ratio"],
                "latency_q1": paid["latency_q1"], "latency_q3": paid["latency_q3"], "noisy": paid["noisy"],
                "macs": paid["macs"], "seconds": time.perf_counter() - started}
        if task.name == "causal_lm":
            prompt = deploy["input_ids"][:, :16]
            step["generation"] = payoff.generation(current, baseline, prompt, 32)
        steps.append(step)
        print(f"  {name} seed {seed}: -{block} val {step['val']:.3f} ratio {step['latency_ratio']:.3f}", flush=True)
    return {"experiment": name, "seed": seed, "metric": task.metric, "block_influence": scores, "order": order,
            "baseline_val": base_val, "baseline_test": base_test, "steps": steps, "ek_version": ek.__version__}


if __name__ == "__main__":
    sys.exit("run it through scripts/evidence.py (--study language)")


def rule_generation(runs: Path, data_root: Path, only=None) -> None:
    """Greedy generation speed (KV cache) at each causal-LM rule run's cut (where validation first
    crossed the line): the checkpoint of its last kept step rebuilt, folded, written back into the
    GPT-2 and timed against the baseline; docs/evidence/language/<experiment>/generation.json."""
    for name, spec in LANGUAGE_EXPERIMENTS.items():
        target = EVIDENCE / name / "generation.json"
        if (only and name not in only) or not spec["dataset"].endswith(".txt"):
            continue
        done = json.loads(target.read_text()) if target.exists() else {}
        for rule in LANGUAGE_RULES:
            report = runs / name / rule / "report.json"
            if rule in done or not report.exists():
                continue
            print(f"[{time.strftime('%H:%M:%S')}] generation {name}/{rule}", flush=True)
            done[rule] = _generation_at_cut(json.loads(report.read_text()), runs / name, rule, spec)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(done, indent=1))


def _generation_at_cut(run: dict, folder: Path, rule: str, spec: dict) -> dict | None:
    import torch

    from easier_kernels.compat import import_torchvision

    import_torchvision()
    import easier_kernels as ek
    from easier_kernels import models, payoff
    from easier_kernels.capture import example_from_spec, tied_filled
    from easier_kernels.linearize import from_recipe

    steps = [{"val": s["val_accuracy"]} for s in run["steps"]]
    kept = _kept(steps, _passes(True, run["baseline_accuracy"], spec["line"]))
    if kept == 0:
        return None  # nothing removed: the unpruned model
    settings = run["settings"]
    text_spec = models.TextSpec("causal_lm", settings["vocab_size"], settings["seq_len"], settings["pad_id"],
                                settings["eos_id"])
    baseline = models.build(settings["model"], text=text_spec)
    baseline.load_state_dict(torch.load(folder / "baseline" / "baseline.pt", weights_only=True)["state_dict"])
    baseline.eval()
    state = torch.load(folder / rule / "checkpoints" / f"step_{kept:03d}.pt", weights_only=False)["state"]
    example = example_from_spec(run["example"])
    net = from_recipe(baseline, state["recipe"], example)
    net.load_state_dict(tied_filled(net, state["state_dict"]))
    pruned = ek.write_back(ek.fold(net.eval(), example, original=baseline), baseline)
    prompt = torch.randint(2, settings["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    return {**payoff.generation(pruned, baseline, prompt, 32), "step": kept}


# ---- report

BEGIN, END = "<!-- language:begin (scripts/evidence.py report --study language) -->", "<!-- language:end -->"
GROUPS = {"entropy": ("entropy", "entropy-seed1"), "entropy-latency": ("entropy-latency", "entropy-latency-seed1"),
          "random": ("random", "random-1", "random-2")}
COLORS = {"entropy": "#1f77b4", "entropy-latency": "#2ca02c", "random": "#7f7f7f", "blocks": "#d62728"}


def load() -> dict:
    """experiment -> {"rules": {rule: report.json}, "blocks": [blocks-seed*.json]}, from docs/evidence/language/."""
    found = {}
    for name in LANGUAGE_EXPERIMENTS:
        folder = EVIDENCE / name
        rules = {r: json.loads((folder / f"{r}.json").read_text()) for r in LANGUAGE_RULES if (folder / f"{r}.json").exists()}
        blocks = [json.loads(p.read_text()) for p in sorted(folder.glob("blocks-seed*.json"))]
        generation = json.loads((folder / "generation.json").read_text()) if (folder / "generation.json").exists() else {}
        if rules or blocks:
            found[name] = {"rules": rules, "blocks": blocks, "generation": generation}
    return found


def _lm(runs: dict) -> bool:
    return any(r["settings"].get("task") == "causal_lm" for r in runs["rules"].values()) or \
        any(b["metric"] == "perplexity" for b in runs["blocks"])


def _spread(values: list, fmt: str = ".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:{fmt}}" + (f" ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else "")


def _passes(lm: bool, base: float, line: float):
    return (lambda v: v <= base * (1 + line)) if lm else (lambda v: v >= base - line)


def _kept(steps: list, passes) -> int:
    """How many steps the loop with the line keeps: up to the first step past it."""
    return next((i for i, s in enumerate(steps) if not passes(s["val"])), len(steps))


def _rule_end(run: dict, lm: bool, line: float, generation: dict | None) -> dict:
    """A run to the end, cut where validation first crossed the line."""
    steps = [{"val": s["val_accuracy"], "test": s["test_accuracy"], "ratio": s["latency_ratio"],
              "layers": len(s["removed"])} for s in run["steps"]]
    kept = _kept(steps, _passes(lm, run["baseline_accuracy"], line))
    last = steps[kept - 1] if kept else None
    return {"layers": sum(s["layers"] for s in steps[:kept]), "ratio": last["ratio"] if last else 1.0,
            "val": last["val"] if last else run["baseline_accuracy"],
            "test": last["test"] if last else run.get("baseline_test_accuracy"),
            "speedup": (generation or {}).get("speedup") if kept else (1.0 if lm else None),
            "noisy": bool((generation or {}).get("noisy")) and bool(kept),
            "path": [(1.0, run["baseline_accuracy"], run.get("baseline_test_accuracy"))]
            + [(s["ratio"], s["val"], s["test"]) for s in steps]}


def _blocks_end(record: dict, lm: bool, line: float) -> dict:
    base = record["baseline_val"]
    steps = [{"val": s["val"], "test": s["test"], "ratio": s["latency_ratio"], "generation": s.get("generation")}
             for s in record["steps"]]
    kept = _kept(steps, _passes(lm, base, line))
    last = steps[kept - 1] if kept else None
    return {"layers": kept, "ratio": last["ratio"] if last else 1.0,
            "val": last["val"] if last else base, "test": last["test"] if last else record["baseline_test"],
            "speedup": (last["generation"] or {}).get("speedup") if last else (1.0 if lm else None),
            "noisy": bool(last and (last["generation"] or {}).get("noisy")),
            "path": [(1.0, base, record["baseline_test"])] + [(s["ratio"], s["val"], s["test"]) for s in steps]}


def _quality_at(path: list, ratio: float) -> tuple | None:
    """(val, test) of the first point of a path at or below `ratio`, None where the path never gets there."""
    return next(((v, t) for r, v, t in path if r is not None and r <= ratio), None)


def report_lines() -> list[str]:
    found = load()
    lines = [BEGIN, ""]
    for name, runs in found.items():
        lm = _lm(runs)
        spec = LANGUAGE_EXPERIMENTS[name]
        allowed = spec["line"]
        unit = "perplexity" if lm else "accuracy (%)"
        q = ".1f" if lm else ".2f"  # how a quality prints
        ends = {g: [_rule_end(runs["rules"][r], lm, allowed, runs["generation"].get(r)) for r in rules
                    if r in runs["rules"]] for g, rules in GROUPS.items()}
        ends["blocks"] = [_blocks_end(b, lm, allowed) for b in runs["blocks"]]
        base = next(iter(runs["rules"].values()))["baseline_accuracy"] if runs["rules"] else runs["blocks"][0]["baseline_val"]
        lines += [f"### {name}", "", f"`{spec['model']}`, {spec['tokenizer']}, sequence length {spec['seq_len']}; "
                  f"baseline validation {unit} {base:{q}}. Where each rule stops at "
                  + ("+5% validation perplexity" if lm else "1 point of validation accuracy")
                  + " (mean (min-max) over seeds / draws; forward latency at batch 1 against the unpruned model, "
                  "eager on this CPU" + ("; generation: greedy, KV cache, 32 new tokens after 16" if lm else "") + "):", ""]
        header = ["rule", "runs", "removed", "forward latency", f"val {unit}", f"test {unit}"]
        if lm:
            header.append("generation speed-up")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group, rows in ends.items():
            if not rows:
                continue
            label = "block removal (Block Influence)" if group == "blocks" else group
            cells = [label, str(len(rows)), _spread([r["layers"] for r in rows], ".1f"),
                     _spread([r["ratio"] for r in rows]), _spread([r["val"] for r in rows], q),
                     _spread([r["test"] for r in rows], q)]
            if lm:  # (?: a timing marked noisy: the machine was busy)
                cells.append(_spread([r["speedup"] for r in rows], ".2f") + ("?" if any(r["noisy"] for r in rows) else ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "At equal forward latency: each block-removal step's latency ratio, the block removal's "
                  f"validation / test {unit} there, and EASIER's (entropy-latency, entropy) at the first step of its "
                  "path (run to the end) at or below that ratio (- where it never got there):", "",
                  "| blocks removed | latency ratio | block removal | EASIER entropy-latency | EASIER entropy |",
                  "|---|---|---|---|---|"]
        steps = max((len(b["steps"]) for b in runs["blocks"]), default=0)
        for k in range(steps):
            points = [b["steps"][k] for b in runs["blocks"] if len(b["steps"]) > k]
            ratio = sum(p["latency_ratio"] for p in points) / len(points)
            cells = [str(k + 1), f"{ratio:.3f}", f"{_spread([p['val'] for p in points], q)} / "
                     f"{_spread([p['test'] for p in points], q)}"]
            for group in ("entropy-latency", "entropy"):
                at = [point for r in ends[group] if (point := _quality_at(r["path"], ratio)) is not None]
                cells.append(f"{_spread([v for v, _ in at], q)} / {_spread([t for _, t in at], q)} ({len(at)} of "
                             f"{len(ends[group])} runs)" if at else f"- (0 of {len(ends[group])})")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"![{name}: quality against forward latency](images/language_{name}.png)", ""]
        _figure(name, ends, unit, base, allowed, lm)
    return lines + [END]


def _figure(name: str, ends: dict, unit: str, base: float, allowed: float, lm: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for group, rows in ends.items():
        for i, row in enumerate(rows):
            ratios, vals = zip(*[(r, v) for r, v, _ in row["path"] if r is not None])
            ax.plot(ratios, vals, "o-", color=COLORS[group], alpha=0.8, markersize=3,
                    label=("block removal (Block Influence)" if group == "blocks" else f"EASIER {group}") if i == 0 else None)
    ax.axhline(base * (1 + allowed) if lm else base - allowed, color="k", linestyle="--", linewidth=0.8,
               label="+5% perplexity" if lm else "-1 point")
    ax.set_xlabel("forward latency / unpruned (eager, batch 1)")
    ax.set_ylabel(f"validation {unit}")
    ax.invert_xaxis()
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    fig.savefig(images / f"language_{name}.png")
    plt.close(fig)


def report(results: Path) -> None:
    lines = report_lines()
    text = results.read_text()
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    results.write_text(head + "\n".join(lines) + rest.split(END, 1)[1])
    print(f"wrote {results} (language) and docs/images/language_*.png")
