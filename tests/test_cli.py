"""The `easier-kernels` command: backends and a short benchmark."""

from helpers import run_python

from easier_kernels import cli


def test_backends_lists_what_is_active(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "available backends: reference, cpp" in out
    assert "default on cpu: cpp" in out


def test_bench_prints_a_table_of_ratios(capsys):
    assert cli.main(["bench", "--shapes", "resnet18-cifar-s4"]) == 0
    out = capsys.readouterr().out
    assert "| resnet18-cifar-s4 | cpp |" in out
    assert "count_on / torch.sum bandwidth" in out


def test_bad_shape_is_a_one_line_error_with_exit_code_2():
    out = run_python("-m", "easier_kernels.cli", "bench", "--shapes", "nope")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown shape 'nope'" in out.stderr


# ---- prune and score

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import easier_kernels as ek  # noqa: E402

QUICK = ["--width", "0.125", "--epochs", "1", "--train-size", "256", "--max-drop", "100", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert cli.main(["prune", *QUICK, "--max-steps", "2", "--out", str(out)]) == 0
    return out


def test_prune_writes_the_report_plots_checkpoints_and_a_loadable_model(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"run.json", "baseline.pt", "pruned.pt", "report.json", "report.md", "entropy.png", "accuracy.png",
            "checkpoints"} <= names
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000.pt", "step_001.pt", "step_002.pt"]
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["sites"]) == 17 and len(report["steps"]) == 2
    assert report["linearized"] == [n for s in report["steps"] for n in s["removed"]]
    for step in report["steps"]:
        assert set(step) >= {"removed", "entropy", "val_accuracy", "test_accuracy"}
        assert step["removed"][0] == min(step["entropy"], key=step["entropy"].get)
    assert 0 <= report["baseline_accuracy"] <= 100 and report["settings"]["dataset"] == "fashion-mnist-mini"
    markdown = (run_dir / "report.md").read_text()
    assert "](entropy.png)" in markdown and "](accuracy.png)" in markdown and report["linearized"][0] in markdown
    for png in ("entropy.png", "accuracy.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = report["settings"]
    result = ek.load(run_dir / "pruned.pt", lambda: ek.models.build(settings["model"], num_classes=10, in_channels=1,
                                                                     width=settings["width"]))
    assert result.linearized == report["linearized"]
    assert result.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_prune_with_a_naive_rule_and_a_smaller_validation_split(tmp_path):
    out = tmp_path / "last"
    assert cli.main(["prune", *QUICK, "--max-steps", "2", "--select", "last", "--val-size", "64", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["linearized"] == report["sites"][::-1][:2]
    assert report["settings"]["select"] == "last" and report["settings"]["val_size"] == 64


def test_prune_latency_aware_to_a_latency_target_prints_what_the_run_bought(tmp_path, capsys):
    out = tmp_path / "fast"
    assert cli.main(["prune", *QUICK, "--max-steps", "3", "--layers-per-step", "2", "--select", "entropy-latency",
                     "--latency-target", "0.97", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["select"] == "entropy-latency" and report["settings"]["latency_target"] == 0.97
    ratios = [step["latency_ratio"] for step in report["steps"]]
    for step in report["steps"]:
        assert step["latency_ratio"] > 0 and step["macs"] > 0 and step["params"] > 0 and step["gains"]
    if report["stopped"].startswith("latency ratio"):  # stops on either condition, the target when reached
        assert ratios[-1] <= 0.97 and all(r > 0.97 for r in ratios[:-1])
    else:
        assert report["stopped"] == "reached max_steps=3" and all(r > 0.97 for r in ratios)
    assert "latency (eager on cpu at batch 1, input [1, 1, 28, 28]): " in printed and "MACs: " in printed
    noisy = "?" if report["payoff"]["noisy"] else ""  # (a busy machine: the summary marks the figure)
    assert f"= {report['payoff']['latency_ratio']:.3f}x{noisy} the original" in printed
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](latency.png)" in (out / "report.md").read_text()


def test_a_run_at_a_deploy_batch_plans_reports_and_folds_at_it(tmp_path, capsys, monkeypatch):
    planner = importlib.import_module("easier_kernels.fold.planner")
    timed, seconds = [], planner._seconds

    def recorded(module, args, runtime):  # the real timing, its input shapes recorded
        timed.append(list(args[0].shape))
        return seconds(module, args, runtime)

    monkeypatch.setattr(planner, "_seconds", recorded)
    out = tmp_path / "batch8"
    # untrained, on few images; select first, two per step: the stem's relu and layer1_0_relu1, whose conv chain is planned
    argv = ["prune", *QUICK, "--epochs", "0", "--train-size", "64", "--val-size", "32", "--max-steps", "1",
            "--layers-per-step", "2", "--select", "first", "--out", str(out)]
    assert cli.main([*argv, "--deploy-batch", "8"]) == 0
    assert "latency (eager on cpu at batch 8, input [8, 1, 28, 28]): " in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["deploy_batch"] == 8 and report["settings"]["deploy_batch"] == 8
    assert report["baseline_payoff"]["example_shape"] == [8, 1, 28, 28]
    plans = report["recipe"]["plans"]
    assert plans and all(p["batch"] == 8 for p in plans)
    assert timed and all(shape[0] == 8 for shape in timed)
    assert "at batch 8, input [8, 1, 28, 28]" in (out / "report.md").read_text()

    # fold defaults to the run's deploy batch and follows the plans timed at it
    timed.clear()
    assert cli.main(["fold", str(out), "--device", "cpu"]) == 0
    assert "with a batch of [8, 1, 28, 28]" in capsys.readouterr().out
    fold = ek.recipe(ek.load_folded(out / "folded.pt", lambda: ek.models.build("resnet18", num_classes=10, in_channels=1,
                                                                            width=0.125)))["fold"]
    rows, fell_back = {tuple(r["layers"]): r for r in fold["decisions"]}, fold["latency"]["fallbacks"]
    for plan in plans:
        row = rows[tuple(plan["layers"])]
        assert row["chain"] in fell_back or (row["choice"], row["why"]) == (plan["plan"], "planned by linearize (eager, batch 8)")
    assert timed == []  # nothing planned again

    _one_line_error(capsys, [*argv, "--deploy-batch", "4", "--resume"], "--deploy-batch 8 (now 4)")


def test_score_prints_the_entropy_table_of_a_run(run_dir, capsys):
    assert cli.main(["score", str(run_dir), "--max-batches", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 15  # 17 sites, 2 linearized
    entropies = [float(line.split()[-1]) for line in rows]
    assert entropies == sorted(entropies) and all(0 <= e <= 1 for e in entropies)
    assert "linearized: " in out


def test_costs_measures_each_remaining_site_against_every_score_and_a_rerun_reads_the_cache(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    argv = ["costs", str(run), "--seeds", "0", "--train-size", "64", "--val-size", "64", "--change-batches", "1",
            "--device", "cpu", "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((run / "removability.json").read_text())
    sites = set(record["costs"])
    assert len(sites) == 15 and set(record["scores"]) == {"entropy", "off_fraction", "linearization_error",
                                                         "output_change", "random"}
    assert all(set(values) == sites for values in record["scores"].values())
    assert all(set(c["finetuned"]) == {"0"} and "untrained" in c for c in record["costs"].values())
    assert record["train_size"] == record["val_size"] == 64 and "spearman" in printed and "kendall" in printed
    cached = json.loads((run / "costs.json").read_text())
    assert cli.main(argv) == 0  # a rerun: every cost from the cache, the same numbers
    assert json.loads((run / "costs.json").read_text()) == cached
    assert json.loads((run / "removability.json").read_text())["costs"] == record["costs"]
    capsys.readouterr()
    (tmp_path / "mine.json").write_text("{}")
    _one_line_error(capsys, [*argv, "--out", str(tmp_path / "mine.json")], "was not written by `costs`; pass --force")
    _one_line_error(capsys, [*argv, "--out", str(run / "report.json")], "a run folder's own file")
    _one_line_error(capsys, [*argv, "--lr", "0"], "--lr must be a finite learning rate > 0")
    _one_line_error(capsys, [*argv, "--epochs-per-step", "0"], "--epochs-per-step must be an integer >= 1, not 0")
    _one_line_error(capsys, [*argv, "--epochs-per-step", "2"], "written for other options")


def test_fold_prints_the_decision_table_and_saves_a_loadable_module(run_dir, tmp_path, capsys):
    out = tmp_path / "folded.pt"
    assert cli.main(["fold", str(run_dir), "--device", "cpu", "--batch-size", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = ek.recipe(ek.load_folded(out, lambda: ek.models.build("resnet18", num_classes=10, in_channels=1, width=0.125)))
    rows = record["fold"]["decisions"]
    assert "relative error of the outputs" in printed and "whole network (eager)" in printed and f"saved {out}" in printed
    assert "for the original with batch norms folded" in printed
    assert "the original with batch norms folded" in printed.splitlines()[-3] and "MACs: " in printed
    assert all(row["chain"] in printed and row["choice"] in printed for row in rows)
    assert record["linearized"] == json.loads((run_dir / "report.json").read_text())["linearized"]
    assert record["fold"]["relative_error"] <= 1e-5 and record["fold"]["batch_norms"] == 20
    _one_line_error(capsys, ["fold", str(tmp_path / "nothing")], "no such file")


def test_an_inexact_fold_is_a_one_line_error_naming_the_flag(run_dir, capsys, monkeypatch):
    import sys

    fold_pkg = sys.modules["easier_kernels.fold"]  # the package: ek.fold is the function

    def inexact(*args, **kwargs):
        raise ek.InexactFold("the folded module's outputs differ from the model's by a relative error of 3.0e-02")

    monkeypatch.setattr(fold_pkg, "fold", inexact)
    err = _one_line_error(capsys, ["fold", str(run_dir), "--device", "cpu"], "relative error of 3.0e-02")
    assert err.endswith("pass --allow-inexact to accept it") and "allow_inexact=True" not in err


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_writes_a_checked_file_and_prints_the_latency_in_its_runtime(run_dir, tmp_path, capsys, fmt):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")
    out = tmp_path / f"model.{fmt}"
    assert cli.main(["export", str(run_dir), "--format", fmt, "--device", "cpu", "--batch-size", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    runtime = "onnxruntime" if fmt == "onnx" else "eager"
    assert f"whole network ({runtime})" in printed and f"wrote {out} ({fmt})" in printed and out.stat().st_size > 0
    assert f"plans timed in {runtime}" in printed


def test_a_torchvision_model_on_grayscale_images(tmp_path, capsys):
    out = tmp_path / "tv"
    assert cli.main(["prune", "--model", "mobilenet_v3_small", "--epochs", "1", "--train-size", "128", "--max-steps", "1",
                     "--max-drop", "100", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["settings"]["in_channels"] == 3  # images repeated to RGB
    assert cli.main(["score", str(out), "--max-batches", "1", "--device", "cpu"]) == 0
    assert "32 active sites, 1 linearized" in capsys.readouterr().out


def test_resume_continues_a_run_with_more_steps(run_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    record = json.loads((out / "run.json").read_text())  # as a run started before --select / --val-size existed
    for newer in ("select", "select_seed", "val_size"):
        del record["settings"][newer]
    (out / "run.json").write_text(json.dumps(record))
    assert cli.main(["prune", *QUICK, "--max-steps", "3", "--out", str(out), "--resume"]) == 0
    before, after = json.loads((run_dir / "report.json").read_text()), json.loads((out / "report.json").read_text())
    assert len(after["steps"]) == 3 and after["steps"][:2] == before["steps"][:2]
    assert after["baseline_accuracy"] == before["baseline_accuracy"]


def test_resume_skips_a_corrupt_latest_checkpoint_and_stops_with_one_line_when_none_is_readable(run_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    (out / "checkpoints" / "step_002.pt").write_bytes(b"torn by a disk")
    (out / "baseline.pt").write_bytes(b"torn too")  # the baseline is trained again
    with pytest.warns(UserWarning) as caught:
        assert cli.main(["prune", *QUICK, "--max-steps", "2", "--out", str(out), "--resume"]) == 0
    messages = " | ".join(str(w.message) for w in caught)
    assert "baseline.pt is unreadable (" in messages and "training the baseline again" in messages
    assert "skipping unreadable checkpoint " in messages and "step_002.pt" in messages
    before, after = json.loads((run_dir / "report.json").read_text()), json.loads((out / "report.json").read_text())
    assert [s["removed"] for s in after["steps"]] == [s["removed"] for s in before["steps"]]
    for path in (out / "checkpoints").glob("step_*.pt"):
        path.write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        _one_line_error(capsys, ["prune", *QUICK, "--max-steps", "2", "--out", str(out), "--resume"],
                        "holds no readable checkpoint (step_000.pt, step_001.pt, step_002.pt could not be read); start "
                        "afresh in another folder")
    warned = {Path(str(w.message).split()[3]).name: str(w.message) for w in caught if "skipping" in str(w.message)}
    assert warned["step_002.pt"].endswith("it is empty; was it fully written?); trying the one before it")
    assert warned["step_000.pt"].endswith("no earlier checkpoint is left")  # (not "resuming from an earlier one")


def _one_line_error(capsys, argv, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err
    return err


def test_a_run_folder_is_never_overwritten(run_dir, capsys):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    _one_line_error(capsys, ["prune", *QUICK, "--out", str(run_dir)], "already holds a run; pass --resume")
    _one_line_error(capsys, ["prune", *QUICK, "--out", str(run_dir), "--resume", "--width", "0.25"],
                    "holds a run started with --width 0.125 (now 0.25)")
    _one_line_error(capsys, ["prune", *QUICK, "--out", str(run_dir), "--resume", "--model", "vgg16_bn"],
                    "--model resnet18 (now vgg16_bn)")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "cifar10-subset"], "needs --data-root"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--max-drop", "-1"], "--max-drop must be accuracy points in [0, 100], not -1.0"),
    (["--max-drop", "101"], "--max-drop must be accuracy points in [0, 100], not 101.0"),
    (["--lr", "-1"], "--lr must be a finite learning rate > 0, not -1.0"),
    (["--lr", "0"], "--lr must be a finite learning rate > 0, not 0.0"),
    (["--train-lr", "-5"], "--train-lr must be a finite learning rate > 0, not -5.0"),
    (["--width", "0"], "width must be a finite number > 0"),
    (["--resume"], "holds no run to continue (no run.json there); check --out, or leave out --resume to start a run"),
    (["--distill", "0"], "--distill must be the teacher's share of the loss in (0, 1], not 0.0"),
    (["--anneal", "0"], "--anneal must be the fraction of a step's batches to anneal over, in (0, 1], not 0.0"),
    (["--anneal", "2"], "--anneal must be the fraction of a step's batches to anneal over, in (0, 1], not 2.0"),
    (["--distill", "1.5"], "--distill must be the teacher's share of the loss in (0, 1], not 1.5"),
    (["--distill-temperature", "0", "--distill"], "--distill-temperature must be a finite number > 0, not 0.0"),
    (["--epochs-per-step", "0"], "--epochs-per-step must be an integer >= 1, not 0"),
    (["--val-size", "0"], "--val-size must be >= 1"),
    (["--latency-target", "0"], "--latency-target must be a fraction of the original's latency in (0, 1]"),
    (["--deploy-batch", "0"], "--deploy-batch must be an integer >= 1, not 0"),
    (["--deploy-batch", "-1"], "--deploy-batch must be an integer >= 1, not -1"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--num-classes", "5"], "--num-classes 5 is fewer than the 10 classes of fashion-mnist-mini; pass at least 10"),
    (["--num-classes", "0"], "--num-classes must be >= 1"),
    (["--image-size", "64"], "fashion-mnist-mini images are 28x28; image_size=64 applies to imagefolder only"),
    (["--model", "hf:someone/model"], "hf:someone/model is not a local folder; pass --download"),
    (["--weights", "nowhere.pth"], "--weights nowhere.pth: no such file"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, argv, match):
    _one_line_error(capsys, ["prune", *argv, "--out", str(tmp_path / "out")], match)
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.parametrize("argv, match", [
    (["--deploy-batch", "16.5"], "argument --deploy-batch: invalid int value: '16.5'"),
    (["--max-drop", "nan"], "argument --max-drop: invalid finite number value: 'nan'"),
    (["--max-drop", "inf"], "argument --max-drop: invalid finite number value: 'inf'"),
    (["--lr=-inf"], "argument --lr: invalid finite number value: '-inf'"),
    (["--latency-target", "nan"], "argument --latency-target: invalid finite number value: 'nan'"),
    (["--dist-timeout", "inf"], "argument --dist-timeout: invalid finite number value: 'inf'"),
])
def test_an_option_that_is_not_a_finite_number_is_one_line(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exited:  # (argparse's own error, made one line)
        cli.main(["prune", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and err.count("\n") == 0 and match in err, err
    assert not (tmp_path / "out").exists()


def test_missing_empty_or_unreadable_data_is_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    _one_line_error(capsys, ["prune", "--dataset", "cifar10-subset", "--data-root", str(tmp_path / "nowhere"), *out],
                    str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["prune", "--dataset", "imagefolder", "--data-root", str(tmp_path / "empty"), *out], "empty")
    (tmp_path / "bad" / "cifar10-subset").mkdir(parents=True)
    (tmp_path / "bad" / "cifar10-subset" / "cifar10_subset.npz").write_bytes(b"garbage")
    _one_line_error(capsys, ["prune", "--dataset", "cifar10-subset", "--data-root", str(tmp_path / "bad"), *out],
                    "cifar10_subset.npz")
    assert not (tmp_path / "out").exists()


def test_score_of_something_else_is_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    _one_line_error(capsys, ["score", str(tmp_path / "x.pt")], "not a readable easier_kernels file")
    _one_line_error(capsys, ["score", str(tmp_path)], "no such file")


def test_bad_input_from_the_shell_has_no_traceback():
    out = run_python("-m", "easier_kernels.cli", "prune", "--dataset", "cifar10-subset")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "--data-root" in out.stderr


# ---- bring your own model and data: timm:/hf: models, --weights with a new head, image folders

def write_image_folder(root, per_class=12, classes=3):
    """train/ and val/ folders of 28x28 grey PNGs (the shipped Fashion-MNIST subset's first classes)."""
    import numpy as np
    from PIL import Image

    from easier_kernels import data

    with np.load(data.MINI_PATH) as arrays:
        for split, source in (("train", "train"), ("val", "test")):
            images, labels = arrays[f"{source}_images"], arrays[f"{source}_labels"]
            for c in range(classes):
                folder = root / split / data.FASHION_MNIST_CLASSES[c].replace("/", "-")
                folder.mkdir(parents=True)
                for i in np.flatnonzero(labels == c)[:per_class]:
                    Image.fromarray(images[i]).save(folder / f"{i}.png")
    return root


def test_prune_a_pretrained_timm_model_on_an_image_folder(tmp_path):
    """The issue's "done": ImageNet-shaped weights (1000 classes) pruned on a 3-class folder, from the shell."""
    from easier_kernels.compat import import_torchvision

    import_torchvision()
    pytest.importorskip("timm", reason="the timm extra is not installed (pip install '.[timm]')")
    folder = write_image_folder(tmp_path / "images")
    torch.manual_seed(0)
    torch.save(ek.models.build("timm:resnet18", num_classes=1000).state_dict(), tmp_path / "PRETRAINED.pth")
    out = tmp_path / "run"
    done = run_python("-m", "easier_kernels.cli", "prune", "--model", "timm:resnet18", "--dataset", "imagefolder",
                      "--data-root", str(folder), "--image-size", "64", "--num-classes", "3", "--weights",
                      str(tmp_path / "PRETRAINED.pth"), "--epochs", "1", "--max-steps", "1", "--max-drop", "100",
                      "--batch-size", "16", "--workers", "1", "--plan", "merge", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "replaced head fc: 1000 -> 3 classes" in done.stdout and "removed 1 of 17 activation layers" in done.stdout
    assert "input [1, 3, 64, 64]" in done.stdout
    report = json.loads((out / "report.json").read_text())
    settings = report["settings"]
    assert (settings["model"], settings["num_classes"], settings["in_channels"], settings["image_size"]) == \
        ("timm:resnet18", 3, 3, 64)
    assert len(report["linearized"]) == 1 and (out / "baseline.pt").is_file()  # the new head was trained first
    result = ek.load(out / "pruned.pt", lambda: ek.models.build("timm:resnet18", num_classes=3))
    assert result.linearized == report["linearized"]
    assert result.model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    pretrained = torch.load(tmp_path / "PRETRAINED.pth")
    assert not torch.equal(result.model.state_dict()["conv1.weight"], pretrained["conv1.weight"])  # fine-tuned from it


def test_prune_a_hugging_face_model_from_a_config_folder(tmp_path):
    """hf:FOLDER (a local config, random init, nothing downloaded): a transformers ViT, captured by
    torch.export, trained on its .logits, pruned end to end from the shell."""
    from easier_kernels.compat import import_torchvision

    import_torchvision()
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed (pip install '.[hf]')")
    folder = write_image_folder(tmp_path / "images")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64)
    config.save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    done = run_python("-m", "easier_kernels.cli", "prune", "--model", f"hf:{tmp_path / 'vit'}", "--dataset", "imagefolder",
                      "--data-root", str(folder), "--image-size", "32", "--num-classes", "3", "--epochs", "1",
                      "--max-steps", "1", "--max-drop", "100", "--batch-size", "16", "--workers", "0", "--plan", "merge",
                      "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["sites"] == ["vit_layers_0_mlp_activation_fn", "vit_layers_1_mlp_activation_fn"]
    assert len(report["linearized"]) == 1
    result = ek.load(out / "pruned.pt", lambda: ek.models.build(f"hf:{tmp_path / 'vit'}", num_classes=3))
    assert result.model.eval()(torch.zeros(2, 3, 32, 32)).logits.shape == (2, 3)


ZERO_BASELINE = "ignore:baseline accuracy is 0.0"  # a handful of validation images, a barely trained model


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A quick run of the paper's ResNet-18 on an image folder at 16 px."""
    root = tmp_path_factory.mktemp("folder")
    folder = write_image_folder(root / "images", per_class=8)
    out = root / "run"
    assert cli.main(["prune", "--width", "0.125", "--epochs", "1", "--max-steps", "1", "--max-drop", "100", "--quiet",
                     "--dataset", "imagefolder", "--data-root", str(folder), "--image-size", "16", "--batch-size", "8",
                     "--plan", "merge", "--out", str(out)]) == 0
    return folder, out


@pytest.mark.filterwarnings(ZERO_BASELINE)
def test_score_reads_an_image_folder_at_the_run_s_image_size(folder_run, capsys, monkeypatch):
    from easier_kernels import data

    _, out = folder_run
    assert json.loads((out / "report.json").read_text())["settings"]["image_size"] == 16
    asked, load = [], data.load
    monkeypatch.setattr(data, "load", lambda *a, **k: asked.append(k) or load(*a, **k))
    capsys.readouterr()
    assert cli.main(["score", str(out), "--max-batches", "1", "--device", "cpu", "--workers", "0"]) == 0
    assert asked[0]["image_size"] == 16 and "16 active sites, 1 linearized" in capsys.readouterr().out


def test_weights_of_the_same_model_skip_the_baseline_and_other_shapes_are_one_line(tmp_path, capsys):
    torch.save({"state_dict": ek.models.build("resnet18", num_classes=10, in_channels=1, width=0.125).state_dict()},
               tmp_path / "same.pth")
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK, "--max-steps", "0", "--val-size", "64", "--weights", str(tmp_path / "same.pth"),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"loaded --weights {tmp_path / 'same.pth'}\n" in printed and "replaced" not in printed
    assert not (out / "baseline.pt").exists()  # trained weights: no baseline training
    torch.save(ek.models.build("resnet18", num_classes=10, in_channels=1, width=0.25).state_dict(), tmp_path / "wide.pth")
    _one_line_error(capsys, ["prune", *QUICK, "--weights", str(tmp_path / "wide.pth"), "--out", str(tmp_path / "x")],
                    f"--weights {tmp_path / 'wide.pth'} does not fit --model resnet18: conv1.weight, bn1.weight, bn1.bias "
                    "and 97 more have other shapes (first: conv1.weight is [16, 1, 3, 3] in the checkpoint, [8, 1, 3, 3] "
                    "in the model); pass a state_dict of that architecture")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    _one_line_error(capsys, ["prune", *QUICK, "--weights", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "y")],
                    f"--weights: cannot read {tmp_path / 'junk.pth'} as a state_dict")


@pytest.mark.filterwarnings(ZERO_BASELINE)
def test_an_unreadable_image_met_during_a_run_is_one_line(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "images", per_class=4)
    broken = next((folder / "val").glob("*/*.png"))
    broken.write_bytes(b"not a png")
    err = _one_line_error(capsys, ["prune", "--width", "0.125", "--epochs", "1", "--quiet", "--dataset", "imagefolder",
                                   "--data-root", str(folder), "--image-size", "16", "--workers", "1",
                                   "--out", str(tmp_path / "out")], f"cannot read the image {broken}")
    assert err.endswith("remove or replace it")


def test_workers_default_to_none_in_memory_and_a_few_for_image_folders():
    import os

    assert cli._workers(None, "fashion-mnist-mini") == 0 and cli._workers(3, "fashion-mnist-mini") == 3
    assert cli._workers(None, "imagefolder") == min(4, os.cpu_count()) and cli._workers(0, "imagefolder") == 0


# ---- overwrite nothing, fail fast, say what to do (a bad-input sweep's defects)

def _cli(*argv, unprivileged: bool = False) -> subprocess.CompletedProcess:
    """`easier-kernels ...` as a user types it; `unprivileged`: without the power to write where
    file modes forbid it (root's CAP_DAC_OVERRIDE dropped with setpriv)."""
    return subprocess.run([*(_UNPRIVILEGED if unprivileged else []), sys.executable, "-m", "easier_kernels.cli",
                           *map(str, argv)], capture_output=True, text=True)


# (as root: no override of file modes, in this process and what it runs; as anyone else, modes apply already)
_UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"] \
    if os.geteuid() == 0 else []


def _refused(done: subprocess.CompletedProcess, match: str) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err and match in err, done.stderr
    return err


def _files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_fold_and_export_replace_an_existing_file_only_with_force_and_never_a_run_s_own(run_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's notes")
    before = _files(run_dir)
    for command in (["fold", run_dir], ["export", run_dir, "--format", "pt2"]):
        _refused(_cli(*command, "--out", notes), f"{notes} exists; pass --force to replace it, or --out another path")
        for own in ("pruned.pt", "run.json", "report.md", "checkpoints/step_000.pt"):
            _refused(_cli(*command, "--out", run_dir / own, "--force"), "is a run folder's own file (prune wrote it; "
                     "never replaced, even with --force)")
        _refused(_cli(*command, "--out", tmp_path), f"--out {tmp_path} is a folder")
    _refused(_cli("fold", run_dir / "pruned.pt", "--out", run_dir / "pruned.pt", "--force"), "own file")
    assert notes.read_text() == "a user's notes" and _files(run_dir) == before
    done = _cli("fold", run_dir, "--out", notes, "--force")
    assert done.returncode == 0, done.stderr
    assert ek.load_folded(notes, ek.models.build("resnet18", num_classes=10, in_channels=1, width=0.125)) is not None


@pytest.fixture
def read_only(tmp_path):
    """make(path): the folder made read-only to `_cli(..., unprivileged=True)`; skips where this
    machine cannot take that right away (no setpriv as root, or writes still pass)."""
    made = []

    def make(folder: Path) -> Path:
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no way to make a folder unwritable to this test")
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        done = subprocess.run([*_UNPRIVILEGED, "touch", str(folder / "probe")], capture_output=True, text=True)
        if done.returncode == 0 or "Permission denied" not in done.stderr:
            pytest.skip(f"cannot make a folder unwritable here ({done.stderr.strip() or 'it stays writable'})")
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


def test_an_unwritable_out_is_one_line_before_any_work(run_dir, tmp_path, read_only):
    parent = read_only(tmp_path / "locked")
    _refused(_cli("prune", *QUICK, "--out", parent / "run", unprivileged=True),
             f"--out {parent / 'run'}: cannot write in {parent} (permission denied or read-only)")
    empty = read_only(tmp_path / "empty")
    _refused(_cli("prune", *QUICK, "--out", empty, unprivileged=True), f"cannot write in {empty}")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = _files(run)
    read_only(run / "checkpoints")
    _refused(_cli("prune", *QUICK, "--max-steps", "3", "--out", run, "--resume", unprivileged=True),
             f"cannot write in {run / 'checkpoints'}")  # (before a step is trained, not after)
    read_only(run)
    _refused(_cli("fold", run, unprivileged=True), f"cannot write {run / 'folded.pt'}: {run} is not writable")
    assert _files(run) == before and not (parent / "run").exists()


def test_a_start_that_fails_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "images", per_class=4)
    broken = {path: path.read_bytes() for path in (folder / "train").glob("*/*.png")}  # (met in baseline training)
    for path in broken:
        path.write_bytes(b"not a png")
    argv = ["prune", "--width", "0.125", "--epochs", "1", "--quiet", "--dataset", "imagefolder", "--data-root",
            str(folder), "--image-size", "16", "--max-steps", "0", "--out", str(tmp_path / "out")]
    _one_line_error(capsys, argv, f"cannot read the image {folder / 'train'}")
    assert not (tmp_path / "out").exists()  # (its run.json is gone with the folder it made)
    for path, good in broken.items():
        path.write_bytes(good)
    with pytest.warns(UserWarning, match="baseline accuracy"):  # (a handful of images, a barely trained model)
        assert cli.main(argv) == 0


def test_pickled_code_and_other_files_given_as_weights_say_what_they_are(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"conv1.weight": Payload()}, tmp_path / "code.pth")
    (tmp_path / "notweights.txt").write_text("hello")
    err = _refused(_cli("prune", "--weights", tmp_path / "code.pth", "--out", tmp_path / "a"),
                   f"--weights: cannot read {tmp_path / 'code.pth'} as a state_dict: it holds pickled Python objects "
                   "(posix.system), not only tensors; they are never loaded, as loading them can run code: save tensors "
                   "only, e.g. torch.save(model.state_dict(), path)")
    assert "\x1b" not in err and not marker.exists()
    _refused(_cli("prune", "--weights", tmp_path / "notweights.txt", "--out", tmp_path / "b"),
             "it is not a file torch.save wrote")


def test_an_image_folder_of_one_class_is_one_line(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "images", per_class=2, classes=1)
    _one_line_error(capsys, ["prune", "--dataset", "imagefolder", "--data-root", str(folder), "--out",
                             str(tmp_path / "out")], "holds one class folder (T-shirt-top); a classifier needs at least two")


def test_prune_with_recovery_options_records_and_says_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK, "--max-steps", "1", "--distill", "--anneal", "0.3", "--out", str(out)]) == 0
    assert "recovery: distillation from the unpruned network (teacher's share of the loss 0.5, temperature 4); each " \
           "step's sites annealed to the identity over the first 30% of its batches" in capsys.readouterr().out
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["distill"] == 0.5 and settings["distill_temperature"] == 4.0 and settings["anneal"] == 0.3
    _one_line_error(capsys, ["prune", *QUICK, "--max-steps", "2", "--out", str(out), "--resume"],
                    "--distill 0.5 (now None)")


def test_prune_with_patience_records_and_says_it_and_a_bad_value_is_one_line(tmp_path, capsys):
    _one_line_error(capsys, ["prune", "--patience", "-1", "--out", str(tmp_path / "bad")],
                    "--patience must be an integer >= 0, not -1")
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK, "--max-steps", "1", "--patience", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rejected = sum(not s["accepted"] for s in report["steps"])
    said = f"{rejected} {'try' if rejected == 1 else 'tries'} rejected in all (patience 2)"
    assert said in capsys.readouterr().out and said in (out / "report.md").read_text()
    assert report["settings"]["patience"] == 2
    assert json.loads((out / "run.json").read_text())["settings"]["patience"] == 2
    _one_line_error(capsys, ["prune", *QUICK, "--max-steps", "2", "--patience", "1", "--out", str(out), "--resume"],
                    "--patience 2 (now 1)")
