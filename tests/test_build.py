"""The build contract: the extension is there, the package works without it, and setup.py
refuses cleanly where torch cannot be imported (plain `pip install .` with build isolation)."""

from pathlib import Path

from helpers import run_python

import easier_kernels as ek

ROOT = Path(__file__).resolve().parents[1]


def test_the_native_extension_is_built():
    from easier_kernels import _C

    assert "cpp" in ek.ops.available_backends()
    assert hasattr(_C, "count_on_cpu") and hasattr(_C, "act_count_cpu")


def test_the_package_works_without_the_extension():
    code = (
        "import sys; sys.modules['easier_kernels._C'] = None\n"  # makes `from .. import _C` fail
        "import torch, easier_kernels as ek\n"
        "assert ek.ops.available_backends() == ['reference'], ek.ops.available_backends()\n"
        "x = torch.tensor([[1.0, -1.0], [0.0, -2.0]])\n"
        "c = torch.zeros(2, dtype=torch.int64)\n"
        "y = ek.ops.act_count(x, c, 'relu')\n"
        "assert c.tolist() == [2, 0] and y.tolist() == [[1.0, 0.0], [0.0, 0.0]]\n"
        "print('ok')"
    )
    out = run_python("-c", code, drop_env=("TRITON_INTERPRET", "EASIER_KERNELS_BACKEND"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_setup_py_without_torch_stops_with_one_clear_line():
    code = (
        "import sys, runpy; sys.modules['torch'] = None\n"
        "sys.argv = ['setup.py', '--name']\n"
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    out = run_python("-c", code, cwd=ROOT)
    assert out.returncode == 1
    message = out.stderr.strip().splitlines()
    assert len(message) == 1, out.stderr
    assert "install torch first" in message[0] and "--no-build-isolation" in message[0]


def test_build_requirements_never_pull_torch():
    text = (ROOT / "pyproject.toml").read_text()
    build_system = text.split("[build-system]", 1)[1].split("\n[", 1)[0]
    requires = next(line for line in build_system.splitlines() if line.startswith("requires"))
    assert "setuptools" in requires and "torch" not in requires.lower()
