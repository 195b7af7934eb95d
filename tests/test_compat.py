"""The torchvision workaround: one call, no side effect of importing easier_kernels."""

from helpers import run_python


PROBE = """
import sys, torch
import easier_kernels
assert "torchvision" not in sys.modules, "import easier_kernels must not import torchvision"
from easier_kernels.compat import import_torchvision
tv = import_torchvision()
assert import_torchvision() is tv
model = tv.models.resnet18(num_classes=10).eval()
print(tuple(model(torch.randn(1, 3, 32, 32)).shape))
"""


def test_import_torchvision_builds_a_model_in_a_fresh_process():
    if run_python("-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)").returncode:
        raise AssertionError("torchvision is not installed: pip install torchvision==0.28.0 (README command 2 does)")
    out = run_python("-c", PROBE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 10)"
