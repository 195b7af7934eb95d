#!/usr/bin/env bash
# One prepared GPU check (issue 16): build the extension for this machine's GPU, run every test
# marked `gpu` and the GPU benchmarks in a short mode, and write what happened to one folder.
#
#   bash scripts/gpu_check.sh          # "cuda" mode where torch sees a CUDA device, else "cpu"
#   bash scripts/gpu_check.sh --cpu    # force cpu mode (what tests/test_gpu_check.py runs in CI)
#
# Writes $OUT (default ./gpu-check/), flat, at most 5 files: report.md (the summary: machine,
# build, backends, tests, benchmark figures, seconds per step), build.log, tests.log, bench.log,
# bench.json (the benchmark rows). The report is rewritten after every step, so a run stopped
# from outside still leaves one. Exit code 0 only when every step passed: a failed or erroring
# test, a build that does not import, a step over its time limit, a step left out for lack of
# time, all make it non-zero. In cpu mode the device parts are skipped and say so (the gpu tests
# and benchmarks are collected, so they cannot rot, and skipped); everything else must pass.
#
# Steps, each under `timeout` and inside one overall budget (EK_GPU_CHECK_BUDGET, default 450 s,
# so that the whole run fits 8 minutes on an H100): machine header, build, backends, tests, benchmarks.
#
# Knobs (environment):
#   OUT                          where the files go (default ./gpu-check)
#   EK_GPU_CHECK_BUDGET          seconds for the whole run (default 450)
#   EK_GPU_CHECK_TIMEOUT_BUILD / _TESTS / _BENCH   per-step limits (default 240 / 180 / 150 s)
#   EK_GPU_CHECK_TEST_TIMEOUT    per-test limit inside the pytest steps (default 120 s: a first
#                                Triton compile of many kernels can take a minute; 0: none)
#   EK_GPU_CHECK_TESTS           what the tests step runs (default: tests/test_gpu_smoke.py tests,
#                                the smoke first); `-m gpu` selects in it
#   EK_GPU_CHECK_BENCHES         what the benchmark step runs (default: the five GPU benchmark
#                                files); empty: the step is left out
#   EK_GPU_CHECK_PYTEST_ARGS     extra pytest arguments for both pytest steps (e.g. -x, -k name)
#   EK_GPU_CHECK_RUN_ON_CPU=1    cpu mode runs the gpu-marked tests instead of skipping them
#                                (Triton in its interpreter; slow)
#   EK_GPU_CHECK_FORCE_BUILD=1   cpu mode builds in place even where an extension imports
#                                (cuda mode always builds: ninja makes an unchanged rebuild quick)
#
# Build time (the largest step). Measured on the 2-core development VM (shared, no GPU), one
# file at a time, nvcc 13.0 for one arch (-O3 -arch=sm_90) and g++ -O3 -fopenmp with torch 2.13's
# headers:
#   csrc/cuda/conv_block_cuda.cu   30 s     csrc/act_count_cpu.cpp    46 s
#   csrc/cuda/act_count_cuda.cu     7 s     csrc/conv_block_cpu.cpp   43 s
#   csrc/cuda/count_on_cuda.cu      3 s     csrc/bindings.cpp         37 s
#   csrc/cuda/bindings_cuda.cpp  ~35 s (est.: ATen + c10/cuda headers, as bindings.cpp; a CPU
#                                 torch lacks the c10/cuda headers to time it)
#                                           csrc/count_on_cpu.cpp     24 s
# Together ~225 s of compiling; nvcc for the three .cu files is only 40 s of it: torch's C++
# headers are most of the cost. On the GPU machine (16 cores, MAX_JOBS=16) ninja compiles the
# 8 files at once, so the longest single file bounds the build: ~45 s here, likely 30-45 s on
# a faster host core, plus ~10 s of setup.py (torch import, nvcc probe) and the link: expect
# 45-60 s. Without ninja (setuptools compiles one file after another) expect 150-230 s, inside
# the build step's 240 s but most of the budget: the header says whether ninja is there.
set -uo pipefail

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

MODE=auto
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (use --cpu or --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/gpu-check}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/report.md" "$OUT/build.log" "$OUT/tests.log" "$OUT/bench.log" "$OUT/bench.json"
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

BUDGET=${EK_GPU_CHECK_BUDGET:-450}
TIMEOUT_BUILD=${EK_GPU_CHECK_TIMEOUT_BUILD:-240}
TIMEOUT_TESTS=${EK_GPU_CHECK_TIMEOUT_TESTS:-180}
TIMEOUT_BENCH=${EK_GPU_CHECK_TIMEOUT_BENCH:-150}
export EK_GPU_CHECK_TEST_TIMEOUT=${EK_GPU_CHECK_TEST_TIMEOUT:-120}
TESTS=${EK_GPU_CHECK_TESTS-tests/test_gpu_smoke.py tests}  # the end-to-end smoke first, then the rest
BENCHES=${EK_GPU_CHECK_BENCHES-bench/bench_count_on.py bench/bench_act_count.py bench/bench_ride_along.py bench/bench_conv_block.py bench/bench_call_overhead.py}
read -r -a EXTRA_ARGS <<< "${EK_GPU_CHECK_PYTEST_ARGS:-}"
START_NS=$(date +%s%N)

elapsed() {  # seconds since the run started
  echo $((($(date +%s%N) - START_NS) / 1000000000))
}

# ---- the step record: name, status, seconds, note (one line each, tab-separated)

STEPS=$WORK/steps.tsv
: > "$STEPS"
record_step() {  # name status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >> "$STEPS"
  write_report
}

# run_step NAME LIMIT LOG CMD... : runs CMD under timeout (capped by what is left of the budget),
# output appended to LOG; sets STEP_RC and STEP_SECONDS; returns 0 when it ran (whatever its rc),
# 1 when there was no time left to start it.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET - $(elapsed) - 10))  # 10 s kept for the report
  if [ "$left" -lt 15 ]; then
    STEP_RC=-1; STEP_SECONDS=0
    record_step "$name" "NOT RUN" 0 "no time left in the budget of ${BUDGET} s (EK_GPU_CHECK_BUDGET)"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  STEP_LIMIT=$limit
  echo "== $name (limit ${limit} s): $*" | tee -a "$log" >&2
  local t0
  t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  STEP_RC=$?
  STEP_SECONDS=$(awk -v ns=$(($(date +%s%N) - t0)) 'BEGIN { printf "%.1f", ns / 1e9 }')
  echo "== $name: exit $STEP_RC after $STEP_SECONDS s" | tee -a "$log" >&2
  return 0
}

timed_out() {  # timeout's exit codes: 124 (TERM), 137 (KILL after -k)
  [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ]
}

# ---- helpers written to $WORK: the pytest plugin, the machine header, the backends, the report

cat > "$WORK/ek_gpu_check_plugin.py" <<'PY'
"""pytest plugin of scripts/gpu_check.sh (loaded with -p): one line per test phase into
$EK_GPU_CHECK_RESULTS (so counts survive a step killed by its time limit), a per-test time limit
($EK_GPU_CHECK_TEST_TIMEOUT seconds, by SIGALRM: it stops Python code, not a hung kernel; the
step's own limit does that), and in cpu mode a skip for every test marked gpu."""
import contextlib
import os
import signal

import pytest

RESULTS = os.environ.get("EK_GPU_CHECK_RESULTS")
LIMIT = float(os.environ.get("EK_GPU_CHECK_TEST_TIMEOUT") or 0)
SKIP_DEVICE_TESTS = os.environ.get("EK_GPU_CHECK_MODE") == "cpu" and os.environ.get("EK_GPU_CHECK_RUN_ON_CPU") != "1"


def _write(*fields):
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write("\t".join(" ".join(str(x).split()) for x in fields) + "\n")


class TestTimeout(Exception):
    pass


def _expired(signum, frame):
    raise TestTimeout(f"over the per-test limit of {LIMIT:g} s (EK_GPU_CHECK_TEST_TIMEOUT, scripts/gpu_check.sh)")


@contextlib.contextmanager
def _limited():
    if LIMIT <= 0:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _limited():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _limited():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    with _limited():
        yield


def pytest_collection_modifyitems(config, items):
    if SKIP_DEVICE_TESTS:
        skip = pytest.mark.skip(reason="no CUDA device (gpu_check cpu mode: device tests are collected, not run)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


def _message(report):
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            return crash.message
        lines = str(report.longrepr).strip().splitlines()
        return lines[-1] if lines else "failed"
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return ""


def pytest_runtest_logstart(nodeid, location):
    _write("start", nodeid)


def pytest_runtest_logreport(report):
    _write("report", report.nodeid, report.when, report.outcome, f"{report.duration:.2f}", _message(report)[:400])


def pytest_collectreport(report):
    if report.failed:
        _write("report", report.nodeid or "(collection)", "collect", "failed", "0", _message(report)[:400])


def pytest_sessionfinish(session, exitstatus):
    _write("finish", int(exitstatus))
PY

cat > "$WORK/machine.py" <<'PY'
"""The machine header: markdown to stdout; the device's arch (e.g. 9.0) to argv[1]."""
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import time

def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"

def run(*cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None

lines = [f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"- host: {socket.gethostname()} ({platform.platform()}), "
         f"{os.cpu_count()} CPUs", f"- mode: {os.environ.get('EK_GPU_CHECK_MODE')}"]
arch = ""
try:
    import torch
except Exception as e:  # noqa: BLE001 -- reported, and every later step fails on it
    lines.append(f"- torch: cannot be imported: {e}")
    torch = None
if torch is not None and torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    arch = f"{p.major}.{p.minor}"
    lines.append(f"- device: {torch.cuda.get_device_name(0)}, capability {arch}, {p.multi_processor_count} SMs, "
                 f"{p.total_memory / 2**30:.1f} GiB; {torch.cuda.device_count()} visible")
elif torch is not None:
    lines.append("- device: none (no CUDA device visible to torch): the device parts are skipped")
smi = shutil.which("nvidia-smi") and run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,"
                                          "mig.mode.current", "--format=csv,noheader")
lines.append(f"- nvidia-smi: {smi.splitlines()[0] if smi else 'not available'}")
if torch is not None:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines.append(f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}), "
                 f"triton {version('triton')}")
nvcc = shutil.which("nvcc")
nvcc_version = nvcc and run(nvcc, "--version")
lines.append(f"- nvcc: {nvcc_version.splitlines()[-2].strip() if nvcc_version else 'not found'}"
             + (f" ({nvcc})" if nvcc else "") + f"; CUDA_HOME={os.environ.get('CUDA_HOME', 'unset')}")
try:
    from torch.utils.cpp_extension import is_ninja_available
    ninja = is_ninja_available()
except Exception:  # noqa: BLE001
    ninja = False
lines.append(f"- ninja: {'yes (parallel build)' if ninja else 'no (the build compiles one file at a time)'}")
lines.append("- packages: " + ", ".join(f"{d} {version(d)}" for d in ("numpy", "torchvision", "pytest", "pytest-benchmark",
                                                                       "tqdm", "matplotlib", "onnx", "onnxruntime")))
lines.append("- environment: " + ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in
                                           ("EASIER_KERNELS_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")))
git = run("git", "-C", os.getcwd(), "log", "-1", "--format=%h %s")
lines.append(f"- commit: {git or 'n/a (no git metadata)'}")
print("\n".join(lines))
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        f.write(arch)
PY

cat > "$WORK/backends.py" <<'PY'
"""Which backends this machine has, and the default per device; markdown to stdout. Exits 1 in
cuda mode when a GPU backend (triton, cuda) is missing: then the check cannot check it."""
import os
import sys

import torch

import easier_kernels as ek
from easier_kernels.ops import backends

available = ek.ops.available_backends()
native = backends.native_extension()
lines = [f"- available: {', '.join(available)} (extension: {getattr(native, '__file__', 'none')}, "
         f"CUDA kernels built: {bool(getattr(native, 'has_cuda', False))})",
         f"- package: {os.path.dirname(ek.__file__)}"]
for device in ("cpu", "cuda"):
    if device == "cuda" and not torch.cuda.is_available():
        lines.append("- cuda: skipped: no CUDA device")
        continue
    here = [b for b in available if device in backends.devices_for(b)]
    lines.append(f"- {device}: default `{backends.backend_name(torch.device(device))}`; runs here: {', '.join(here)}")
print("\n".join(lines))
missing = [b for b in ("triton", "cuda") if torch.cuda.is_available() and "cuda" not in backends.devices_for(b)]
if missing:
    print(f"- MISSING on cuda: {', '.join(missing)} (triton needs the triton package; cuda needs nvcc at build time)")
    sys.exit(1)
PY

cat > "$WORK/report.py" <<'PY'
"""Writes report.md from what the steps left in $WORK and $OUT (stdlib only):
    report.py WORK OUT               the report
    report.py --counts RESULTS       "<failed + errors + unfinished>\t<counts>" of one pytest step
"""
import json
import os
import sys
from pathlib import Path


def results(path):
    """Per test (nodeid, outcome: passed/failed/error/skipped/unfinished, messages), and pytest's
    exit status (None when it did not finish), from the plugin's lines."""
    tests, order, finish = {}, [], None
    text = Path(path).read_text() if Path(path).exists() else ""
    for line in text.splitlines():
        f = line.split("\t")
        if f[0] == "start":
            tests.setdefault(f[1], {"phases": {}, "messages": []})
            order.append(f[1])
        elif f[0] == "report" and len(f) >= 5:
            t = tests.setdefault(f[1], {"phases": {}, "messages": []})
            if f[1] not in order:
                order.append(f[1])
            t["phases"][f[2]] = f[3]
            if len(f) > 5 and f[5]:
                t["messages"].append(f[5])
        elif f[0] == "finish":
            finish = int(f[1])
    rows = []
    for nodeid in order:
        phases = tests[nodeid]["phases"]
        if phases.get("call") == "failed":
            outcome = "failed"
        elif "failed" in phases.values():
            outcome = "error"
        elif "skipped" in phases.values():
            outcome = "skipped"
        elif phases.get("call") == "passed":
            outcome = "passed"
        else:
            outcome = "unfinished"
        rows.append((nodeid, outcome, "; ".join(tests[nodeid]["messages"])))
    return rows, finish


def counts(rows):
    c = {}
    for _, outcome, _ in rows:
        c[outcome] = c.get(outcome, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(c.items())) or "no test selected"


if sys.argv[1] == "--counts":
    rows, _ = results(sys.argv[2])
    print(sum(o in ("failed", "error", "unfinished") for _, o, _ in rows), counts(rows), sep="\t")
    sys.exit(0)

work, out = Path(sys.argv[1]), Path(sys.argv[2])
mode = os.environ.get("EK_GPU_CHECK_MODE", "?")


def read(name):
    p = work / name
    return p.read_text().strip() if p.exists() else ""


steps = [(line.split("\t") + [""] * 4)[:4] for line in read("steps.tsv").splitlines() if line]
failed = [s for s in steps if s[1] not in ("pass", "skipped")]
lines = [f"# GPU check ({mode} mode): {'FAIL' if failed else 'PASS'}", "",
         "Written by `scripts/gpu_check.sh`" + (" (cpu mode: the device parts are skipped for lack of a device)."
                                                 if mode == "cpu" else "."), "",
         "## Summary", "", "| step | status | seconds | note |", "|---|---|---|---|"]
lines += [f"| {s[0]} | {s[1]} | {s[2]} | {s[3].replace('|', '/')} |" for s in steps]
total = sum(float(s[2]) for s in steps)
lines += ["", f"Steps took {total:.0f} s together.", "", "## Machine", "", read("machine.md") or "(not written)", ""]
lines += ["## Build", "", read("build.md") or "(not run yet)", ""]
lines += ["## Backends", "", read("backends.md") or "(not run yet)", ""]
for title, name, note in (("Tests", "tests", "tests.log"), ("Benchmarks", "bench", "bench.log")):
    lines += [f"## {title}", ""]
    if read(f"{name}.md"):
        lines += [read(f"{name}.md"), ""]
    if (work / f"{name}.results").exists():
        rows, finish = results(work / f"{name}.results")
        lines.append(f"{counts(rows)}" + (f"; pytest exit status {finish}" if finish is not None else
                                         "; pytest did not finish (stopped by its time limit)") + f". Log: `{note}`.")
        bad = [r for r in rows if r[1] in ("failed", "error", "unfinished")]
        if bad:
            lines += ["", "| test | outcome | message |", "|---|---|---|"]
            lines += [f"| `{n}` | {o} | {m.replace('|', '/')} |" for n, o, m in bad[:40]]
            if len(bad) > 40:
                lines.append(f"| ... {len(bad) - 40} more | | |")
        skipped = {}
        for _, o, m in rows:
            if o == "skipped":
                skipped[m] = skipped.get(m, 0) + 1
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"{n} x {m}" for m, n in skipped.items())]
    lines.append("")

# the benchmark figures
bench = out / "bench.json"
if bench.exists():
    data = json.loads(bench.read_text())
    lines += [f"Machine: {data['machine']}; quick mode: {data['quick']}; pytest-benchmark: "
              + ("installed" if data["pytest_benchmark"] else
                 "NOT installed: its own tables are missing from bench.log; every figure below comes from "
                 "bench/conftest.py's own timing, as always"), ""]
    targets = {  # DESIGN.md, "Performance": (bench, ratio) -> (at most / at least, value), on cuda
        ("count_on_bandwidth", "bandwidth / torch.sum's"): (">=", 0.9),
        ("count_on_bandwidth", "bandwidth / copy read's"): (">=", 0.85),
        ("act_count", "time / activation alone"): ("<=", 1.05),
        ("ride_along_training", "ride-along pooled / plain (q1 median q3)"): ("<=", 1.02),
    }
    lines += ["| bench | impl | device | shapes | ratios | GB/s | ms | TF32 |", "|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        bench_name = row["bench"].split("::")[-1].split("[")[0].removeprefix("test_")
        ratios = []
        for key, value in row.items():
            if "/" not in key or key == "group" or key.endswith(("GB/s", "s/step")):
                continue
            text = f"{value:.3g}" if isinstance(value, float) else str(value)
            target = targets.get((bench_name, key))
            if target and row["impl"] not in ("torch", "reference") and row.get("device") == "cuda" \
                    and (bench_name != "act_count" or row.get("kind") == "relu"):
                median = value if isinstance(value, float) else float(str(value).split()[1])
                ok = median >= target[1] if target[0] == ">=" else median <= target[1]
                text += f" ({'meets' if ok else 'MISSES'} {target[0]} {target[1]})"
            ratios.append(f"{key}: {text}")
        shape = " ".join(str(row[k]) for k in ("shape", "kind") if k in row) or row.get("group", "")
        if "batch" in row:
            shape += f" b{row['batch']}"
        ms = row.get("ms", row.get("plain s/step", 0) * 1e3)
        gbps = f"{row['GB/s']:.4g}" if "GB/s" in row else ""
        others = [f"{k.removesuffix(' GB/s')} {v:.4g}" for k, v in row.items() if k.endswith(" GB/s")]
        gbps += f" ({', '.join(others)})" if others else ""
        lines.append(f"| {bench_name} | {row['impl']} | {row.get('device', '')} | {shape} | {'<br>'.join(ratios)} | "
                     f"{gbps} | {ms:.3g} | {row.get('TF32', 'n/a')} |")
    if not data["rows"]:
        lines.append("| (no figures: nothing was measured) | | | | | | | |")
    lines.append("")
(out / "report.md").write_text("\n".join(lines) + "\n")
PY

write_report() {
  EK_GPU_CHECK_MODE=$MODE "$PYTHON" "$WORK/report.py" "$WORK" "$OUT" || echo "gpu_check: could not write the report" >&2
}

# ---- mode

if [ "$MODE" = auto ]; then
  if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    MODE=cuda
  else
    MODE=cpu
  fi
fi
export EK_GPU_CHECK_MODE=$MODE
echo "gpu_check: $MODE mode, writing $OUT" >&2

# ---- 1. machine header

t0=$(date +%s%N)
if timeout 60 "$PYTHON" "$WORK/machine.py" "$WORK/arch" > "$WORK/machine.md" 2> "$WORK/machine.err"; then
  status=pass; note=""
else
  status=FAIL; note="$(tail -n 1 "$WORK/machine.err")"
fi
cat "$WORK/machine.md" >&2
record_step header "$status" "$(awk -v ns=$(($(date +%s%N) - t0)) 'BEGIN { printf "%.1f", ns / 1e9 }')" "$note"
ARCH=$(cat "$WORK/arch" 2>/dev/null || true)

# ---- 2. build

BUILD_OK=0
imports_in_tree() {
  "$PYTHON" -c 'import easier_kernels._C' >/dev/null 2>&1
}
build_in_place() {  # $1: arch list or empty (CPU kernels only)
  local -a env_vars=("MAX_JOBS=$(nproc)")
  [ -n "$1" ] && env_vars+=("TORCH_CUDA_ARCH_LIST=$1")
  run_step build "$TIMEOUT_BUILD" "$OUT/build.log" env "${env_vars[@]}" "$PYTHON" setup.py build_ext --inplace || return 1
  if timed_out; then
    record_step build TIMEOUT "$STEP_SECONDS" "over ${STEP_LIMIT} s (see build.log)"
  elif [ "$STEP_RC" -ne 0 ]; then
    record_step build FAIL "$STEP_SECONDS" "setup.py exited $STEP_RC: $(grep -m1 -iE 'error' "$OUT/build.log" | cut -c1-200)"
  elif ! imports_in_tree; then
    record_step build FAIL "$STEP_SECONDS" "built, but easier_kernels._C does not import"
  else
    BUILD_OK=1
    return 0
  fi
  return 1
}

if [ "$MODE" = cuda ]; then
  if [ -z "$ARCH" ]; then
    record_step build FAIL 0 "no device capability from the header step"
  elif build_in_place "$ARCH"; then
    has_cuda=$("$PYTHON" -c 'import easier_kernels._C as C; print(bool(C.has_cuda))' 2>/dev/null)
    note="TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$(nproc) python setup.py build_ext --inplace; CUDA kernels: $has_cuda"
    echo "- $note; ${STEP_SECONDS} s" > "$WORK/build.md"
    if [ "$has_cuda" = True ]; then
      record_step build pass "$STEP_SECONDS" "sm_${ARCH/./} in ${STEP_SECONDS} s"
    else
      record_step build FAIL "$STEP_SECONDS" "built without the CUDA kernels (nvcc or CUDA headers missing? see build.log)"
    fi
  fi
else
  if [ "${EK_GPU_CHECK_FORCE_BUILD:-0}" != 1 ] && imports_in_tree; then
    BUILD_OK=1
    echo "no build: easier_kernels._C already imports from the source tree" > "$OUT/build.log"
    echo "- no build: the extension in the source tree imports (cpu mode builds only when it does not)" > "$WORK/build.md"
    record_step build pass 0 "no build needed (in-tree extension imports); CUDA build skipped: no CUDA device"
  elif [ "${EK_GPU_CHECK_FORCE_BUILD:-0}" != 1 ] && installed=$(cd "$WORK" && PYTHONSAFEPATH=1 "$PYTHON" -c \
                   'import easier_kernels._C, easier_kernels, os; print(os.path.dirname(easier_kernels.__file__))' 2>/dev/null) \
       && [ -n "$installed" ] && [ "$(PYTHONSAFEPATH=1 "$PYTHON" -c 'import easier_kernels, os; print(os.path.dirname(easier_kernels.__file__))' 2>/dev/null)" = "$installed" ]; then
    # CI: the package is installed (README command 2) and the clone has no built extension;
    # PYTHONSAFEPATH (Python 3.11+) keeps the source tree off sys.path, so the installed one runs.
    export PYTHONSAFEPATH=1
    BUILD_OK=1
    echo "no build: using the installed package at $installed" > "$OUT/build.log"
    echo "- no build: the source tree has no built extension; the installed package at \`$installed\` is tested" > "$WORK/build.md"
    record_step build pass 0 "no build needed (installed package); CUDA build skipped: no CUDA device"
  elif build_in_place ""; then
    echo "- built the CPU kernels in place (MAX_JOBS=$(nproc) python setup.py build_ext --inplace) in ${STEP_SECONDS} s" > "$WORK/build.md"
    record_step build pass "$STEP_SECONDS" "CPU kernels built in place; CUDA build skipped: no CUDA device"
  fi
fi

# Every later Python imports the package the build step settled on: the source tree (put on
# PYTHONPATH, as `python -m pytest` from the repository root would), or the installed one.
if [ "${PYTHONSAFEPATH:-}" != 1 ]; then
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- 3. backends

if [ "$BUILD_OK" = 1 ]; then
  t0=$(date +%s%N)
  if timeout 60 "$PYTHON" "$WORK/backends.py" > "$WORK/backends.md" 2> "$WORK/backends.err"; then
    status=pass; note=$(grep -m1 '^- available' "$WORK/backends.md" | cut -c3-)
  else
    status=FAIL; note=$(grep -m1 MISSING "$WORK/backends.md" || tail -n 1 "$WORK/backends.err")
  fi
  cat "$WORK/backends.md" >&2
  record_step backends "$status" "$(awk -v ns=$(($(date +%s%N) - t0)) 'BEGIN { printf "%.1f", ns / 1e9 }')" "${note//|//}"
else
  record_step backends "NOT RUN" 0 "the extension does not import"
fi

# ---- 4. tests and 5. benchmarks: pytest -m gpu

# pytest_step NAME LIMIT LOG RESULTS TARGETS... ; records the step from the plugin's results
pytest_step() {
  local name=$1 limit=$2 log=$3 results=$4
  shift 4
  : > "$results"
  run_step "$name" "$limit" "$log" env EK_GPU_CHECK_RESULTS="$results" PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m pytest -p ek_gpu_check_plugin -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -m gpu -v -rfEs \
    --durations=15 "$@" "${EXTRA_ARGS[@]}" || return 0
  local summary
  summary=$("$PYTHON" "$WORK/report.py" --counts "$results")
  local bad=${summary%%$'\t'*} text=${summary#*$'\t'}
  if timed_out; then
    local last
    last=$(grep '^start' "$results" | tail -n 1 | cut -f2)
    record_step "$name" TIMEOUT "$STEP_SECONDS" "over ${STEP_LIMIT} s; $text${last:+; running then: $last}"
  elif [ "$STEP_RC" -eq 5 ]; then
    record_step "$name" FAIL "$STEP_SECONDS" "no test marked gpu was selected (pytest exit 5)"
  elif [ "$STEP_RC" -ne 0 ] || [ "${bad:-1}" != 0 ]; then
    record_step "$name" FAIL "$STEP_SECONDS" "pytest exit $STEP_RC; $text"
  elif [ "$MODE" = cpu ]; then
    record_step "$name" pass "$STEP_SECONDS" "$text (skipped: no CUDA device)"
  else
    record_step "$name" pass "$STEP_SECONDS" "$text"
  fi
}

if [ "$BUILD_OK" = 1 ] && [ -n "$TESTS" ]; then
  read -r -a test_targets <<< "$TESTS"
  pytest_step tests "$TIMEOUT_TESTS" "$OUT/tests.log" "$WORK/tests.results" "${test_targets[@]}"
  echo "Command: \`python -m pytest -m gpu $TESTS -v\` with a per-test limit of ${EK_GPU_CHECK_TEST_TIMEOUT} s$( \
    [ "$MODE" = cpu ] && [ "${EK_GPU_CHECK_RUN_ON_CPU:-0}" != 1 ] && echo '; cpu mode: every gpu-marked test is collected and skipped (no CUDA device)')." > "$WORK/tests.md"
  write_report
elif [ -z "$TESTS" ]; then
  record_step tests skipped 0 "not requested (EK_GPU_CHECK_TESTS is empty)"
else
  record_step tests "NOT RUN" 0 "the extension does not import"
fi

if [ "$BUILD_OK" = 1 ] && [ -n "$BENCHES" ]; then
  read -r -a bench_targets <<< "$BENCHES"
  bench_note="Command: \`EK_BENCH_QUICK=1 python -m pytest -m gpu $BENCHES -v\`."
  if "$PYTHON" -c 'import pytest_benchmark' >/dev/null 2>&1; then
    bench_targets+=(--benchmark-columns=median,iqr,rounds --benchmark-sort=name)
  else
    bench_note+=" NOTE: pytest-benchmark is not installed here: bench/conftest.py's stand-in fixture runs the benchmarks, so pytest-benchmark's own tables are missing, but every figure below is measured (it always comes from bench/conftest.py's own timing)."
    echo "gpu_check: pytest-benchmark is not installed; the figures come from bench/conftest.py's own timing" >&2
  fi
  echo "$bench_note" > "$WORK/bench.md"
  export EK_BENCH_QUICK=1 EK_BENCH_JSON="$OUT/bench.json"
  pytest_step benchmarks "$TIMEOUT_BENCH" "$OUT/bench.log" "$WORK/bench.results" "${bench_targets[@]}"
elif [ -z "$BENCHES" ]; then
  record_step benchmarks skipped 0 "not requested (EK_GPU_CHECK_BENCHES is empty)"
else
  record_step benchmarks "NOT RUN" 0 "the extension does not import"
fi

write_report
echo "gpu_check: report in $OUT/report.md" >&2
if cut -f2 "$STEPS" | grep -qvE '^(pass|skipped)$'; then
  echo "gpu_check: FAIL ($(awk -F'\t' '$2 != "pass" && $2 != "skipped" { printf "%s%s %s", sep, $1, $2; sep = ", " }' "$STEPS"))" >&2
  exit 1
fi
echo "gpu_check: PASS" >&2
exit 0
