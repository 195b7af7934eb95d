"""Depth pruning by whole blocks: the anchor baseline EASIER is compared against.

ShortGPT (Men et al. 2024) scores each repeated block by its Block Influence,

    BI_i = 1 - E_tokens[cos(x_i, x_{i+1})],

the cosine between the block's input and output hidden state per token, averaged over tokens
(padding excluded), and removes the blocks with the lowest BI first. `metric="angular"` gives
Gromov et al.'s (2024) angular distance of one block instead, E_tokens[arccos(cos) / pi].

    from easier_kernels import depth
    paths = depth.blocks_of(model)                      # ["transformer.h.0", ..., "transformer.h.11"]
    scores = depth.block_influence(model, loader, max_batches=16)   # {path: BI}, in block order
    drop = depth.order_by_influence(scores)[:3]         # the three least influential blocks
    pruned = depth.remove_blocks(model, drop)           # a copy; `model` stays as it was
    pruned.generate(...); pruned.save_pretrained(...)   # Hugging Face models keep working

A batch is whatever `capture.batch_inputs` takes (a dict with input_ids / attention_mask /
labels, an (inputs, targets) tuple, ...); the padding mask is the batch's "attention_mask".
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .capture import batch_inputs, eval_mode, model_device

__all__ = ["blocks_of", "block_influence", "remove_blocks", "order_by_influence", "METRICS"]

METRICS = ("cosine", "angular")
# Attributes through which Hugging Face blocks know their own position (the KV cache slot they
# use, per-layer settings): renumbered when earlier blocks go.
_LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index", "layer_number")
# Names a config may give its layer count (GPT-2 maps num_hidden_layers to n_layer itself).
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# timm keeps its blocks in an nn.Sequential, Hugging Face in an nn.ModuleList.
_BLOCK_LISTS = (nn.ModuleList, nn.Sequential)


# ---- which modules are the blocks


def _block_lists(model: nn.Module) -> dict[str, nn.Module]:
    """Every ModuleList / Sequential of two or more entries of one type, by path."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, _BLOCK_LISTS) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            found[path] = module
    return found


def _inside(path: str, other: str) -> bool:
    return other == "" or path.startswith(other + ".")


def blocks_of(model: nn.Module) -> list[str]:
    """The module paths of the model's repeated blocks: the longest nn.ModuleList (or
    nn.Sequential, as timm's ViT has) whose entries all have one type. Lists nested inside the
    entries of another such list (a MoE layer's experts) do not count, so a model's layers win
    over the experts inside them."""
    lists = _block_lists(model)
    outermost = [p for p in lists if not any(o != p and _inside(p, o) for o in lists)]
    if not outermost:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of identical blocks; pass blocks=[paths]")
    best = max(outermost, key=lambda p: len(lists[p]))  # max keeps the first of equal lengths
    return [_join(best, str(i)) for i in range(len(lists[best]))]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---- Block Influence


def _hidden_in(args: tuple, kwargs: dict, path: str) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"block {path} takes no hidden-state tensor as its first input or as hidden_states=")
    return hidden


def _hidden_out(output, path: str) -> torch.Tensor:
    """A block's output hidden state: the tensor, or the first element of a tuple / ModelOutput."""
    if hasattr(output, "to_tuple"):  # a Hugging Face ModelOutput
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and output:
        output = next(iter(output.values()))
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"block {path} returns {type(output).__name__}, not a hidden-state tensor")
    return output


def _token_scores(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Per token: 1 - cos (cosine) or arccos(cos) / pi (angular), over the last dim. In float64:
    arccos is steep near cos = 1, where the blocks worth removing are."""
    cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
    return 1 - cos if metric == "cosine" else torch.arccos(cos.clamp(-1, 1)) / math.pi


def _token_mask(mask: torch.Tensor | None, hidden: torch.Tensor, path: str) -> torch.Tensor | None:
    """Which tokens count: the batch's attention_mask where it has one, shaped like the hidden
    state's token dims."""
    if mask is None:
        return None
    if mask.shape != hidden.shape[:-1]:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match the tokens {tuple(hidden.shape[:-1])} of "
                         f"block {path}; pass inputs_fn= to leave the mask out (every token then counts)")
    return mask.to(hidden.device) != 0


class _Meter:
    """Per block: float64 sums of the token scores and the count of tokens, over all batches."""

    def __init__(self, paths: list[str], metric: str):
        self.paths, self.metric = paths, metric
        self.sums = {}  # float64 tensors on the model's device: no sync per batch
        self.counts = defaultdict(int)
        self.mask = None  # the current batch's attention_mask

    def hook(self, path: str):
        def record(module, args, kwargs, output):
            x, y = _hidden_in(args, kwargs, path), _hidden_out(output, path)
            if x.shape != y.shape:
                raise ValueError(f"block {path} maps {tuple(x.shape)} to {tuple(y.shape)}; Block Influence needs the "
                                 f"same shape in and out")
            scores = _token_scores(x, y, self.metric)
            keep = _token_mask(self.mask, x, path)
            if keep is not None:
                scores = scores[keep]
            self.sums[path] = self.sums.get(path, 0) + scores.sum()
            self.counts[path] += scores.numel()
        return record

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, counts) in block order, summed over ranks under torch.distributed."""
        device = distributed.collective_device() if distributed.active() else torch.device("cpu")
        sums = torch.tensor([float(self.sums.get(p, 0)) for p in self.paths], dtype=torch.float64, device=device)
        counts = torch.tensor([self.counts[p] for p in self.paths], dtype=torch.float64, device=device)
        return distributed.sum_over_ranks(sums).cpu(), distributed.sum_over_ranks(counts).cpu()


def block_influence(model: nn.Module, loader, *, blocks: list[str] | None = None, metric: str = "cosine",
                    max_batches: int | None = None, inputs_fn=None, device=None) -> dict[str, float]:
    """{block path: score} in block order, the token-weighted mean over `loader` (its first
    `max_batches` batches): 1 - cos(input, output) for metric="cosine" (ShortGPT's BI; 0 for a block
    that changes nothing, 2 for one that negates), arccos(cos)/pi for metric="angular" (0 .. 1).
    Tokens whose batch["attention_mask"] is 0 do not count. Runs in eval mode without gradients; the
    model's train/eval flags are restored. Under torch.distributed every rank gets the same scores."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    paths = list(blocks) if blocks is not None else blocks_of(model)
    modules = {p: _module_at(model, p) for p in paths}
    device = device if device is not None else model_device(model)
    meter = _Meter(paths, metric)
    handles = [m.register_forward_hook(meter.hook(p), with_kwargs=True) for p, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                args, kwargs = batch_inputs(batch, device, inputs_fn)
                meter.mask = kwargs.get("attention_mask")
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    sums, counts = meter.totals()
    never = [p for p, n in zip(paths, counts.tolist()) if n == 0]
    if never:
        raise ValueError(f"no tokens reached block(s) {', '.join(never)}: an empty loader, or blocks the forward never calls")
    return {p: (s / n) for p, s, n in zip(paths, sums.tolist(), counts.tolist())}


def order_by_influence(scores: dict[str, float]) -> list[str]:
    """Block paths, lowest score first (the first to remove); ties keep block order."""
    position = {p: i for i, p in enumerate(scores)}
    return sorted(scores, key=lambda p: (scores[p], position[p]))


# ---- removing blocks


def _module_at(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no module {path!r}") from None


def _locate(model: nn.Module, path: str) -> tuple[str, int]:
    """A block path as (the path of its block list, its index there)."""
    _module_at(model, path)
    parent, _, index = path.rpartition(".")
    owner = _module_at(model, parent) if parent else model
    if not (isinstance(owner, _BLOCK_LISTS) and index.isdigit()):
        raise ValueError(f"{path!r} is not an entry of an nn.ModuleList / nn.Sequential of blocks")
    return parent, int(index)


def _removals(model: nn.Module, paths) -> dict[str, list[int]]:
    """{block list path: sorted indices to remove}, checked: known entries, never a whole list."""
    removals = defaultdict(set)
    for path in paths:
        parent, index = _locate(model, path)
        removals[parent].add(index)
    for parent, indices in removals.items():
        if len(indices) == len(_module_at(model, parent) if parent else model):
            raise ValueError(f"removing every block of {parent or type(model).__name__} would leave none")
    return {parent: sorted(indices) for parent, indices in removals.items()}


def _renumber_layer_indices(block: nn.Module, old: int, new: int) -> None:
    """Shift the position a block's modules hold (0- or 1-based) from `old` to `new`: Hugging
    Face attention uses its layer_idx as its KV cache slot."""
    for module in block.modules():
        for name in _LAYER_INDEX_ATTRS:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in (old, old + 1):
                setattr(module, name, value - (old - new))


def _config_of(model: nn.Module, list_path: str):
    """The Hugging Face config describing the block list: that of the nearest module above it with
    one (GPT2Model, BertEncoder, a vision tower), else the model's own."""
    parts = list_path.split(".")[:-1] if list_path else []
    while True:
        owner = model.get_submodule(".".join(parts)) if parts else model
        if getattr(owner, "config", None) is not None:
            return owner.config
        if not parts:
            return None
        parts.pop()


def _update_config(config, kept: list[int], old_count: int, list_path: str) -> None:
    """The layer count, and the per-layer lists (layer_types, ...), of what is left."""
    if getattr(config, "is_heterogeneous", False):
        raise ValueError(f"{list_path}: configs with per_layer_config cannot be pruned by depth.remove_blocks")
    count_attr = next((a for a in _LAYER_COUNT_ATTRS if getattr(config, a, None) == old_count), None)
    if count_attr is None:
        warnings.warn(f"the config of {list_path} has no layer count equal to {old_count}; left as it is", stacklevel=3)
        return
    setattr(config, count_attr, len(kept))
    # Per-layer lists (layer_types, ...): a model builds its cache and masks from them.
    for name, value in list(config.to_dict().items()):
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == old_count:
            setattr(config, name, type(value)(value[i] for i in kept))
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        warnings.warn("scale_attn_by_inverse_layer_idx: the pruned model keeps each block's scaling, but one rebuilt "
                      "from its saved config scales by the new layer indices", stacklevel=3)


def remove_blocks(model: nn.Module, paths) -> nn.Module:
    """A deep copy of `model` without the blocks at `paths` (entries of nn.ModuleList /
    nn.Sequential block lists, e.g. from `blocks_of`); `model` itself is untouched. For Hugging Face
    models (a `.config`) the remaining blocks' layer indices and the config's layer count and
    per-layer lists follow, so generate() with its KV cache and save_pretrained / from_pretrained
    keep working."""
    removals = _removals(model, list(paths))
    pruned = copy.deepcopy(model)
    hugging_face = getattr(pruned, "config", None) is not None
    for list_path, indices in removals.items():
        blocks = _module_at(pruned, list_path) if list_path else pruned
        old_count = len(blocks)
        kept = [i for i in range(old_count) if i not in indices]
        for index in reversed(indices):
            del blocks[index]  # ModuleList / Sequential renumber their entries themselves
        if hugging_face:
            for new, old in enumerate(kept):
                _renumber_layer_indices(blocks[new], old, new)
            config = _config_of(pruned, list_path)
            if config is not None:
                _update_config(config, kept, old_count, list_path)
    return pruned
