#!/usr/bin/env bash
# Builds and tests the package against one torch of the supported range, in a fresh virtual
# environment, as a new user on that torch would. CI covers the oldest (2.13.0, CPU) on every
# change through README command (2); run this for the newest once per release:
#
#   scripts/check_torch_range.sh                 # torch 2.14.1 + torchvision 0.29.1 (a CUDA build)
#   scripts/check_torch_range.sh 2.13.0 0.28.0   # any other pair
#
# Where that torch has CUDA and nvcc is here, the CUDA kernels are built too (for
# TORCH_CUDA_ARCH_LIST, default 9.0) and tests/test_build.py checks their entry points. CUDA_HOME
# is left as the caller has it: finding CUDA's headers is setup.py's job, and part of the check.
# Exits 0 with one "skipped:" line where that torch cannot be installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=${1:-2.14.1}
torchvision_version=${2:-0.29.1}
venv=$(mktemp -d "${TMPDIR:-/tmp}/easier-kernels-torch-$torch_version.XXXXXX")
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
start=$SECONDS
if ! pip install -q "torch==$torch_version" "torchvision==$torchvision_version" > "$venv/install.log" 2>&1; then
  echo "skipped: torch==$torch_version / torchvision==$torchvision_version cannot be installed here ($(tail -n 1 "$venv/install.log"))"
  exit 0
fi
echo "torch $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') installed in $((SECONDS - start)) s"
start=$SECONDS
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation ".[test,onnx]"
echo "easier_kernels built in $((SECONDS - start)) s"
cd "$venv"  # import the installed package, not the source tree
python -c "import easier_kernels as ek; from easier_kernels import _C; print('backends:', ek.ops.available_backends(), '| native entry points:', sorted(n for n in dir(_C) if not n.startswith('_')))"
cd - > /dev/null
pytest -q -p no:cacheprovider tests/test_build.py tests/ops
