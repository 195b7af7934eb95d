"""`easier-kernels prune` on text, end to end on the shipped samples: a GPT-2-style causal LM on
Shakespeare (perplexity, the pruned Hugging Face model saved and generating, its generation speed)
and a BERT-style classifier on SST-2; `fold` and `export` of a text run; the flags' errors."""

from __future__ import annotations

import json

import pytest
import torch

import easier_kernels as ek
from easier_kernels import cli, text
from easier_kernels.compat import import_torchvision
from easier_kernels.fold.graph import relative_error
from easier_kernels.prune import read_record

import_torchvision()
transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install --no-build-isolation '.[hf]'")

TINY_GPT2 = "hf-gpt2:n_layer=2,n_embd=32,n_head=2"
TINY_BERT = "hf-bert:num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=128"
LM = ["prune", "--model", TINY_GPT2, "--dataset", f"text:{text.TINY_TEXT}", "--seq-len", "32", "--epochs", "1",
      "--batch-size", "16", "--train-size", "64", "--quiet", "--gen-tokens", "4"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    assert cli.main([*LM, "--tokenizer", "bpe:300", "--max-steps", "2", "--max-increase", "10", "--out", str(out)]) == 0
    return out


def test_a_causal_lm_run_reports_perplexity_and_its_generation_speed(lm_run):
    report = json.loads((lm_run / "report.json").read_text())
    assert report["settings"]["task"] == "causal_lm" and report["settings"]["optimizer"] == "adamw"
    assert report["baseline_accuracy"] > 1  # a perplexity
    assert len(report["steps"]) == 2 and all(s["accepted"] for s in report["steps"])
    assert report["generation"]["new_tokens"] == 4 and report["generation"]["speedup"] > 0
    assert "perplexity" in (lm_run / "report.md").read_text()
    assert (lm_run / "tokenizer.json").is_file()  # the BPE trained on the training text, for a rebuild


def test_a_causal_lm_run_saves_a_hugging_face_model_that_generates(lm_run):
    model = ek.load(lm_run / "hf_model")  # (ek.models.load_pretrained)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert all(type(block.mlp.act) is torch.nn.Identity for block in model.transformer.h)  # both removed
    assert type(model.transformer.h[0].mlp.c_proj) is torch.nn.Identity  # fc1 -> fc2 merged into c_fc
    tok = text.tokenizer(f"file:{lm_run / 'hf_model' / 'tokenizer.json'}")
    prompt = torch.tensor([tok.encode("ROMEO:")])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                               pad_token_id=tok.pad_id)
    assert generated.shape == (1, prompt.shape[1] + 5)
    # the pruned network the run saved computes what the saved Hugging Face model computes
    result = ek.load(lm_run / "pruned.pt", lambda: cli._model_of(read_record(lm_run / "pruned.pt")["settings"]))
    with torch.no_grad():
        expected = result.model.eval()(input_ids=prompt)
    got = model(prompt).logits
    expected = expected.logits if hasattr(expected, "logits") else expected
    assert relative_error(got, expected) < 1e-4


def test_a_text_run_folds_and_exports_with_dynamic_sequence_length(lm_run, tmp_path, capsys):
    onnx = pytest.importorskip("onnxruntime")
    path = tmp_path / "lm.onnx"
    assert cli.main(["export", str(lm_run), "--out", str(path)]) == 0
    assert "dynamic batch and sequence length" in capsys.readouterr().out
    session = onnx.InferenceSession(str(path))
    ids = torch.randint(2, 300, (3, 21))  # another batch and length than the run's [1, 32]
    logits = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    assert logits.shape == (3, 21, 300)


def test_a_classifier_on_tsv_with_the_bytes_tokenizer(tmp_path):
    out = tmp_path / "cls"
    assert cli.main(["prune", "--model", TINY_BERT, "--dataset", f"tsv:{text.TINY_SST2}", "--tokenizer", "bytes",
                     "--seq-len", "48", "--epochs", "1", "--batch-size", "32", "--max-steps", "1", "--max-drop", "100",
                     "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"].get("task") == "classification" and report["settings"]["num_classes"] == 2
    assert 0 <= report["baseline_accuracy"] <= 100 and report.get("generation") is None
    assert isinstance(ek.models.load_pretrained(out / "hf_model"), transformers.BertForSequenceClassification)


@pytest.mark.parametrize("argv, message", [
    ([*LM, "--tokenizer", "bytes", "--max-drop", "1"], "--max-increase"),
    (["prune", "--dataset", f"tsv:{text.TINY_SST2}", "--model", TINY_BERT, "--tokenizer", "bytes",
      "--max-increase", "0.1"], "--max-drop"),
    (LM, "needs --tokenizer"),
    ([*LM, "--tokenizer", "bytes", "--max-increase", "20"], "--max-increase"),
    (["prune", "--tokenizer", "bytes"], "text datasets"),
    (["prune", "--model", TINY_GPT2, "--dataset", "text:/no/such/file.txt", "--tokenizer", "bytes"], "no such file"),
    (["prune", "--model", TINY_GPT2, "--dataset", "fashion-mnist-mini"], "text dataset"),
])
def test_text_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
