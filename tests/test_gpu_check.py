"""scripts/gpu_check.sh, the one command a session with a GPU runs, in its cpu mode: it must pass
here and write its report, and it must fail (non-zero exit, the step marked) when a test fails,
hangs, cannot be imported or a step runs over its limit, so that the script cannot rot between
the rare sessions that have a GPU."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FILES = {"report.md", "build.log", "tests.log", "bench.log", "bench.json"}


def run_check(out: Path, **env_updates) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EK_GPU_CHECK_", "EK_BENCH_"))}
    env.update(OUT=str(out), PYTHON=sys.executable, **env_updates)
    return subprocess.run(["bash", str(SCRIPT), "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def summary_row(report: str, step: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {step} |"))


def test_cpu_mode_passes_and_reports_the_device_parts_as_skipped(tmp_path):
    out = tmp_path / "out"
    done = run_check(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in out.iterdir()} <= FILES and all(p.is_file() for p in out.iterdir())
    assert {"report.md", "tests.log", "bench.log"} <= {p.name for p in out.iterdir()}
    report = (out / "report.md").read_text()
    assert report.startswith("# GPU check (cpu mode): PASS")
    for section in ("## Summary", "## Machine", "## Build", "## Backends", "## Tests", "## Benchmarks"):
        assert section in report
    for step in ("header", "build", "backends", "tests", "benchmarks"):
        assert "| pass |" in summary_row(report, step), summary_row(report, step)
    assert "CUDA build skipped: no CUDA device" in summary_row(report, "build")
    for step in ("tests", "benchmarks"):  # collected (so they cannot rot) and skipped
        assert "skipped (skipped: no CUDA device)" in summary_row(report, step)
    assert "- python " in report and "torch " in report
    assert "test_gpu_smoke.py" in (out / "tests.log").read_text()


def test_a_failing_hung_or_broken_test_fails_the_check(tmp_path):
    tests = tmp_path / "test_injected.py"
    tests.write_text(textwrap.dedent("""
        import time
        import pytest

        pytestmark = pytest.mark.gpu

        def test_passes():
            pass

        def test_fails():
            assert 1 + 1 == 3, "injected failure"

        def test_hangs():
            time.sleep(120)
    """))
    benches = tmp_path / "bench_injected.py"
    benches.write_text('raise RuntimeError("injected: this benchmark file cannot be imported")\n')
    out = tmp_path / "out"
    done = run_check(out, EK_GPU_CHECK_TESTS=str(tests), EK_GPU_CHECK_BENCHES=str(benches), EK_GPU_CHECK_RUN_ON_CPU="1",
                     EK_GPU_CHECK_TEST_TIMEOUT="3")
    assert done.returncode != 0
    report = (out / "report.md").read_text()
    assert report.startswith("# GPU check (cpu mode): FAIL")
    row = summary_row(report, "tests")
    assert "| FAIL |" in row and "2 failed, 1 passed" in row, row
    assert "injected failure" in report and "per-test limit of 3 s" in report
    row = summary_row(report, "benchmarks")
    assert "| FAIL |" in row and "1 error" in row, row
    assert "cannot be imported" in report


def test_a_step_over_its_limit_is_marked_and_the_report_still_written(tmp_path):
    tests = tmp_path / "test_sleeps.py"
    tests.write_text("import time\nimport pytest\n\n\n@pytest.mark.gpu\ndef test_sleeps():\n    time.sleep(300)\n")
    out = tmp_path / "out"
    start = time.monotonic()
    done = run_check(out, EK_GPU_CHECK_TESTS=str(tests), EK_GPU_CHECK_BENCHES="", EK_GPU_CHECK_RUN_ON_CPU="1",
                     EK_GPU_CHECK_TEST_TIMEOUT="0", EK_GPU_CHECK_TIMEOUT_TESTS="6")
    assert time.monotonic() - start < 120
    assert done.returncode != 0
    report = (out / "report.md").read_text()
    assert "| TIMEOUT |" in summary_row(report, "tests")
    assert "over 6 s" in summary_row(report, "tests")
    assert "| skipped |" in summary_row(report, "benchmarks")
