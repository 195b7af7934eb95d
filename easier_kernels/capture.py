"""Capture: a model's forward as a torch.fx GraphModule over its own submodules, and the helpers
every stage uses to call a model (its device, its inputs, a batch's inputs and targets, the loss).

    gm = capture(model, example_inputs)          # torch.fx, else torch.export (non-strict)

torch.fx symbolic tracing comes first: its graphs call the model's modules by path (node names
are module paths, stable across steps) and run in train and eval mode exactly as the model does.
Where fx cannot follow the model's Python (control flow on shapes or values, as in Hugging Face
transformers and a few timm models), torch.export (non-strict) captures it from an example, in
eval mode, with every tensor dim dynamic where the model allows it. Its ATen graph is then given
back the module calls the later stages work on: each call of an exact nn.ConvNd / nn.Linear /
batch norm / dropout / activation module (and of the user's leaf modules) becomes one call_module
node named after its path, and ATen activation ops become torch.nn.functional calls. So dropout
and batch norm follow the module's train/eval mode; everything else the export recorded is
captured in eval mode (functional dropout, for one, does nothing when fine-tuning).

Inputs everywhere: a tensor, a tuple of positional inputs, a dict of keyword inputs (a
BatchEncoding is one), or `((args...), {kwargs})`.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import activations as acts

__all__ = ["capture", "is_hf_conv1d", "tied_filled", "TraceFailure", "as_call", "call", "positional", "example_spec", "example_from_spec", "to_device",
           "model_device", "eval_mode", "buffers_kept", "rng_kept", "batch_size", "few_samples", "on_few_samples", "batch_inputs", "batch_targets",
           "logits_of", "default_loss", "record_shapes", "shapes_recorded", "CAPTURE_KEY"]

CAPTURE_KEY = "ek_capture"  # gm.meta: how the graph was captured and the declared activations
SHAPES_KEY = "ek_shapes_of"  # gm.meta: the inputs (`example_spec`) node.meta["ek_shape"] were recorded on


# ---- inputs


def as_call(example_inputs) -> tuple[tuple, dict]:
    """A model's inputs as (args, kwargs): a tensor, a tuple/list of positional inputs, a mapping
    of keyword inputs (dict, BatchEncoding), or ((args...), {kwargs})."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], Mapping)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example inputs must be a tensor, a tuple of positional inputs, a dict of keyword inputs or "
                    f"((args...), {{kwargs}}), got {type(example_inputs).__name__}")


def call(model: nn.Module, inputs):
    """model(*args, **kwargs) for inputs in any form `as_call` takes."""
    args, kwargs = as_call(inputs)
    return model(*args, **kwargs)


def positional(gm: nn.Module, inputs) -> tuple:
    """The inputs as a positional tuple in the order of `gm.forward`'s parameters (for the stages
    that time or replay a captured graph with a plain tuple)."""
    args, kwargs = as_call(inputs)
    if not kwargs:
        return args
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    if bound.kwargs:
        raise TypeError(f"inputs {', '.join(bound.kwargs)} cannot be passed by position to {type(gm).__name__}")
    return tuple(bound.args)


def batch_size(inputs) -> int:
    """The batch of `inputs` (nested tuples, lists, dicts): dim 0 of their first tensor with
    dimensions; 0 where none has any."""
    return next((t.shape[0] for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim()), 0)


def few_samples(inputs, samples: int = 2) -> tuple[tuple, dict]:
    """`inputs` as (args, kwargs) cut to their first `samples` samples (repeated cyclically where
    there are fewer). The batch size is `batch_size(inputs)`; every tensor with that leading dim
    is cut alike, others stay whole. Two samples by default, not one: a batch norm in train mode
    needs two, and torch.export specializes dims of size 1."""
    args, kwargs = as_call(inputs)
    batch = batch_size((args, kwargs))
    if batch in (0, samples):
        return args, kwargs

    def cut(t):
        if not (isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch):
            return t
        return t[:samples] if batch > samples else torch.cat([t] * -(-samples // batch))[:samples]
    return torch.utils._pytree.tree_map(cut, (args, kwargs))


def on_few_samples(run: Callable, inputs):
    """run(few_samples(inputs)), or run(inputs as given) where that fails: what only needs the
    model's structure (capturing, its check, shape recording) costs two samples whatever batch the
    user passed, and an input whose leading dim is not a batch (an unbatched conv1d's [C, L])
    still works. run takes (args, kwargs)."""
    try:
        return run(few_samples(inputs))
    except Exception:
        return run(as_call(inputs))


def example_spec(inputs) -> dict:
    """JSON-ready shapes and dtypes of the tensors of `inputs` (what `example_from_spec` rebuilds)."""
    args, kwargs = as_call(inputs)

    def spec(t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example inputs must be tensors to be recorded, not {type(t).__name__}")
        return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    return {"args": [spec(a) for a in args], "kwargs": {k: spec(v) for k, v in kwargs.items()}}


def example_from_spec(spec: dict) -> tuple[tuple, dict]:
    """Inputs of the recorded shapes and dtypes: zeros for floats, ones for integers (a valid token
    id and an all-ones attention mask)."""
    def tensor(s):
        dtype = getattr(torch, s["dtype"])
        fill = 0 if dtype.is_floating_point else 1
        return torch.full(s["shape"], fill, dtype=dtype)
    return tuple(tensor(a) for a in spec["args"]), {k: tensor(v) for k, v in spec["kwargs"].items()}


def to_device(value, device, non_blocking: bool = False):
    """Tensors in `value` (nested tuples, lists, dicts) moved to `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, non_blocking) for v in value) if type(value) in (tuple, list) \
            else [to_device(v, device, non_blocking) for v in value]
    return value


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (else buffers) live; CPU for a model without either."""
    tensor = next(iter([*model.parameters(), *model.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


_LABEL_KEYS = ("labels", "label", "targets", "target")


def batch_inputs(batch, device=None, inputs_fn=None) -> tuple[tuple, dict]:
    """A loader batch -> the model's (args, kwargs), on `device`.

    inputs_fn(batch) -> (args, kwargs) (or anything `as_call` takes) decides when given. By
    default: a tensor is the input; an (inputs, targets, ...) tuple gives its first element (a
    tensor, a tuple of them or a dict of keyword inputs); a dict (or BatchEncoding) is the
    keyword inputs without its labels ("labels", "label", "targets", "target").
    """
    if inputs_fn is not None:
        args, kwargs = as_call(inputs_fn(batch))
    elif isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, Mapping):
        args, kwargs = (), {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    elif isinstance(batch, (tuple, list)) and batch:
        args, kwargs = as_call(batch[0])
    else:
        raise TypeError(f"a batch must be a tensor, an (inputs, targets) tuple or a dict of model inputs, got "
                        f"{type(batch).__name__}; or pass inputs_fn=lambda batch: (args, kwargs)")
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in torch.utils._pytree.tree_leaves((args, kwargs))):
        raise TypeError("batch inputs are uint8 (raw image bytes?); make the loader yield float tensors "
                        "(e.g. images.float() / 255); token ids are int64")
    if device is not None:
        args, kwargs = to_device(args, device, True), to_device(kwargs, device, True)
    return args, kwargs


def batch_targets(batch, device=None):
    """A batch's targets: the second element of a tuple, a dict's labels; None when it has none."""
    if isinstance(batch, Mapping):
        targets = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        targets = batch[1]
    else:
        targets = None
    if targets is not None and device is not None:
        targets = to_device(targets, device, True)
    return targets


def logits_of(output) -> torch.Tensor:
    """The prediction tensor of a model's output: itself, its `.logits`, or its first element (a
    dict's or ModelOutput's first tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, Mapping):  # (a bare encoder's ModelOutput: its first tensor, the hidden states)
        found = output.get("logits", next((v for v in output.values() if isinstance(v, torch.Tensor)), None))
    if found is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        found = output[0]
    if not isinstance(found, torch.Tensor):
        raise TypeError(f"cannot find the predictions in a model output of type {type(output).__name__} (no tensor, "
                        ".logits or first element); pass loss_fn=... (and evaluate=...) that read it")
    return found


def default_loss(output, batch) -> torch.Tensor:
    """The output's own `.loss` when it has one, else cross-entropy of its logits against the
    batch's targets (per token when the logits have more dims than the targets' classes)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    targets = batch_targets(batch)
    if targets is None:
        raise ValueError("the batch has no targets (no second element, no 'labels') and the output no .loss; "
                         "pass loss_fn=lambda output, batch: ...")
    logits = logits_of(output)
    targets = targets.to(logits.device)
    if logits.dim() > 2:  # [N, ..., classes] against [N, ...]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(logits, targets)


@contextmanager
def eval_mode(model: nn.Module):
    """Every module in eval mode inside the block; each module's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def rng_kept():
    """Every random stream (CPU, and each CUDA device once CUDA is in use) as it was after the
    block: capturing and checking a model must not move the caller's random numbers (stochastic
    depth, dropout draw from them)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        yield


@contextmanager
def buffers_kept(model: nn.Module):
    """Buffers (batch-norm running statistics, ...) exactly as they were after the block."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


# ---- capture


class TraceFailure(RuntimeError):
    """Neither torch.fx nor torch.export could capture the model; the message names the fix."""


def capture(model: nn.Module, example_inputs=None, *, leaf_modules: Iterable | None = None,
            activations: Mapping | None = None) -> fx.GraphModule:
    """A GraphModule over `model`'s own submodules (parameters and buffers shared, not copied).

    A GraphModule is not captured again: its graph is copied, so its node names stay.
    leaf_modules: module paths or types whose calls stay single nodes (their activation modules
    are then one site each). activations: the user's activation modules, {class: kind}
    (`activations.declared`). example_inputs are needed only where torch.fx fails.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph), model.__class__.__name__)
        gm.meta.update(copy.deepcopy(model.meta))
        gm.meta.pop(SHAPES_KEY, None)  # (the graph may have been edited since: shapes are recorded again)
        _copy_specs(model, gm)
        gm.training = model.training
        return gm
    table = acts.declared(activations)
    leaves = _Leaves(leaf_modules, table)
    with rng_kept():  # (tracing runs the model's Python, checks run the model)
        gm, fx_failure = _fx(model, leaves, example_inputs)
        if gm is None:
            if example_inputs is None:
                raise TraceFailure(f"{fx_failure}; or pass example inputs so that torch.export can capture it")
            gm = _export(model, example_inputs, leaves, fx_failure)
    gm.meta[CAPTURE_KEY] = {"by": "fx" if fx_failure is None else "export", "activations": table}
    gm.training = model.training  # the flag only: submodules keep their own modes
    return gm


def _fx(model: nn.Module, leaves: _Leaves, example_inputs) -> tuple[fx.GraphModule | None, str | None]:
    """(the torch.fx capture, None), or (None, why not): tracing failed, or the graph does not
    compute what the model computes on the example (a forward that caches values between calls
    records stale ones)."""
    tracer = _Tracer(leaves)
    kept = _python_state(model)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        return None, _fx_failure_message(model, tracer.failed_in, exc)
    finally:
        _restore_python_state(kept)  # tracing may leave proxies in the model's caches
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    if example_inputs is not None and (why := _differs(model, gm, example_inputs)):
        return None, f"the torch.fx graph of {type(model).__name__} does not compute what it does ({why})"
    return gm, None


@contextmanager
def _untouched(model: nn.Module):
    """No gradients; the model's buffers, Python caches and every random stream as before after the block."""
    kept = _python_state(model)
    try:
        with torch.no_grad(), buffers_kept(model), rng_kept():
            yield
    finally:
        _restore_python_state(kept)


def _model_outputs(model: nn.Module, example_inputs) -> tuple[object, tuple[tuple, dict]]:
    """(the model's outputs, the inputs it ran on): two samples of the example where the model
    runs on them (`on_few_samples`), in its own mode, with random seed 0. A model that fails on
    its own example is a TypeError."""
    def run(example):
        torch.manual_seed(0)
        return call(model, example), example

    try:
        return on_few_samples(run, example_inputs)
    except Exception as exc:
        raise TypeError(f"{type(model).__name__} fails on the example inputs ({_first_line(exc)}); pass inputs it runs "
                        "on (a batch as the loader yields it: float images, int64 token ids)") from exc


def _python_state(model: nn.Module) -> list:
    """The containers in the modules' own attributes (caches such as timm's attention-bias cache)."""
    return [(m, k, copy.copy(v)) for m in model.modules() for k, v in vars(m).items()
            if not k.startswith("_") and isinstance(v, (dict, list, set))]


def _restore_python_state(kept: list) -> None:
    for module, key, value in kept:
        setattr(module, key, value)


def _differs(model: nn.Module, gm: fx.GraphModule, example_inputs) -> str | None:
    """Why `gm` is not `model` on (two samples of) the example, in the mode the model is in (the
    same random numbers for both; buffers, caches and random streams as before after), or None.
    The graph's run records its node shapes (`record_shapes`): one run serves both."""
    with _untouched(model):
        expected, example = _model_outputs(model, example_inputs)
        torch.manual_seed(0)
        try:
            got = _recorded_run(gm, example)
        except Exception as exc:
            return f"it fails with {_first_line(exc)}"
    expected, got = torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
    pairs = [(e, g) for e, g in zip(expected, got) if isinstance(e, torch.Tensor)]
    if len(expected) != len(got) or any(not isinstance(g, torch.Tensor) or g.shape != e.shape for e, g in pairs):
        return "other outputs"
    for e, g in pairs:
        finite = e[torch.isfinite(e)] if e.is_floating_point() else e
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        if e.is_floating_point() and not torch.allclose(g, e, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
            return "other values"
    return None


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        n.meta["ek_shape"] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def _recorded_run(gm: fx.GraphModule, inputs):
    """gm's outputs on `inputs`, every node's output shape kept in `node.meta["ek_shape"]` (None
    for non-tensors; copies of the graph keep it) and the inputs they came from in the graph's
    meta (`shapes_recorded`). A graph whose inputs cannot all be passed by position just runs."""
    try:
        args = positional(gm, inputs)
    except TypeError:
        return call(gm, inputs)
    out = _ShapeRecorder(gm).run(*args)
    gm.meta[SHAPES_KEY] = example_spec(args)
    return out


def record_shapes(gm: fx.GraphModule, args: tuple):
    """Runs `gm` on positional `args` once (eval mode, no gradients, random streams as before
    after), keeping every node's output shape in `node.meta["ek_shape"]`. Returns the outputs."""
    with torch.no_grad(), eval_mode(gm), rng_kept():
        return _recorded_run(gm, args)


def shapes_recorded(gm: fx.GraphModule, args: tuple) -> bool:
    """Whether every node of `gm` holds its shape on inputs of the shapes of positional `args`
    (recorded by `record_shapes` or by the capture check, on this very graph)."""
    return (gm.meta.get(SHAPES_KEY) == example_spec(args)
            and all("ek_shape" in n.meta for n in gm.graph.nodes if n.op != "output"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class _Leaves:
    """Which modules stay single calls: activation modules (torch's, known, declared) and the
    user's leaf modules (paths or types)."""

    def __init__(self, leaf_modules, table: dict):
        leaf_modules = list(leaf_modules or ())
        self.names = {m for m in leaf_modules if isinstance(m, str)}
        self.types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.table = table

    def activation(self, module: nn.Module) -> bool:
        return acts.module_kind(module, self.table) is not None

    def user(self, module: nn.Module, path: str) -> bool:
        return path in self.names or isinstance(module, self.types)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with activation modules and user-named modules as leaves, remembering
    which module was being traced when tracing failed."""

    def __init__(self, leaves: _Leaves | None = None):  # (None: torch re-creates the tracer when unpickling)
        super().__init__()
        self.leaves = leaves or _Leaves(None, {})
        self.failed_in: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.leaves.activation(m) or self.leaves.user(m, qualname) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module: the first handler to see it
                self.failed_in = (self.path_of_module(m), m)
            raise


def _fx_failure_message(model, failed_in, exc) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if failed_in is None or failed_in[0] == "":
        return (f"torch.fx cannot trace the forward of {type(model).__name__} itself ({reason}); move the "
                "untraceable part into a submodule and pass it as leaf_modules=['its.path']")
    path, module = failed_in
    return (f"torch.fx cannot trace module '{path}' ({type(module).__name__}): {reason}; mark it a leaf with "
            f"leaf_modules=['{path}'] (or leaf_modules=[{type(module).__name__}]); its activation modules are "
            "then scored as module sites")


# ---- the torch.export path

_KEPT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def _export(model: nn.Module, example_inputs, leaves: _Leaves, fx_failure: str) -> fx.GraphModule:
    with eval_mode(model), _no_cache(model), _untouched(model):
        _, (args, kwargs) = _model_outputs(model, example_inputs)
    try:
        with torch.no_grad(), eval_mode(model), _no_cache(model):
            program = torch.export.export(model, args, kwargs, strict=False,
                                          dynamic_shapes=_dynamic_shapes(model, args, kwargs))
    except Exception as exc:
        raise TraceFailure(f"{fx_failure}; torch.export failed too ({_first_line(exc)})") from exc
    exported = program.module()
    graph = copy.deepcopy(exported.graph)
    for node in list(graph.nodes):
        if node.op == "call_module":  # export's input guards (_guards_fn): checked by the model itself
            graph.erase_node(node)
    gm = fx.GraphModule(_attributes(graph, model, exported), graph, model.__class__.__name__)
    _copy_specs(exported, gm)
    _restore_module_calls(gm, model, leaves)
    _functional_activations(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    with eval_mode(model), _no_cache(model):  # as it was captured
        why = _differs(model, gm, (args, kwargs))
    if why:
        raise TraceFailure(f"{fx_failure}; the torch.export graph does not compute what the model does either ({why}); "
                           "please report this model")
    return gm


def _attributes(graph: fx.Graph, model: nn.Module, exported: nn.Module) -> dict:
    """What the graph's get_attr nodes read: the model's own parameters and buffers (shared), and
    the constants export lifted out of the forward (tensors made there)."""
    def lookup(target):
        try:
            return _getattr_path(model, target)
        except AttributeError:
            return _getattr_path(exported, target)
    return {n.target: lookup(n.target) for n in graph.nodes if n.op == "get_attr"}


def _getattr_path(module: nn.Module, target: str):
    value = module
    for name in target.split("."):
        value = getattr(value, name)
    return value


def _copy_specs(source: nn.Module, target: nn.Module) -> None:
    """An exported graph's code flattens inputs and rebuilds outputs with these specs."""
    for name in ("_in_spec", "_out_spec"):
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))


def _dynamic_shapes(model, args, kwargs):
    """The batch dim of every tensor input dynamic, and the sequence dim of integer ones (token
    ids, masks), where the model allows (export decides). Other dims (an image's size) stay as
    in the example: dynamic image sizes make export many times slower."""
    def spec(value):
        if isinstance(value, torch.Tensor):
            dims = range(min(value.dim(), 1 if value.is_floating_point() else 2))
            return {d: torch.export.Dim.AUTO for d in dims} or None
        if isinstance(value, Mapping):
            return {k: spec(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value) if type(value) in (tuple, list) else [spec(v) for v in value]
        return None
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


@contextmanager
def _no_cache(model: nn.Module):
    """Hugging Face models return a key/value cache (not a tensor) unless told not to: captured
    without it, as training and scoring use none."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is None:
        yield
        return
    saved = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = saved


def is_hf_conv1d(module) -> bool:
    """Whether `module` is exactly transformers' `Conv1D` (GPT-2's linear layers: y = x W + b with
    W stored [in, out]), recognised by its class without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def tied_filled(module: nn.Module, state: Mapping) -> dict:
    """`state` with every alias of a tied weight filled in: a captured network registers a weight
    two modules share (a language model's embedding and head) under the name torch.export gave
    it, which may be either, so a network saved under one name loads into one rebuilt under both."""
    filled = dict(state)
    names: dict = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    for group in names.values():
        present = next((n for n in group if n in filled), None)
        for name in group if present is not None else ():
            filled.setdefault(name, filled[present])
    return filled


def _kept(module: nn.Module, path: str, leaves: _Leaves) -> bool:
    return (type(module) in _KEPT_TYPES or is_hf_conv1d(module) or leaves.activation(module)
            or leaves.user(module, path))


def _restore_module_calls(gm: fx.GraphModule, model: nn.Module, leaves: _Leaves) -> None:
    """Each call of a kept module (the outermost one, per node) -> one call_module node, where the
    call's ops read one tensor from outside and one of them is read outside."""
    modules = dict(model.named_modules())
    calls: dict = {}
    for node in gm.graph.nodes:
        for key, (path, _) in node.meta.get("nn_module_stack", {}).items():
            if path in modules and _kept(modules[path], path, leaves):
                calls.setdefault(key, (path, []))[1].append(node)
                break
    for path, nodes in calls.values():
        _collapse(gm, path, modules[path], nodes)


def _collapse(gm: fx.GraphModule, path: str, module: nn.Module, nodes: list) -> None:
    inside = set(nodes)
    # (sizes read from outside, e.g. a reshape back to [N, T, C], are not inputs: the module computes them again)
    inputs = {a for n in nodes for a in n.all_input_nodes
              if a not in inside and a.op != "get_attr" and not _is_size(a)}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return  # not a plain x -> module(x) call: its ops stay
    (x,), (out,) = inputs, outputs
    gm.add_submodule(path, module)  # the graph held only a container of its parameters there
    with gm.graph.inserting_after(out):
        node = gm.graph.call_module(path, (x,))
    node.meta.update({k: v for k, v in out.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
    out.replace_all_uses_with(node)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    node._rename(path.replace(".", "_"))


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (int, torch.SymInt))


_aten = torch.ops.aten
# ATen activation op -> (torch.nn.functional call, its arguments from the op's) or None when not that activation
_ATEN_ACTIVATIONS = {
    _aten.relu.default: lambda x: (F.relu, (x,), {}),
    _aten.relu_.default: lambda x: (torch.relu_, (x,), {}),
    _aten.gelu.default: lambda x, approximate="none": (F.gelu, (x,), {"approximate": approximate}),
    _aten.silu.default: lambda x: (F.silu, (x,), {}),
    _aten.silu_.default: lambda x: (F.silu, (x,), {"inplace": True}),
    _aten.hardswish.default: lambda x: (F.hardswish, (x,), {}),
    _aten.hardswish_.default: lambda x: (F.hardswish, (x,), {"inplace": True}),
    _aten.leaky_relu.default: lambda x, negative_slope=0.01: (F.leaky_relu, (x, negative_slope), {}),
    _aten.elu.default: lambda x, alpha=1.0, scale=1, input_scale=1: (
        (F.elu, (x, alpha), {}) if scale == 1 and input_scale == 1 else None),
    _aten.hardtanh.default: lambda x, min_val=-1.0, max_val=1.0: (
        (F.relu6, (x,), {}) if (min_val, max_val) == (0.0, 6.0) else None),
    _aten.hardtanh_.default: lambda x, min_val=-1.0, max_val=1.0: (
        (F.relu6, (x,), {"inplace": True}) if (min_val, max_val) == (0.0, 6.0) else None),
}


def _functional_activations(gm: fx.GraphModule) -> None:
    """ATen activation ops -> their torch.nn.functional calls (what `sites` recognizes), named
    after the module that calls them."""
    for node in list(gm.graph.nodes):
        rewrite = _ATEN_ACTIVATIONS.get(node.target) if node.op == "call_function" else None
        call_spec = rewrite(*node.args, **node.kwargs) if rewrite else None
        if call_spec is None:
            continue
        node.target, node.args, node.kwargs = call_spec
        stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values() if path]
        node._rename(f"{stack[-1].replace('.', '_')}_{node.target.__name__}" if stack else node.target.__name__)
