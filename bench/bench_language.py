"""What EASIER buys a transformer where it runs: a GPT-2-style causal LM and a BERT-style encoder
with some of their MLP activations linearized, folded (each MLP `fc1 -> fc2` one d x d linear)
and written back into the Hugging Face model (`ek.write_back`), against the unpruned model.

Per case, side by side in turns: the forward of the model as a user runs it (eager Hugging Face
module) against the written-back model at [batch, sequence] (folded / original), in eager
PyTorch, torch.compile (inductor) and ONNX Runtime (the folded graph exported, against the
original's export); for the GPT-2, greedy generation with the KV cache (`ek.payoff.generation`,
tokens/s after / before). Weights are random (seeded): latency does not depend on their values.
With --benchmark-disable (CI) one small case checks the outputs only.
"""

from __future__ import annotations

import pytest
import torch

import easier_kernels as ek
from easier_kernels import runtimes
from easier_kernels.compat import import_torchvision
from easier_kernels.timing import compare

import_torchvision()
transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")

# name -> (config class, its keyword arguments, full and small)
MODELS = {
    "gpt2-6x256": ("GPT2LMHeadModel", "GPT2Config", dict(n_layer=6, n_embd=256, n_head=4, vocab_size=4096,
                                                         n_positions=256)),
    "bert-4x256": ("BertModel", "BertConfig", dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                                   intermediate_size=1024, vocab_size=4096)),
}
SHAPES = ((1, 128), (8, 128))
LINEARIZED = ("half", "all")
CASES = [(m, s, k, r) for m in MODELS for s in SHAPES for k in LINEARIZED for r in runtimes.RUNTIMES]
SMALL = [("gpt2-6x256", (1, 16), "half", "eager")]


def pytest_generate_tests(metafunc):
    if "runtime" in metafunc.fixturenames:
        cases = SMALL if metafunc.config.getoption("benchmark_disable") else CASES
        metafunc.parametrize("name,shape,linearized,runtime", cases,
                             ids=[f"{m}-b{s[0]}x{s[1]}-{k}-{r}" for m, s, k, r in cases])


def build(name: str, small: bool):
    model_class, config_class, config = MODELS[name]
    if small:
        config = {**config, **({"n_layer": 2, "n_embd": 32, "n_head": 2} if "n_layer" in config else
                               {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                                "intermediate_size": 128})}
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()


def test_language_latency(benchmark, record, name, shape, linearized, runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")
    small = not benchmark.enabled
    model = build(name, small)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    sites = [s.name for s in ek.find_sites(model, (ids,))]
    chosen = sites[: len(sites) // 2] if linearized == "half" else sites
    net = ek.linearize(model, chosen, (ids,), runtime=runtime)
    folded = ek.fold(net, (ids,), runtime=runtime, original=model, portable=runtime != "eager")
    written = ek.write_back(folded, model)
    benchmark.group, benchmark.name = f"language {runtime}", f"{name}-b{shape[0]}x{shape[1]}-{linearized}"
    with torch.no_grad():
        benchmark.pedantic(written, args=(ids,), rounds=3, warmup_rounds=1)
        got, expected = written(ids), net(ids)
    got = got.logits if hasattr(got, "logits") else got.last_hidden_state
    expected = expected.logits if hasattr(expected, "logits") else expected.last_hidden_state
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4
    if small:
        return
    # the user's model against ours, in the runtime (ONNX Runtime and inductor run the captured graphs)
    original, pruned = (model, written) if runtime == "eager" else (ek.fold(model, (ids,), runtime=runtime), folded)
    calls = {"original": runtimes.runner(original, (ids,), runtime), "pruned": runtimes.runner(pruned, (ids,), runtime)}
    rows = compare(calls, "original", ids.device, seconds=8.0, max_rounds=40)
    row = {"model": name, "input": f"{shape[0]}x{shape[1]}", "linearized": f"{linearized} ({len(chosen)})",
           "runtime": runtime, "original ms": rows["original"]["ms"], "pruned ms": rows["pruned"]["ms"],
           "pruned / original": rows["pruned"]["ratio"],
           "q1-q3": f"{rows['pruned']['q1']:.2f}-{rows['pruned']['q3']:.2f}"}
    if runtime == "eager" and hasattr(model, "generate") and shape[0] == 1:
        generation = ek.payoff.generation(written, model, ids[:, :16], 32)
        row.update({"tokens/s before": generation["before_tokens_per_s"], "tokens/s after": generation["after_tokens_per_s"],
                    "generation speed-up": generation["speedup"]})
    record(row)
