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
