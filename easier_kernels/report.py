"""The report files of a pruning run: report.json, report.md, entropy.png, accuracy.png and latency.png.

    from easier_kernels import report
    paths = report.write_report(run, "runs/resnet18")   # run: the dict ek.prune returns
    print(report.step_header(run))                      # a CLI's live table, one row per step
    print(report.step_row(run, step))
    print(report.summary(run))                          # what the run bought: layers, accuracy, latency, MACs, params

The run dict (accuracies in percent): baseline_accuracy, baseline_test_accuracy?, max_drop,
accuracy, test_accuracy?, sites (execution order), linearized, stopped, mode, settings?, and
steps: [{step, removed, entropy (site -> bits, for the sites active before the step),
val_accuracy, test_accuracy?, accepted, seconds, latency_ratio?, latency_ms?, macs?, params?,
baseline_ms?, latency_q1?, latency_q3?, noisy?, noisy_why?}], deploy_batch? (the batch plans and
latencies were timed at), baseline_payoff? {runtime, device, example_shape (at the deploy batch),
latency_ms (the original's, at the start), macs, params, latency_q1?, latency_q3?, noisy?,
noisy_why?} and payoff? (the result's: latency_ratio, latency_ms, baseline_ms, macs, params and the
same noise keys). A noisy latency (the machine too busy to trust the timing) shows as "0.700x?"
with a "noisy: q1-q3 ..." note, wherever it is printed.

A causal language model's run (settings' task "causal_lm") has the same keys, but every accuracy
above holds a validation or test perplexity (lower is better) and max_drop is the relative increase
allowed (0.05: a step passes at perplexity <= baseline * 1.05). It may also have generation?
{new_tokens, prompt_tokens, batch, runtime, before_tokens_per_s, after_tokens_per_s, speedup, q1,
q3, noisy, noisy_why?}: greedy generation with the KV cache, the unpruned model against the pruned.
`_metric(run)` is the one place that knows which of the two a run measures.

matplotlib is imported only when a plot is drawn, and only as a Figure on the Agg canvas, so
no GUI backend is chosen and pyplot's global figure list is never touched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .files import atomic_write

__all__ = ["write_report", "markdown", "entropy_heatmap", "accuracy_plot", "latency_plot", "entropy_matrix",
           "accuracy_series", "step_header", "step_row", "summary", "payoff_lines", "recovery", "COLUMNS"]

COLUMNS = ("step", "removed", "entropy (bits)", "val acc", "drop", "test acc", "latency", "MACs", "params", "kept",
           "seconds")
_LEFT = {1, 9}  # text columns; the rest are numbers, right-aligned in the terminal
_GREY = "#d9d9d9"  # masked heatmap cells: already linearized, or no score


def write_report(run: dict, out_dir) -> dict[str, Path]:
    """Write report.json, report.md, entropy.png and accuracy.png into out_dir (created if
    missing), each atomically, and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "entropy_plot": out / "entropy.png",
             "accuracy_plot": out / "accuracy.png", "latency_plot": out / "latency.png"}
    # Non-finite floats become null: NaN is not JSON, and other tools should read the file.
    text = json.dumps(_finite(run), indent=2, default=str) + "\n"
    atomic_write(paths["json"], lambda f: f.write(text.encode()))
    atomic_write(paths["markdown"], lambda f: f.write(markdown(run).encode()))
    entropy_heatmap(run, paths["entropy_plot"])
    accuracy_plot(run, paths["accuracy_plot"])
    latency_plot(run, paths["latency_plot"])
    return paths


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ---- The validation metric: accuracy (classifiers) or perplexity (causal LMs)

class _Accuracy:
    """Accuracy in percent, higher is better; max_drop in points: a step passes at val >= baseline - max_drop."""

    name, title, axis = "accuracy", "Accuracy", "accuracy (%)"
    columns = COLUMNS

    def value(self, x) -> str:  # in prose
        return "-" if x is None else f"{x:.2f}%"

    def cell(self, x) -> str:  # in a table
        return _num(x)

    def drop_cell(self, value, base) -> str:
        return "-" if value is None else _num(round(base - value, 2) + 0.0)  # + 0.0: no "-0.00"

    def change(self, base, final) -> str:
        return f"drop {base - final:.2f} points"

    def allowed(self, max_drop) -> str:
        return f"{max_drop:.2f} allowed"

    def threshold(self, base, max_drop) -> float:
        return base - max_drop

    def stop_label(self, base, max_drop) -> str:
        return f"stop below ({self.threshold(base, max_drop):.2f}% = baseline - {max_drop:g})"

    def drop_meaning(self, base, max_drop) -> str:
        return "drop = baseline validation accuracy - step validation accuracy (points)"

    def yscale(self, values) -> str:
        return "linear"


class _Perplexity:
    """Perplexity, lower is better; max_drop the relative increase allowed: a step passes at
    val <= baseline * (1 + max_drop). Its "drop" is that increase, shown as "+4.1%"."""

    name, title, axis = "perplexity", "Perplexity", "perplexity"
    columns = tuple({"val acc": "val ppl", "drop": "increase", "test acc": "test ppl"}.get(c, c) for c in COLUMNS)

    def value(self, x) -> str:
        return _num(x, ".3f")

    cell = value

    def drop_cell(self, value, base) -> str:
        return "-" if value is None or not base else f"{round(value / base - 1, 3) + 0.0:+.1%}"  # no "-0.0%"

    def change(self, base, final) -> str:
        return f"increase {self.drop_cell(final, base)}"

    def allowed(self, max_drop) -> str:
        return f"{max_drop:+.1%} allowed"

    def threshold(self, base, max_drop) -> float:
        return base * (1 + max_drop)

    def stop_label(self, base, max_drop) -> str:
        return f"stop above ({self.threshold(base, max_drop):.3f} = baseline x {1 + max_drop:g})"

    def drop_meaning(self, base, max_drop) -> str:
        return (f"increase = step validation perplexity / baseline validation perplexity - 1 (a step is kept up to "
                f"{max_drop:+.1%}: perplexity <= {self.threshold(base, max_drop):.3f})")

    def yscale(self, values) -> str:
        # a rejected step can blow perplexity up tenfold: on a linear axis the accepted path would be flat
        finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
        return "log" if finite and max(finite) > 3 * min(finite) else "linear"


def _metric(run: dict | None) -> _Accuracy | _Perplexity:
    """How the report speaks of the run's validation metric (settings' task; classification when absent)."""
    task = ((run or {}).get("settings") or {}).get("task")
    return _Perplexity() if task == "causal_lm" else _Accuracy()


# ---- Table cells, shared by the markdown table and the terminal rows

def _num(x, fmt: str = ".2f") -> str:
    """x formatted, or "-" when missing or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _cells(run: dict, step: dict) -> list:
    """One step's cells in COLUMNS order, as strings; removed and entropy are lists (one per site)."""
    removed = list(step.get("removed", []))
    entropy = step.get("entropy") or {}
    metric, val = _metric(run), step.get("val_accuracy")
    ratio = step.get("latency_ratio")
    return [str(step.get("step", "")), removed, [_num(entropy.get(s), ".3f") for s in removed], metric.cell(val),
            metric.drop_cell(val, run["baseline_accuracy"]), metric.cell(step.get("test_accuracy")), _ratio(ratio, step),
            _count(step.get("macs")), _count(step.get("params")), "yes" if step.get("accepted") else "rejected",
            _num(step.get("seconds"), ".1f")]


def _ratio(ratio, record: dict) -> str:
    """A latency ratio cell: "0.700x", "0.700x?" when its timing is noisy, "-" when missing."""
    return "-" if ratio is None else f"{ratio:.3f}x" + ("?" if record.get("noisy") else "")


def _noisy_note(record: dict) -> str:
    """"noisy: q1-q3 0.800-1.300x (why)" for a step or payoff whose latency timing is noisy, else ""."""
    if not record.get("noisy"):
        return ""
    q1, q3 = record.get("latency_q1"), record.get("latency_q3")
    quartiles = f"q1-q3 {q1:.3f}-{q3:.3f}x" if q1 is not None and q3 is not None else ""
    why = record.get("noisy_why") or ""
    return "noisy: " + (f"{quartiles} ({why})" if quartiles and why else quartiles or why or "yes")


def _count(n) -> str:
    """A count with an SI suffix: 5.12M, 120.00k."""
    if n is None:
        return "-"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def _widths(run: dict | None) -> list[int]:
    """Terminal column widths. "removed" is 24 wide, or the run's longest site name, so a header
    printed before the run is known still lines up with the rows of usual models."""
    removed = max([24, *map(len, (run or {}).get("sites") or [])])
    return [max(len(c), w) for c, w in zip(_metric(run).columns, (4, removed, 0, 7, 6, 8, 7, 7, 7, 8, 7))]


def _line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i in _LEFT else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


def step_header(run: dict | None = None) -> str:
    """The header and rule of the terminal table. Pass the run (its sites suffice) when a site name
    may be longer than 24 characters, so the columns line up with step_row's."""
    widths = _widths(run)
    return _line(list(_metric(run).columns), widths) + "\n" + _line(["-" * w for w in widths], widths)


def step_row(run: dict, step: dict) -> str:
    """One fixed-width terminal row for a step; a step that removed several sites continues on
    one line per further site (name and entropy only)."""
    cells, widths = _cells(run, step), _widths(run)
    removed, entropy = cells[1] or ["-"], cells[2] or ["-"]
    lines = [_line([cells[0], removed[0], entropy[0], *cells[3:]], widths)]
    if note := _noisy_note(step):  # after the last column: the fixed widths stay
        lines[0] += "  " + note
    lines += [_line(["", r, e] + [""] * (len(COLUMNS) - 3), widths) for r, e in zip(removed[1:], entropy[1:])]
    return "\n".join(lines)


# ---- Markdown

def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown(run: dict) -> str:
    """A human-readable report: summary, settings, one table row per step, and the two plots."""
    base, max_drop, metric = run["baseline_accuracy"], run.get("max_drop", 0.0), _metric(run)
    final = base if run.get("accuracy") is None else run["accuracy"]
    sites, removed = run.get("sites") or [], run.get("linearized") or []
    test = lambda key: f", test {metric.value(run[key])}" if run.get(key) is not None else ""  # noqa: E731
    names = ": " + ", ".join(f"`{s}`" for s in removed) if removed else ""
    generation = _generation(run.get("generation"))
    lines = ["# EASIER pruning report", "",
             f"- **Baseline {metric.name}**: validation {metric.value(base)}{test('baseline_test_accuracy')}",
             f"- **Final {metric.name}**: validation {metric.value(final)}{test('test_accuracy')} "
             f"({metric.change(base, final)}, {metric.allowed(max_drop)})",
             f"- **Layers removed**: {len(removed)} of {len(sites)}{names}",
             f"- **Stopped**: {run.get('stopped') or '-'}{_retries(run, '; ')}",
             f"- **Processes**: {_processes(run.get('world_size', 1))}",
             f"- **Scoring mode**: {run.get('mode') or '-'}",
             f"- **Recovery**: {recovery(run.get('settings') or {}) or 'plain fine-tuning'}",
             *[f"- {line}" for line in _payoff(run)],
             *([f"- **Generation** {generation}"] if generation else []), ""]
    if run.get("settings"):
        lines += ["## Settings", "", _md_row(["setting", "value"]), _md_row(["---", "---"])]
        lines += [_md_row([k, v if isinstance(v, str) else json.dumps(v, default=str)])
                  for k, v in run["settings"].items()]
        lines.append("")
    lines += ["## Steps", ""]
    if run.get("steps"):
        lines += [_md_row(metric.columns), _md_row(["---" if i in _LEFT else "---:" for i in range(len(COLUMNS))])]
        for step in run["steps"]:
            cells = _cells(run, step)
            cells[1] = ", ".join(f"`{s}`" for s in cells[1])
            cells[2] = ", ".join(cells[2])
            cells[6] = " ".join(filter(None, [cells[6], _noisy_note(step)]))
            lines.append(_md_row(cells))
    else:
        lines.append("No step was attempted; the model is the unpruned baseline.")
    lines += ["", f"{metric.drop_meaning(base, max_drop)}; "
              "entropy = layer entropy of the removed site(s) when they were chosen; latency = the step's network "
              "folded, over the original with batch norms folded (paired timing in the run's runtime; "
              "\"x?\": noisy, the machine was too busy to trust it, with the quartiles of the ratio and why); MACs and "
              "params of the folded network.", "",
              "## Plots", "", "![Layer entropy per step](entropy.png)", "",
              f"![{metric.title} against layers removed](accuracy.png)", "",
              f"![{metric.title} against latency](latency.png)", ""]
    return "\n".join(lines)


# ---- What the run bought

def summary(run: dict) -> str:
    """The end of a run in a few lines: layers removed, accuracy (or perplexity) kept, why it
    stopped, and the payoff (latency, MACs, parameters before and after; generation speed)."""
    base, metric = run["baseline_accuracy"], _metric(run)
    final = base if run.get("accuracy") is None else run["accuracy"]
    test = "" if run.get("test_accuracy") is None else \
        f"; test {metric.value(run['test_accuracy'])} (baseline {metric.value(run.get('baseline_test_accuracy'))})"
    lines = [f"removed {len(run.get('linearized') or [])} of {len(run.get('sites') or [])} activation layers; validation "
             f"{metric.name} {metric.value(final)} (baseline {metric.value(base)}, {metric.change(base, final)}){test}",
             f"stopped: {run.get('stopped') or '-'}{_retries(run, '; ')}; {_processes(run.get('world_size', 1))}"]
    lines += [f"recovery: {r}" for r in [recovery(run.get("settings") or {})] if r]
    lines += _payoff(run)
    return "\n".join(lines + [f"generation {g}" for g in [_generation(run.get("generation"))] if g])


def recovery(settings: dict) -> str:
    """The recovery options a run fine-tuned with, in words ("" for plain fine-tuning)."""
    said = []
    if settings.get("distill") is not None:
        said.append(f"distillation from the unpruned network (teacher's share of the loss {settings['distill']:g}, "
                    f"temperature {settings.get('distill_temperature', 4.0):g})")
    if settings.get("anneal") is not None:
        said.append(f"each step's sites annealed to the identity over the first {settings['anneal']:.0%} of its batches")
    if settings.get("entropy_weight") is not None:
        said.append(f"entropy in the loss for the sites next in line (weight {settings['entropy_weight']:g}, towards "
                    f"{'always-on' if settings.get('entropy_side', 'on') == 'on' else 'either end'})")
    return "; ".join(said)


def _retries(run: dict, before: str = "") -> str:
    """With retry on rejection (settings' patience > 0): "3 tries rejected in all (patience 2)", after
    `before`; "" for a run that stops at its first rejected step."""
    patience = (run.get("settings") or {}).get("patience") or 0
    if not patience:
        return ""
    rejected = sum(not step.get("accepted") for step in run.get("steps", []))
    return f"{before}{rejected} {'try' if rejected == 1 else 'tries'} rejected in all (patience {patience})"


def _processes(world_size: int) -> str:
    return "one process" if world_size == 1 else f"data-parallel over {world_size} processes (world_size {world_size})"


def _payoff(run: dict) -> list[str]:
    """The run's payoff lines; a causal LM's latency is of one forward pass, as its generation line
    is the other speed it is judged by."""
    label = "forward latency" if isinstance(_metric(run), _Perplexity) else "latency"
    return payoff_lines(run.get("baseline_payoff"), run.get("payoff"), label=label)


def _generation(record: dict | None) -> str:
    """"(greedy, KV cache, 32 new tokens after 16, batch 1, eager): 250.1 -> 330.2 tokens/s (1.32x,
    q1-q3 1.30-1.34)", "1.32x?" and a "noisy" note when the timing is; "" without a record."""
    if not isinstance(record, dict):
        return ""
    speed = lambda key: _num(record.get(key), ".1f")  # noqa: E731
    noisy = f"; noisy: {record.get('noisy_why') or 'yes'}" if record.get("noisy") else ""
    return (f"({_generation_setup(record)}): {speed('before_tokens_per_s')} -> {speed('after_tokens_per_s')} "
            f"tokens/s ({_generation_speedup(record)}){noisy}")


def _generation_setup(record: dict) -> str:
    """What was generated: "greedy, KV cache, 32 new tokens after 16, batch 1, eager" (the parts recorded)."""
    new, prompt, batch = record.get("new_tokens"), record.get("prompt_tokens"), record.get("batch")
    tokens = "" if new is None else f"{new} new tokens" + ("" if prompt is None else f" after {prompt}")
    return ", ".join(filter(None, ["greedy", "KV cache", tokens, "" if batch is None else f"batch {batch}",
                                   record.get("runtime")]))


def _generation_speedup(record: dict) -> str:
    """"1.32x, q1-q3 1.30-1.34"; "1.32x?" when noisy, as a noisy latency ratio shows."""
    speedup, q1, q3 = record.get("speedup"), record.get("q1"), record.get("q3")
    ratio = "-" if speedup is None else f"{speedup:.2f}x" + ("?" if record.get("noisy") else "")
    return ratio + (f", q1-q3 {q1:.2f}-{q3:.2f}" if q1 is not None and q3 is not None else "")


def payoff_lines(before: dict | None, after: dict | None, label: str = "latency") -> list[str]:
    """Latency, MACs and parameters of the original (batch norms folded) and of the result folded:
    `before` {runtime, device, example_shape, macs, params, latency_ms? (the original's at the start),
    noise keys?}, `after` {latency_ratio, latency_ms, baseline_ms, macs, params, noise keys?} (both
    latencies from the same paired timing; none: no latency line). Every ms figure printed is one of
    these; a noisy timing says so, with its quartiles. label: what the latency is of ("forward
    latency" for a causal LM, whose generation is timed apart)."""
    if not before or not after:
        return []
    shape = before.get("example_shape")
    batch = f" at batch {shape[0]}" if shape else ""  # (dim 0 of the first input: the batch it was timed at)
    where = f"{before.get('runtime', 'eager')} on {before.get('device', 'cpu')}{batch}" + \
        (f", input {shape}" if shape else "")  # (no "input None" for a record without the shape)
    ratio = lambda a, b: f" ({a / b:.3f}x)" if b else ""  # noqa: E731
    lines = [_latency_line(label, where, before, after)] if after.get("latency_ratio") else []
    if before.get("noisy") and after.get("latency_ratio"):
        lines.append(f"the original's latency at the start ({before['latency_ms']:.3f} ms) is {_noisy_note(before)}")
    return lines + [f"MACs: {_count(before['macs'])} -> {_count(after['macs'])}{ratio(after['macs'], before['macs'])}; "
                    f"parameters: {_count(before['params'])} -> {_count(after['params'])}"
                    f"{ratio(after['params'], before['params'])}"]


def _latency_line(label: str, where: str, before: dict, after: dict) -> str:
    """The latency line; where the original ran another time at the start of the run than in the
    result's timing, both (a machine whose load changed makes them disagree)."""
    start = before.get("latency_ms")
    at_start = f"; the original ran {start:.3f} ms at the start" if start is not None and \
        f"{start:.3f}" != f"{after['baseline_ms']:.3f}" else ""
    note = _noisy_note(after)
    return (f"{label} ({where}): {after['baseline_ms']:.3f} ms -> {after['latency_ms']:.3f} ms = "
            f"{_ratio(after['latency_ratio'], after)} the original with batch norms folded{at_start}"
            + (f"; {note}" if note else ""))


# ---- Plot data (pure)

def entropy_matrix(run: dict) -> tuple[np.ndarray, list[str]]:
    """(entropy in bits [sites, steps], site names in execution order); NaN where a site has no
    score at a step (linearized earlier, null or NaN)."""
    names = list(run.get("sites") or [])
    steps = run.get("steps", [])
    values = np.full((len(names), len(steps)), np.nan)
    for j, step in enumerate(steps):
        entropy = step.get("entropy") or {}
        for i, name in enumerate(names):
            if entropy.get(name) is not None:
                values[i, j] = entropy[name]
    return values, names


def accuracy_series(run: dict) -> tuple[dict, dict]:
    """(accepted, rejected) points, each {"x", "val", "test", "removed"} lists; x = layers removed.
    The accepted path starts at the baseline (x = 0); a rejected step sits where it would have
    landed, counted from the last accepted step. A missing test accuracy is NaN."""
    nan = lambda x: math.nan if x is None else x  # noqa: E731
    accepted = {"x": [0], "val": [run["baseline_accuracy"]], "test": [nan(run.get("baseline_test_accuracy"))],
                "removed": [[]]}
    rejected = {"x": [], "val": [], "test": [], "removed": []}
    count = 0
    for step in run.get("steps", []):
        x = count + len(step.get("removed", []))
        points = accepted if step.get("accepted") else rejected
        count = x if step.get("accepted") else count
        points["x"].append(x)
        points["val"].append(nan(step.get("val_accuracy")))
        points["test"].append(nan(step.get("test_accuracy")))
        points["removed"].append(list(step.get("removed", [])))
    return accepted, rejected


# ---- Plots

def _figure(width: float, height: float):
    """A pyplot-free Figure on the Agg canvas (no GUI backend, no global state to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def _legend_below(fig) -> None:
    """The figure's legend under the axes (the constrained layout makes room): inside them, "best"
    still covered points, the step-0 one among them."""
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)


def entropy_heatmap(run: dict, path) -> Path:
    """Heatmap of layer entropy: sites (execution order) x steps; grey = no score (linearized
    earlier); a box marks the site(s) each step removed, dashed when the step was rejected."""
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    values, names = entropy_matrix(run)
    steps = run.get("steps", [])
    if not steps:  # one blank column keeps the site axis and colour scale readable
        values = np.full((len(names), 1), np.nan)
    n_sites, n_cols = values.shape
    fig = _figure(max(5.6, 3.4 + 0.62 * n_cols), 2.2 + 0.24 * max(n_sites, 4))  # the legend needs 5.6
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=_GREY)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="layer entropy (bits)", fraction=0.08, pad=0.02, aspect=30)

    ax.set_yticks(range(n_sites), names, fontsize=7.5)
    labels = [f"step {s.get('step', j + 1)}" + ("" if s.get("accepted") else "\nrejected") for j, s in enumerate(steps)]
    ax.set_xticks(range(n_cols), labels or ["no step"], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)  # thin white grid between cells
    ax.set_yticks(np.arange(-0.5, n_sites), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)

    if n_cols <= 16 and n_sites:  # values in the cells while they fit
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if v < 0.6 else "black")
    row = {name: i for i, name in enumerate(names)}
    for j, step in enumerate(steps):
        style = "-" if step.get("accepted") else (0, (2, 1.5))
        for name in step.get("removed", []):
            if name in row:
                ax.add_patch(Rectangle((j - 0.45, row[name] - 0.42), 0.9, 0.84, fill=False, edgecolor="#e41a1c",
                                       linewidth=2, linestyle=style))

    handles = [Line2D([], [], color="#e41a1c", linewidth=2, label="removed (accepted)"),
               Line2D([], [], color="#e41a1c", linewidth=2, linestyle=(0, (2, 1.5)), label="tried, rejected"),
               Patch(facecolor=_GREY, label="linearized earlier / no score")]
    if steps:
        fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7.5, frameon=False)
    ax.set_title("Layer entropy of each activation site, per pruning step"
                 + ("" if steps else "\n(no step was attempted)"), fontsize=10)
    return _save_png(fig, path)


def _set_yscale(ax, scale: str) -> None:
    """A linear or log y axis; a log one labelled in plain numbers (20, 30, 100), not 2 x 10^1
    (which minor ticks get a label is matplotlib's usual choice)."""
    ax.set_yscale(scale)
    if scale == "log":
        from matplotlib.ticker import LogFormatter
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def accuracy_plot(run: dict, path) -> Path:
    """Validation (and test) accuracy (perplexity for a causal LM) against the number of layers
    removed, with the stopping threshold; rejected steps are red crosses off the accepted line."""
    from matplotlib.ticker import MaxNLocator

    accepted, rejected = accuracy_series(run)
    base, max_drop, metric = run["baseline_accuracy"], run.get("max_drop", 0.0), _metric(run)
    has_test = not all(math.isnan(t) for t in accepted["test"] + rejected["test"])
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    ax.plot(accepted["x"], accepted["val"], "o-", color="C0", label="validation")
    if has_test:
        ax.plot(accepted["x"], accepted["test"], "s--", color="C1", markersize=5, label="test")
    if rejected["x"]:
        ax.plot(rejected["x"], rejected["val"], "x", color="#e41a1c", markersize=10, markeredgewidth=2.5,
                label="rejected step (validation)")
        if has_test and not all(map(math.isnan, rejected["test"])):
            ax.plot(rejected["x"], rejected["test"], "+", color="#e41a1c", markersize=10, markeredgewidth=2,
                    label="rejected step (test)")
    if len(run.get("steps", [])) <= 12:  # name what each step removed while the labels fit
        for names, x, y in [*zip(accepted["removed"], accepted["x"], accepted["val"]),
                            *zip(rejected["removed"], rejected["x"], rejected["val"])]:
            ax.annotate("\n".join(names), (x, y), xytext=(0, 9), textcoords="offset points",
                        ha="center", va="bottom", fontsize=6.5, color="0.35")
    ax.axhline(metric.threshold(base, max_drop), color="0.3", linestyle="--", linewidth=1.2,
               label=metric.stop_label(base, max_drop))
    ax.axhline(base, color="0.6", linestyle=":", linewidth=1, label=f"baseline ({metric.value(base)})")
    _set_yscale(ax, metric.yscale(accepted["val"] + accepted["test"] + rejected["val"] + rejected["test"]))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right = max(accepted["x"] + rejected["x"] + [1])  # integer ticks need a range >= 1
    ax.set_xlim(-0.3 - 0.02 * right, right + 0.3 + 0.03 * right)
    ax.set_xlabel("layers removed (linearized activation sites)")
    ax.set_ylabel(metric.axis)
    sites = len(run.get("sites") or [])
    ax.set_title(f"{metric.title} while pruning: {len(run.get('linearized', []))} of {sites} sites removed", fontsize=10)
    ax.margins(y=0.15)
    ax.grid(True, alpha=0.35)
    _legend_below(fig)
    return _save_png(fig, path)


def latency_plot(run: dict, path) -> Path:
    """Validation accuracy (perplexity for a causal LM) against the latency ratio (folded / original
    with batch norms folded): the run's path from the unpruned network (each point labelled with the
    layers removed), the stop line and the latency target."""
    accepted, rejected = accuracy_series(run)
    base, max_drop, metric = run["baseline_accuracy"], run.get("max_drop", 0.0), _metric(run)
    steps = run.get("steps", [])
    # the unpruned network folded: its own chains may already run faster than the original
    xs = [(run.get("baseline_payoff") or {}).get("latency_ratio")] + [s.get("latency_ratio") for s in steps if s.get("accepted")]
    points = [(x, y, n) for x, y, n in zip(xs, accepted["val"], accepted["x"]) if x is not None]  # n: layers removed
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="C0", label="validation (accepted steps)")
        if len(points) <= 16:
            for x, y, removed in points:
                ax.annotate(str(removed), (x, y), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=7,
                            color="0.35")
    missed = [(s.get("latency_ratio"), s.get("val_accuracy")) for s in steps
              if not s.get("accepted") and s.get("latency_ratio") is not None]
    if missed:
        ax.plot(*zip(*missed), "x", color="#e41a1c", markersize=10, markeredgewidth=2.5, label="rejected step")
    ax.axhline(metric.threshold(base, max_drop), color="0.3", linestyle="--", linewidth=1.2,
               label=metric.stop_label(base, max_drop))
    _set_yscale(ax, metric.yscale([p[1] for p in points] + [m[1] for m in missed]))
    target = (run.get("settings") or {}).get("latency_target")
    if target is not None:
        ax.axvline(target, color="C2", linestyle="--", linewidth=1.2, label=f"latency target ({target:g}x)")
    ax.axvline(1.0, color="0.6", linestyle=":", linewidth=1, label="original's latency")
    ax.invert_xaxis()  # faster to the right, as the run goes
    runtime = (run.get("baseline_payoff") or {}).get("runtime", "eager")
    ax.set_xlabel(f"latency: folded network / original with batch norms folded ({runtime})")
    ax.set_ylabel(f"validation {metric.axis}")
    ax.set_title(f"{metric.title} against latency while pruning" + ("" if points else "\n(no latency measured)"),
                 fontsize=10)
    ax.margins(y=0.15)
    ax.grid(True, alpha=0.35)
    _legend_below(fig)
    return _save_png(fig, path)

