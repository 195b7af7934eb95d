"""The payoff of a pruned network: what folding it buys in latency, multiply-adds and parameters,
against the original with batch norms folded, in the runtime the user deploys with.

    before = ek.payoff.counts(model, example)                  # {"macs", "params"} of the BN-folded original
    after = ek.payoff.measure(net, model, example, runtime="eager")
    # {"latency_ratio": 0.71, "latency_ms": 1.2, "baseline_ms": 1.7, "latency_q1": 0.69, "latency_q3": 0.72,
    #  "noisy": False, "noisy_why": "", "macs": ..., "params": ...}

The latency is `ek.fold`'s whole-network check (paired rounds against the original, in the
runtime, on the example's device and batch; `noisy` where the machine was too busy to trust it,
`noisy_why` says how); MACs count the multiply-adds of every conv and linear call on the example;
parameters count the folded module's (what it stores).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .fold import fold, lower_fused
from .capture import call, model_device
from .sites import recipe
from .timing import compare, steady

__all__ = ["measure", "counts", "latency_fields", "against_start", "noise", "generation", "DRIFT"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# How far apart two timings of the same original may be and both be trusted. On a 2-vCPU AMD EPYC,
# idle, ResNet-18 at width 1/8 (batch 1) ran 0.44-0.48 ms in some minutes and 0.74-0.77 ms in others
# (1.7x; the ratio moved by 0.13 with it); under load from other processes, 1.8x to 1000x (0.46 ->
# 480 ms; at width 1, batch 8: 23 -> 41-1700 ms; below 2x the spread was wide: `timing.steady`
# flags those). A reported run had 307.9 ms at the start against 1.121 ms later.
DRIFT = 2.0


def measure(net: nn.Module, original: nn.Module, example_inputs, *, runtime: str = "eager", leaf_modules=None) -> dict:
    """`net` folded for `runtime` and timed against `original` (BN-folded): the latency ratio and
    both latencies in ms, with the folded network's MACs and parameters."""
    folded = fold(net, example_inputs, runtime=runtime, original=original, leaf_modules=leaf_modules)
    return {**latency_fields(recipe(folded)["fold"]["latency"]), **counts(folded, example_inputs)}


def latency_fields(latency: dict | None) -> dict:
    """A fold's whole-network latency record (`ek.recipe(folded)["fold"]["latency"]`) as a payoff's
    latency keys (None where it was not timed)."""
    latency = latency or {}
    return {"latency_ratio": latency.get("ratio"), "latency_ms": latency.get("ms"),
            "baseline_ms": latency.get("baseline_ms"), "latency_q1": latency.get("q1"), "latency_q3": latency.get("q3"),
            "noisy": latency.get("noisy", False), "noisy_why": latency.get("noisy_why", "")}


def against_start(paid: dict, start_ms: float | None) -> dict:
    """`paid` (from `measure`), marked noisy where its timing of the original (`baseline_ms`) and
    `start_ms` (the original's latency when the run started) are more than DRIFT apart: the
    machine's load changed between them, and its paired spread cannot show a load that lasts."""
    ms = paid.get("baseline_ms")
    if not start_ms or not ms or max(ms / start_ms, start_ms / ms) <= DRIFT:
        return paid
    why = (f"the original ran {ms:.3f} ms in this timing but {start_ms:.3f} ms at the start, "
           f"{max(ms / start_ms, start_ms / ms):.1f}x apart: the machine's load changed")
    return {**paid, "noisy": True, "noisy_why": "; ".join(filter(None, [paid.get("noisy_why"), why]))}


def noise(paid: dict) -> dict:
    """How far a payoff's latency can be trusted: latency_q1 and latency_q3 (the ratio's quartiles),
    noisy and noisy_why; None, False and "" where `paid` lacks them (a stand-in, an older record)."""
    return {"latency_q1": paid.get("latency_q1"), "latency_q3": paid.get("latency_q3"), "noisy": paid.get("noisy", False),
            "noisy_why": paid.get("noisy_why", "")}


def counts(model: nn.Module, example_inputs) -> dict:
    """Multiply-adds of one forward on `example_inputs` (convs and linears, fused blocks as their
    two convs) and parameters, of `model` with its batch norms folded (as inference runs it)."""
    folded = fold(model, example_inputs, decide="separate", check=False) if recipe(model).get("fold") is None else model
    module = copy.deepcopy(folded)
    lower_fused(module)
    macs = []

    def hook(layer, args, out):
        per_output = layer.in_features if isinstance(layer, nn.Linear) else \
            layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        macs.append(out.numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, _LAYERS)]
    try:
        with torch.no_grad():
            call(module, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {"macs": int(sum(macs)), "params": int(sum(p.numel() for p in folded.parameters()))}


def generation(pruned: nn.Module, original: nn.Module, prompt: torch.Tensor, new_tokens: int = 32) -> dict:
    """Greedy generation speed with the KV cache (`model.generate`, Hugging Face models) of
    `pruned` against `original` on `prompt` (token ids [batch, length]), in paired rounds:
    tokens/s of each and the speed-up (after / before, with its quartiles). Exactly `new_tokens`
    tokens are generated (no early end-of-text stop), so both do the same work."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, not {new_tokens}")
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": True,
               "pad_token_id": getattr(original.config, "pad_token_id", None) or 0}
    was_training = (pruned.training, original.training)
    pruned.eval()
    original.eval()
    device = model_device(original)
    prompt = prompt.to(device)

    def generating(model):
        def run():
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
        return run

    try:
        timed = steady(lambda k: compare({"before": generating(original), "after": generating(pruned)}, "before", device,
                                         seconds=2.0 * 2 ** k, min_rounds=5), "after", "before")
    finally:
        pruned.train(was_training[0])
        original.train(was_training[1])
    tokens = new_tokens * prompt.shape[0]
    before, after = timed["before"], timed["after"]
    return {"new_tokens": new_tokens, "prompt_tokens": prompt.shape[1], "batch": prompt.shape[0], "runtime": "eager",
            "before_tokens_per_s": round(tokens / before["ms"] * 1e3, 2),
            "after_tokens_per_s": round(tokens / after["ms"] * 1e3, 2),
            # ratio = after's time / before's: the speed-up is its inverse (q3 of the time is q1 of the speed)
            "speedup": round(1 / after["ratio"], 4), "q1": round(1 / after["q3"], 4), "q3": round(1 / after["q1"], 4),
            "noisy": after["noisy"], "noisy_why": after["noisy_why"]}
