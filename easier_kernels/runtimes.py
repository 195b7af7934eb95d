"""Runtimes a model is deployed with, and how a module runs in each: what plans are timed in.

    run = runner(module, args, "onnxruntime")    # a zero-argument callable: one forward, in that runtime
    export_onnx(module, args, path)              # the ONNX file ONNX Runtime runs

"eager" is PyTorch as written (our fused kernels allowed); "inductor" is `torch.compile`;
"onnxruntime" is an ONNX Runtime session on the module's export (standard operators only).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
import tempfile
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["RUNTIMES", "check_runtime", "standard_only", "runner", "export_onnx", "onnx_session"]

RUNTIMES = ("eager", "inductor", "onnxruntime")


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "onnxruntime":
        _onnxruntime()
    return runtime


def standard_only(runtime: str) -> bool:
    """Must a module for this runtime hold standard torch operators only? Our fused op is opaque
    to inductor (it cannot fuse around it), and ONNX gets it as its two convolutions (ops/onnx.py),
    so only eager gains from it."""
    return runtime != "eager"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("runtime='onnxruntime' needs onnx and onnxruntime: pip install \"easier_kernels[onnx]\"") from None
    return onnxruntime


def export_onnx(module: nn.Module, args: tuple, path, dynamic: bool = False) -> None:
    """module(*args) as an ONNX file (a path or a binary file object). torch's TorchScript-based
    exporter first: one fast, silent export (the plans export many small segments); where it has
    no form for an operator (or is gone from torch), the torch.export-based one. dynamic=True:
    any batch size, and any sequence length for token inputs (`dynamic_axes`; the torch.export-based
    exporter, which keeps sizes symbolic)."""
    target = path if hasattr(path, "write") else str(path)
    names = [f"input_{i}" for i in range(len(args))]
    outputs, axes = _dynamic_axes(module, args) if dynamic else (None, None)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if dynamic:  # (the TorchScript tracer bakes a graph's symbolic sizes in as constants)
                raise NotImplementedError
            torch.onnx.export(module, tuple(args), target, dynamo=False, opset_version=17, input_names=names)
        except Exception:
            if hasattr(target, "seek"):
                target.seek(0)
                target.truncate()
            torch.onnx.export(module, tuple(args), target, dynamo=True, input_names=names, output_names=outputs,
                              dynamic_axes=axes, verbose=False)


def _dynamic_axes(module: nn.Module, args: tuple) -> tuple[list, dict]:
    """(output names, dynamic axes): dim 0 of every input and output is the batch; dim 1 of an
    integer input [batch, sequence] (token ids, masks) is the sequence, and of every output whose
    dim 1 has that length."""
    with torch.no_grad():
        out = [t for t in torch.utils._pytree.tree_leaves(module(*args)) if isinstance(t, torch.Tensor)]
    lengths = {a.shape[1] for a in args if a.dim() == 2 and not a.is_floating_point()}
    axes = {}
    for i, a in enumerate(args):
        axes[f"input_{i}"] = {0: "batch", **({1: "sequence"} if a.dim() == 2 and not a.is_floating_point() else {})}
    for i, t in enumerate(out):
        axes[f"output_{i}"] = {0: "batch", **({1: "sequence"} if t.dim() > 1 and t.shape[1] in lengths else {})}
    return [f"output_{i}" for i in range(len(out))], axes


def onnx_session(model, device: torch.device):
    """An ONNX Runtime session (of a file path or the model's bytes) for `device`, with as many
    threads as torch uses."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: sessions timed in turns (paired rounds) would
    # otherwise steal each other's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("runtime='onnxruntime' on a CUDA device needs onnxruntime-gpu; install it, or plan on the CPU")
        providers = ["CUDAExecutionProvider"]
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)


def runner(module: nn.Module, args: tuple, runtime: str) -> Callable[[], object]:
    """A zero-argument callable running module(*args) in `runtime` (no autograd). Building it
    compiles or exports the module, so build once, call many times."""
    args = tuple(args)
    if runtime == "eager":
        def run():
            with torch.no_grad():
                return module(*args)
        return run
    if runtime == "inductor":
        compiled = torch.compile(module, dynamic=False)

        def run():
            with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1 << 16):
                return compiled(*args)
        return run
    if runtime == "onnxruntime":
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "module.onnx")
            export_onnx(module, args, path)
            session = onnx_session(path, args[0].device)
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
        return lambda: session.run(None, feeds)
    raise ValueError(check_runtime(runtime))
