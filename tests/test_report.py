"""report: the files of a pruning run (json, markdown, three PNGs), the heatmap's data, the terminal
table rows, the end-of-run summary, and the edge cases (no step, missing optional fields (reports of
older runs), NaN entropy, rejected last step)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from easier_kernels import report
from easier_kernels.prune import Step

SITES = ["conv1_relu"] + [f"layer{l}_{b}_relu{r}" for l in range(1, 5) for b in range(2) for r in (1, 2)]
# (removed, val, test, accepted); step 3 removes two sites at once, the last step is rejected
PLAN = [(["layer4_1_relu2"], 91.1, 90.6, True), (["layer4_0_relu2"], 90.9, None, True),
        (["layer3_1_relu2", "layer4_1_relu1"], 90.6, 90.2, True), (["layer3_0_relu1"], 90.4, 89.9, True),
        (["layer2_1_relu2"], 89.9, 89.1, False)]
DROPS = ["0.20", "0.40", "0.70", "0.90", "1.40"]


def entropy_of(site, step):
    return round(0.95 - 0.05 * SITES.index(site) - 0.01 * step, 3)


def make_run(plan=PLAN, **overrides):
    steps, gone = [], []
    for k, (removed, val, test, ok) in enumerate(plan, 1):
        steps.append({"step": k, "removed": removed, "entropy": {s: entropy_of(s, k) for s in SITES if s not in gone},
                      "val_accuracy": val, "test_accuracy": test, "accepted": ok, "seconds": 10.0 + k,
                      "latency_ratio": 1.0 - 0.1 * k, "latency_ms": 2.0 - 0.2 * k, "macs": 5_000_000 - 100_000 * k,
                      "params": 120_000 - 1_000 * k})
        gone += removed if ok else []
    accepted = [s for s in steps if s["accepted"]]
    run = {"baseline_accuracy": 91.3, "baseline_test_accuracy": 90.8, "max_drop": 1.0,
           "accuracy": accepted[-1]["val_accuracy"] if accepted else 91.3,
           "test_accuracy": accepted[-1]["test_accuracy"] if accepted else 90.8, "sites": SITES, "linearized": gone,
           "stopped": "validation accuracy 89.9 < 90.3 (baseline 91.3 - max_drop 1.0)", "mode": "pooled",
           "steps": steps, "settings": {"model": "resnet18", "dataset": "cifar10", "epochs": 5, "latency_target": 0.5},
           "baseline_payoff": {"runtime": "eager", "device": "cpu", "example_shape": [1, 3, 32, 32], "latency_ms": 2.0,
                               "macs": 5_000_000, "params": 120_000, "latency_ratio": 0.98},
           "payoff": {"latency_ratio": 0.6, "latency_ms": 1.2, "baseline_ms": 2.0, "macs": 4_600_000, "params": 116_000}}
    run.update(overrides)
    return run


def check_png(path, min_side=200):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) >= min_side
    return image.shape


def test_write_report_files_and_json_round_trip(tmp_path):
    run = make_run()
    paths = report.write_report(run, tmp_path / "new" / "dir")  # created if missing
    assert set(paths) == {"json", "markdown", "entropy_plot", "accuracy_plot", "latency_plot"}
    assert all(p.is_file() and p.parent == tmp_path / "new" / "dir" for p in paths.values())
    assert json.loads(paths["json"].read_text()) == run
    assert paths["markdown"].read_text() == report.markdown(run)
    check_png(paths["entropy_plot"])
    check_png(paths["accuracy_plot"])
    check_png(paths["latency_plot"])


def test_heatmap_height_grows_with_sites(tmp_path):
    many = make_run(plan=[], sites=[f"features_{i}_relu" for i in range(40)])
    small, big = report.entropy_heatmap(make_run(), tmp_path / "a.png"), report.entropy_heatmap(many, tmp_path / "b.png")
    assert check_png(big)[0] > 1.5 * check_png(small)[0]


def test_rewrite_replaces_files_and_leaves_no_temp_files(tmp_path):
    report.write_report(make_run(), tmp_path)
    (tmp_path / "report.json").write_text("x" * 100_000)  # longer than any report: must not survive
    second = make_run(plan=PLAN[:2], stopped="max steps")
    report.write_report(second, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "entropy.png", "latency.png", "report.json",
                                                          "report.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o666 & ~umask}  # not mkstemp's 0600


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    report.write_report(make_run(), tmp_path)
    monkeypatch.setattr(report, "markdown", lambda run: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        report.write_report(make_run(plan=PLAN[:1]), tmp_path)
    assert len(list(tmp_path.iterdir())) == 5 and not list(tmp_path.glob(".*"))
    # each file is replaced whole: report.json was already new when report.md failed
    assert json.loads((tmp_path / "report.json").read_text()) == make_run(plan=PLAN[:1])


def test_markdown_content():
    text = report.markdown(make_run())
    for removed, *_ in PLAN:
        assert all(f"`{site}`" in text for site in removed)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 5
    for row, drop, (_, val, test, ok) in zip(rows, DROPS, PLAN):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3:6] == [f"{val:.2f}", drop, "-" if test is None else f"{test:.2f}"]
        assert cells[9] == ("yes" if ok else "rejected")
    assert [row.split("|")[7:10] for row in rows][2] == [" 0.700x ", " 4.70M ", " 117.00k "]
    assert f"{entropy_of('layer3_1_relu2', 3):.3f}, {entropy_of('layer4_1_relu1', 3):.3f}" in rows[2]
    assert ("| step | removed | entropy (bits) | val acc | drop | test acc | latency | MACs | params | kept | seconds |"
            in text)
    assert "5 of 17" in text and "91.30%" in text and "90.40%" in text and "pooled" in text
    assert "validation accuracy 89.9 < 90.3" in text and "| epochs | 5 |" in text
    assert "](entropy.png)" in text and "](accuracy.png)" in text and "](latency.png)" in text
    assert "2.000 ms -> 1.200 ms = 0.600x the original with batch norms folded" in text
    assert "MACs: 5.00M -> 4.60M (0.920x); parameters: 120.00k -> 116.00k (0.967x)" in text


def test_summary_says_what_the_run_bought():
    lines = report.summary(make_run()).splitlines()
    assert lines[0] == ("removed 5 of 17 activation layers; validation accuracy 90.40% (baseline 91.30%, drop 0.90 "
                        "points); test 89.90% (baseline 90.80%)")
    assert lines[1] == "stopped: validation accuracy 89.9 < 90.3 (baseline 91.3 - max_drop 1.0); one process"
    assert lines[2] == ("latency (eager on cpu at batch 1, input [1, 3, 32, 32]): 2.000 ms -> 1.200 ms = 0.600x the "
                        "original with batch norms folded")
    assert lines[3].startswith("MACs: 5.00M -> 4.60M")
    old = make_run()
    del old["baseline_payoff"], old["payoff"]  # a report of a run from before the payoff was measured
    assert len(report.summary(old).splitlines()) == 2
    assert report.summary(dict(old, world_size=4)).splitlines()[1].endswith("data-parallel over 4 processes (world_size 4)")


def test_entropy_matrix_values():
    values, names = report.entropy_matrix(make_run())
    assert names == SITES and values.shape == (17, 5)
    gone = {"layer4_1_relu2": 1, "layer4_0_relu2": 2, "layer3_1_relu2": 3, "layer4_1_relu1": 3, "layer3_0_relu1": 4}
    for i, site in enumerate(SITES):
        for j in range(5):
            if site in gone and j >= gone[site]:  # linearized at an earlier step
                assert math.isnan(values[i, j])
            else:
                assert values[i, j] == entropy_of(site, j + 1)


def test_nan_and_null_entropy_are_masked(tmp_path):
    run = make_run()
    run["steps"][0]["entropy"]["conv1_relu"] = float("nan")
    run["steps"][1]["entropy"]["layer1_0_relu1"] = None
    run["steps"][2]["entropy"]["layer3_1_relu2"] = float("nan")  # a removed site without a score
    values, _ = report.entropy_matrix(run)
    assert math.isnan(values[0, 0]) and math.isnan(values[1, 1]) and values[1, 0] == entropy_of("layer1_0_relu1", 1)
    assert np.isnan(values).sum() == 2 + 1 + (0 + 1 + 2 + 4 + 5)  # set above + linearized cells
    paths = report.write_report(run, tmp_path)
    saved = json.loads(paths["json"].read_text())  # strict JSON: NaN is written as null
    assert saved["steps"][0]["entropy"]["conv1_relu"] is None and "NaN" not in paths["json"].read_text()
    assert "`layer3_1_relu2`, `layer4_1_relu1` | -, " in paths["markdown"].read_text()
    check_png(paths["entropy_plot"])


def test_zero_steps(tmp_path):
    run = make_run(plan=[], stopped="max_drop 0: nothing can be removed")
    paths = report.write_report(run, tmp_path)
    text = paths["markdown"].read_text()
    assert "No step was attempted" in text and "0 of 17" in text and "](entropy.png)" in text
    assert report.entropy_matrix(run)[0].shape == (17, 0)
    accepted, rejected = report.accuracy_series(run)
    assert accepted["x"] == [0] and rejected["x"] == []
    check_png(paths["entropy_plot"])
    check_png(paths["accuracy_plot"])


def test_missing_optional_fields(tmp_path):
    run = make_run(plan=[(r, v, None, ok) for r, v, _, ok in PLAN], baseline_test_accuracy=None, test_accuracy=None)
    del run["settings"]
    paths = report.write_report(run, tmp_path)
    text = paths["markdown"].read_text()
    assert "Settings" not in text and "test " not in text.split("## Steps")[0]
    assert all(math.isnan(t) for t in report.accuracy_series(run)[0]["test"])
    check_png(paths["accuracy_plot"])
    for step in run["steps"]:  # an older run's steps: no payoff measured
        for key in ("latency_ratio", "latency_ms", "macs", "params"):
            del step[key]
    del run["baseline_payoff"], run["payoff"]
    paths = report.write_report(run, tmp_path)
    assert "latency (" not in paths["markdown"].read_text() and "| - | - | - |" in paths["markdown"].read_text()
    check_png(paths["latency_plot"])


def test_accuracy_series_x_is_layers_removed():
    accepted, rejected = report.accuracy_series(make_run())
    assert accepted["x"] == [0, 1, 2, 4, 5] and accepted["val"] == [91.3, 91.1, 90.9, 90.6, 90.4]
    assert math.isnan(accepted["test"][2]) and accepted["test"][0] == 90.8
    assert accepted["removed"][3] == ["layer3_1_relu2", "layer4_1_relu1"] and accepted["removed"][0] == []
    assert rejected == {"x": [6], "val": [89.9], "test": [89.1], "removed": [["layer2_1_relu2"]]}  # where the rejected step would have landed


def test_terminal_rows_align():
    run = make_run()
    header, rule = report.step_header(run).splitlines()
    rows = [report.step_row(run, step) for step in run["steps"]]
    assert len(rows[2].splitlines()) == 2  # two removed sites: a continuation line
    first_lines = [row.splitlines()[0] for row in rows]
    assert {len(line) for line in [header, rule, *first_lines]} == {len(header)}
    assert report.step_header() == report.step_header(run)  # usual names fit the default width
    long = make_run(sites=SITES + ["features_17_conv_0_2_hardtanh_x"])
    assert len(report.step_header(long).splitlines()[0]) == len(report.step_row(long, long["steps"][0]))
    for column in ("val acc", "drop", "seconds"):  # numbers right-aligned under their header
        end = header.index(column) + len(column)
        assert all(line[end - 1] != " " and (end == len(line) or line[end] == " ") for line in first_lines)
    assert rows[4].split()[-2:] == ["rejected", "15.0"] and "1.40" in rows[4]
    assert rows[2].splitlines()[1].split() == ["layer4_1_relu1", f"{entropy_of('layer4_1_relu1', 3):.3f}"]


def test_matplotlib_lazy_and_pyplot_free(tmp_path):
    """Importing report loads no matplotlib; plotting never imports pyplot (no GUI backend, no
    global figures), in a fresh interpreter."""
    (tmp_path / "run.json").write_text(json.dumps(make_run()))
    code = ("import json, sys; from easier_kernels import report;"
            "assert 'matplotlib' not in sys.modules;"
            "report.write_report(json.load(open(sys.argv[1] + '/run.json')), sys.argv[1]);"
            "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=tmp_path)
    assert (tmp_path / "entropy.png").is_file()


# ---- a latency the machine was too busy to trust is said to be, and no figure disagrees with report.json

BUSY = "interquartile range / median at best 57% for the paired ratio, 3% for the baseline's own times over 3 timings"
LOAD_CHANGED = ("the original ran 1.121 ms in this timing but 307.900 ms at the start, 274.7x apart: the machine's load "
                "changed")


def noisy_run():
    """The reported run: the original timed at 307.9 ms at the start (under load), 1.121 ms at the end;
    step 3's own timing too wide to trust."""
    run = make_run()
    run["steps"][2].update(baseline_ms=2.0, latency_q1=0.55, latency_q3=0.95, noisy=True, noisy_why=BUSY)
    run["baseline_payoff"]["latency_ms"] = 307.9
    run["payoff"].update(baseline_ms=1.121, latency_ms=0.673, latency_q1=0.58, latency_q3=0.62, noisy=True,
                         noisy_why=LOAD_CHANGED)
    return run


def numbers(x) -> set:
    """Every number in a JSON document, to 3 decimals (as the reports print ms)."""
    if isinstance(x, dict):
        return set().union(*map(numbers, x.values()))
    if isinstance(x, list):
        return set().union(*map(numbers, x))
    return {round(x, 3)} if isinstance(x, (int, float)) and not isinstance(x, bool) else \
        {round(float(n), 3) for n in re.findall(r"\d+\.\d+", x)} if isinstance(x, str) else set()


def test_a_noisy_latency_is_marked_in_the_row_the_table_and_the_summary(tmp_path):
    run = noisy_run()
    header = report.step_header(run).splitlines()[0]
    row = report.step_row(run, run["steps"][2]).splitlines()[0]
    end = header.index("latency") + len("latency")
    assert row[:end].endswith(" 0.700x?") and row[end:len(header)] == report.step_row(make_run(), make_run()["steps"][2])[end:len(header)]
    assert row.endswith(f"  noisy: q1-q3 0.550-0.950x ({BUSY})")  # after the last column: the widths hold
    assert "noisy" not in report.step_row(run, run["steps"][1])

    text = report.write_report(run, tmp_path)["markdown"].read_text()
    cells = [line.split(" | ") for line in text.splitlines() if line.startswith("| 3 |")][0]
    assert cells[6] == f"0.700x? noisy: q1-q3 0.550-0.950x ({BUSY})"

    lines = report.summary(run).splitlines()
    assert lines[2] == ("latency (eager on cpu at batch 1, input [1, 3, 32, 32]): 1.121 ms -> 0.673 ms = 0.600x? the "
                        "original with batch norms folded; the original ran 307.900 ms at the start; noisy: q1-q3 "
                        f"0.580-0.620x ({LOAD_CHANGED})")
    assert f"- {lines[2]}" in text  # report.md says the same
    saved = json.loads((tmp_path / "report.json").read_text())
    printed = {float(ms) for ms in re.findall(r"(\d+\.\d+) ms", report.summary(run) + text)}
    assert printed == {1.121, 0.673, 307.9}
    assert printed <= numbers(saved)  # every ms figure printed is one report.json holds
    assert saved["payoff"]["baseline_ms"] == 1.121 and saved["baseline_payoff"]["latency_ms"] == 307.9


def test_a_noisy_start_is_said_and_agreeing_figures_are_printed_once():
    run = make_run()
    run["baseline_payoff"].update(latency_q1=0.9, latency_q3=1.2, noisy=True, noisy_why=BUSY)
    lines = report.summary(run).splitlines()
    assert lines[2].endswith("2.000 ms -> 1.200 ms = 0.600x the original with batch norms folded")  # one 2.000 ms
    assert lines[3] == f"the original's latency at the start (2.000 ms) is noisy: q1-q3 0.900-1.200x ({BUSY})"


def test_records_from_before_the_noise_was_judged_still_load_and_render():
    old = make_run()
    steps = [Step(**s) for s in old["steps"]]  # (a checkpoint's or report.json's steps, without the new keys)
    assert [(s.noisy, s.noisy_why, s.latency_q1, s.baseline_ms) for s in steps] == [(False, "", None, None)] * 5
    assert "noisy:" not in report.markdown(old) + report.summary(old) and "?" not in report.step_row(old, old["steps"][0])


def test_the_accuracy_legend_covers_no_data(tmp_path, monkeypatch):
    """The legend sits outside the axes: no point (the step-0 one was hidden) can be under it."""
    figures = []
    save = report._save_png
    monkeypatch.setattr(report, "_save_png", lambda fig, path: figures.append(fig) or save(fig, path))
    for plot in (report.accuracy_plot, report.latency_plot):
        plot(make_run(), tmp_path / "plot.png")
    for fig in figures:
        fig.canvas.draw()
        (ax,) = fig.axes
        legends = fig.legends + ([ax.get_legend()] if ax.get_legend() else [])
        assert legends
        area = ax.get_window_extent()
        for legend in legends:
            box = legend.get_window_extent()
            assert not box.overlaps(area) and box.y1 <= area.y0


# ---- a causal language model's run: perplexity (lower is better), max_drop a relative increase, generation speed

LM_SITES = [f"h_{i}_mlp_act" for i in range(4)]
# (removed, val perplexity, test perplexity, accepted) against a baseline of 20.0 and max_drop 0.05 (at most 21.0)
LM_PLAN = [(["h_3_mlp_act"], 20.4, 21.3, True), (["h_2_mlp_act"], 20.9, None, True), (["h_1_mlp_act"], 23.1, 24.0, False)]
LM_INCREASES = ["+2.0%", "+4.5%", "+15.5%"]
GENERATION = {"new_tokens": 32, "prompt_tokens": 16, "batch": 1, "runtime": "eager", "before_tokens_per_s": 250.1,
              "after_tokens_per_s": 330.2, "speedup": 1.32, "q1": 1.30, "q3": 1.34, "noisy": False}
GENERATION_LINE = ("(greedy, KV cache, 32 new tokens after 16, batch 1, eager): 250.1 -> 330.2 tokens/s (1.32x, q1-q3 "
                   "1.30-1.34)")


def make_lm_run(plan=LM_PLAN, **overrides):
    steps, gone = [], []
    for k, (removed, val, test, ok) in enumerate(plan, 1):
        steps.append({"step": k, "removed": removed, "entropy": {s: 0.5 for s in LM_SITES if s not in gone},
                      "val_accuracy": val, "test_accuracy": test, "accepted": ok, "seconds": 30.0 + k,
                      "latency_ratio": 1.0 - 0.05 * k, "latency_ms": 8.0 - 0.4 * k, "macs": 90_000_000 - 1_000_000 * k,
                      "params": 120_000_000})
        gone += removed if ok else []
    accepted = [s for s in steps if s["accepted"]]
    run = {"baseline_accuracy": 20.0, "baseline_test_accuracy": 20.8, "max_drop": 0.05,
           "accuracy": accepted[-1]["val_accuracy"] if accepted else 20.0,
           "test_accuracy": accepted[-1]["test_accuracy"] if accepted else 20.8, "sites": LM_SITES, "linearized": gone,
           "stopped": "validation perplexity 23.100 > 21.000 (baseline 20.000 x (1 + 0.05))", "mode": "pooled",
           "steps": steps, "settings": {"model": "gpt2", "dataset": "wikitext2", "task": "causal_lm"},
           "baseline_payoff": {"runtime": "eager", "device": "cpu", "example_shape": [1, 128], "latency_ms": 8.0,
                               "macs": 90_000_000, "params": 120_000_000, "latency_ratio": 1.0},
           "payoff": {"latency_ratio": 0.9, "latency_ms": 7.2, "baseline_ms": 8.0, "macs": 88_000_000,
                      "params": 120_000_000},
           "generation": dict(GENERATION)}
    run.update(overrides)
    return run


def test_lm_markdown_speaks_of_perplexity_and_its_relative_increase():
    text = report.markdown(make_lm_run())
    assert "- **Baseline perplexity**: validation 20.000, test 20.800" in text
    assert "- **Final perplexity**: validation 20.900 (increase +4.5%, +5.0% allowed)" in text
    assert ("| step | removed | entropy (bits) | val ppl | increase | test ppl | latency | MACs | params | kept | seconds |"
            in text)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    for row, increase, (_, val, test, ok) in zip(rows, LM_INCREASES, LM_PLAN):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3:6] == [f"{val:.3f}", increase, "-" if test is None else f"{test:.3f}"]
        assert cells[9] == ("yes" if ok else "rejected")
    assert ("increase = step validation perplexity / baseline validation perplexity - 1 (a step is kept up to +5.0%: "
            "perplexity <= 21.000); entropy") in text
    assert "![Perplexity against layers removed](accuracy.png)" in text and "](latency.png)" in text
    # the latency is of one forward pass, at the input it was timed at; generation is the other speed
    assert "- forward latency (eager on cpu at batch 1, input [1, 128]): 8.000 ms -> 7.200 ms = 0.900x" in text
    assert f"- **Generation** {GENERATION_LINE}" in text
    prose = text.replace("accuracy.png", "")
    assert "accuracy" not in prose and "points" not in prose  # (report.json's keys keep their names)


def test_lm_summary_has_perplexity_and_generation_lines():
    lines = report.summary(make_lm_run()).splitlines()
    assert lines[0] == "removed 2 of 4 activation layers; validation perplexity 20.900 (baseline 20.000, increase +4.5%)"
    assert lines[2].startswith("forward latency (eager on cpu at batch 1, input [1, 128]): 8.000 ms -> 7.200 ms")
    assert lines[-1] == f"generation {GENERATION_LINE}"
    first = make_lm_run(plan=LM_PLAN[:1])  # a final test perplexity: said after the validation one
    assert report.summary(first).splitlines()[0].endswith("(baseline 20.000, increase +2.0%); test 21.300 (baseline 20.800)")
    same = make_lm_run(plan=[(["h_3_mlp_act"], 20.0, None, True)])
    assert "increase +0.0%" in report.summary(same) and "| +0.0% |" in report.markdown(same)  # no "-0.0%"


def test_lm_without_generation_has_no_generation_line():
    for run in (make_lm_run(generation=None), {k: v for k, v in make_lm_run().items() if k != "generation"}):
        text = report.markdown(run) + report.summary(run)
        assert "generation" not in text.lower() and "tokens/s" not in text
        assert "- forward latency (" in report.markdown(run)


def test_a_noisy_generation_is_marked():
    noisy = dict(GENERATION, noisy=True, noisy_why="interquartile range / median 30%")
    run = make_lm_run(generation=noisy)
    line = report.summary(run).splitlines()[-1]
    assert line.endswith("330.2 tokens/s (1.32x?, q1-q3 1.30-1.34); noisy: interquartile range / median 30%")
    assert f"- **Generation** {line[len('generation '):]}" in report.markdown(run)


def test_lm_terminal_rows():
    run = make_lm_run()
    header, rule = report.step_header(run).splitlines()
    rows = [report.step_row(run, step) for step in run["steps"]]
    assert "  val ppl  increase  test ppl  latency" in header
    assert {len(line) for line in [header, rule, *rows]} == {len(header)}
    for column in ("val ppl", "increase", "test ppl"):  # numbers right-aligned under their header
        end = header.index(column) + len(column)
        assert all(row[end - 1] != " " and row[end] == " " for row in rows)
    assert rows[2].split()[3:6] == ["23.100", "+15.5%", "24.000"] and rows[2].split()[-2:] == ["rejected", "33.0"]
    assert "val acc" in report.step_header(make_run()) and "val acc" in report.step_header()  # classifiers: as before


def lm_axes(run, tmp_path, monkeypatch):
    """The (accuracy plot's, latency plot's) axes of a run, drawn."""
    figures = []
    save = report._save_png
    monkeypatch.setattr(report, "_save_png", lambda fig, path: figures.append(fig) or save(fig, path))
    report.accuracy_plot(run, tmp_path / "accuracy.png")
    report.latency_plot(run, tmp_path / "latency.png")
    return [fig.axes[0] for fig in figures]


def test_lm_plots_are_written_with_perplexity_and_the_stop_line_above(tmp_path, monkeypatch):
    paths = report.write_report(make_lm_run(), tmp_path)
    for key in ("accuracy_plot", "latency_plot", "entropy_plot"):
        assert paths[key].stat().st_size > 0 and check_png(paths[key])
    assert paths["accuracy_plot"].name == "accuracy.png"
    accuracy, latency = lm_axes(make_lm_run(), tmp_path, monkeypatch)
    assert accuracy.get_ylabel() == "perplexity" and latency.get_ylabel() == "validation perplexity"
    assert accuracy.get_title().startswith("Perplexity while pruning") and latency.get_title().startswith("Perplexity")
    for ax in (accuracy, latency):
        stop = [line for line in ax.get_lines() if line.get_label().startswith("stop above")]
        assert len(stop) == 1 and list(stop[0].get_ydata()) == [pytest.approx(21.0)] * 2
        assert stop[0].get_label() == "stop above (21.000 = baseline x 1.05)"
        assert ax.get_yscale() == "linear"
    # a rejected step whose perplexity blew up: a log axis, so the accepted path is not flattened
    blown = make_lm_run(plan=LM_PLAN[:2] + [(["h_1_mlp_act"], 400.0, None, False)])
    assert [ax.get_yscale() for ax in lm_axes(blown, tmp_path, monkeypatch)] == ["log", "log"]


def test_classifier_plots_keep_their_labels(tmp_path, monkeypatch):
    accuracy, latency = lm_axes(make_run(), tmp_path, monkeypatch)
    assert accuracy.get_ylabel() == "accuracy (%)" and latency.get_ylabel() == "validation accuracy (%)"
    for ax in (accuracy, latency):
        (stop,) = [line for line in ax.get_lines() if line.get_label().startswith("stop below")]
        assert stop.get_label() == "stop below (90.30% = baseline - 1)" and stop.get_ydata()[0] == pytest.approx(90.3)
        assert ax.get_yscale() == "linear"


def test_a_payoff_without_its_input_shape_says_no_input():
    before = {"runtime": "eager", "device": "cpu", "macs": 10, "params": 5}
    after = {"latency_ratio": 0.5, "latency_ms": 1.0, "baseline_ms": 2.0, "macs": 8, "params": 4}
    assert report.payoff_lines(before, after)[0].startswith("latency (eager on cpu): 2.000 ms -> 1.000 ms")
    assert report.payoff_lines(dict(before, example_shape=[4, 128]), after)[0].startswith(
        "latency (eager on cpu at batch 4, input [4, 128]):")
