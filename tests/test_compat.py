"""The torchvision workaround: one call, no side effect of importing easier_kernels, a plain
import on a healthy install, the fix only for the missing-operator error, one line otherwise.

Every case runs in a fresh process (sys.modules and torch.library state are per process), on
this checkout's easier_kernels (PYTHONPATH), with fake torchvision packages placed first on the
path where a case needs a given kind of install."""

import os
import subprocess
import textwrap
from pathlib import Path

import torch

from helpers import run_python

REPO = Path(__file__).resolve().parents[1]


def run_probe(code: str, *paths) -> subprocess.CompletedProcess:
    path = os.pathsep.join(map(str, (*paths, REPO)))
    return run_python("-c", textwrap.dedent(code), env_updates={"PYTHONPATH": path})


PROBE = """
import sys, torch
import easier_kernels
assert "torchvision" not in sys.modules, "import easier_kernels must not import torchvision"
from easier_kernels import compat
from easier_kernels.compat import import_torchvision
tv = import_torchvision()
assert import_torchvision() is tv
assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
model = tv.models.resnet18(num_classes=10).eval()
print(tuple(model(torch.randn(1, 3, 32, 32)).shape), compat._library is not None)
"""

PLAIN_IMPORT = """
try:
    import torchvision
except Exception as exc:
    print("error:", str(exc).splitlines()[0])
else:
    print("ok")
"""


def test_import_torchvision_builds_a_model_in_a_fresh_process():
    if run_python("-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)").returncode:
        raise AssertionError("torchvision is not installed: pip install torchvision==0.28.0 (README command 2 does)")
    plain = run_probe(PLAIN_IMPORT).stdout.strip()
    # a CPU-only torch 2.13.0 with the torchvision 0.28.0 wheel (this project's CPU machines) needs
    # the workaround; a healthy install (CUDA builds) imports as it is and must get nothing defined
    assert plain == "ok" or plain == "error: operator torchvision::nms does not exist", plain
    out = run_probe(PROBE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"(1, 10) {plain != 'ok'}"


def write_package(root: Path, init: str, **modules: str) -> Path:
    package = root / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(init))
    for name, code in modules.items():
        (package / f"{name}.py").write_text(textwrap.dedent(code))
    return root


# torchvision as a healthy install is: it defines its own ops, which fails if they exist already
HEALTHY = """
import torch
_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

@torch.library.register_fake("torchvision::nms")
def _(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)

__version__ = "healthy"
"""


def test_a_healthy_install_is_imported_as_it_is(tmp_path):
    out = run_probe("""
        import sys, torch
        from easier_kernels import compat
        tv = compat.import_torchvision()
        assert tv.__version__ == "healthy", tv.__file__
        assert compat.import_torchvision() is tv
        assert compat._library is None, "defined ops on a healthy install"
        print(torch.ops.torchvision.nms.default._schema)
    """, write_package(tmp_path, HEALTHY))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torchvision::nms(Tensor dets"), out.stdout


# the broken wheel, in small: a submodule imported first, then a fake registration for an op
# that its compiled extension would have defined
BROKEN = """
import torch
from . import extension
for op in ("nms", "qnms"):
    torch.library.register_fake(f"torchvision::{op}")(lambda dets, scores, iou: dets.new_empty(0, dtype=torch.long))
__version__ = "broken"
"""
EXTENSION = """
import builtins
builtins.extension_imports = getattr(builtins, "extension_imports", 0) + 1
"""


def test_the_missing_operator_error_is_worked_around_from_a_clean_start(tmp_path):
    out = run_probe("""
        import builtins, sys, torch
        from easier_kernels import compat
        tv = compat.import_torchvision()
        assert tv.__version__ == "broken" and compat.import_torchvision() is tv
        assert compat._library is not None
        # the half-imported submodule was dropped and imported again with the package
        assert builtins.extension_imports == 2 and sys.modules["torchvision.extension"] is tv.extension
        print(torch.ops.torchvision.nms.default._schema, torch.ops.torchvision.qnms.default._schema, sep="\\n")
    """, write_package(tmp_path, BROKEN, extension=EXTENSION))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["torchvision::nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                                       "torchvision::qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"]


ONE_LINE = """
    import torch
    from easier_kernels import compat
    try:
        compat.import_torchvision()
    except ImportError as exc:
        print(repr(str(exc)))
        print(compat._library is None, hasattr(torch.ops.torchvision, "nms"))
"""


def test_another_import_error_is_one_line_and_defines_nothing(tmp_path):
    out = run_probe(ONE_LINE, write_package(tmp_path, "import a_dependency_that_is_not_installed\n"))
    assert out.returncode == 0, out.stderr
    message, state = out.stdout.strip().splitlines()
    assert message == repr(
        "torchvision is not importable (No module named 'a_dependency_that_is_not_installed'); install the build "
        f"paired with torch {torch.__version__} (for torch 2.13.0: pip install torchvision==0.28.0)")
    assert state == "True False"


def test_a_missing_operator_it_cannot_define_is_one_line(tmp_path):
    init = 'import torch\ntorch.library.register_fake("torchvision::roi_align")(lambda *a: None)\n'
    out = run_probe(ONE_LINE, write_package(tmp_path, init))
    assert out.returncode == 0, out.stderr
    message, state = out.stdout.strip().splitlines()
    assert "torchvision is not importable (operator torchvision::roi_align does not exist)" in message
    assert "\\n" not in message and state == "True False"


def test_other_errors_pass_through(tmp_path):
    out = run_probe(ONE_LINE, write_package(tmp_path, "raise RuntimeError('something else went wrong')\n"))
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1] == "RuntimeError: something else went wrong"

