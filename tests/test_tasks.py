"""Tasks given to the loop: the causal LM's loss and perplexity against hand computations, what
max_drop means for each task, and a tiny GPT-2 pruned end to end for perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import easier_kernels as ek
from easier_kernels.tasks import IGNORE_INDEX, TASKS, CausalLM, Classification, task_named

V = 11  # vocabulary of the hand-computed cases


def _random_batch(n, t, seed, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, vocab, generator=g), torch.randint(0, vocab, (n, t), generator=g)


# ---- CausalLM.loss


def test_causal_lm_loss_is_cross_entropy_of_each_position_against_the_next_token():
    logits, ids = _random_batch(3, 7, 0)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    got = CausalLM().loss(logits, {"input_ids": ids, "labels": ids})
    assert torch.allclose(got, expected, atol=1e-6)
    # the shift matters: against the unshifted labels it is another number
    assert not torch.allclose(got, F.cross_entropy(logits.reshape(-1, V), ids.reshape(-1)), atol=1e-3)
    # labels other than the input ids are what is predicted
    _, other = _random_batch(3, 7, 1)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), other[:, 1:].reshape(-1))
    assert torch.allclose(CausalLM().loss(logits, {"input_ids": ids, "labels": other}), expected, atol=1e-6)


def test_causal_lm_loss_reads_logits_from_a_model_output():
    logits, ids = _random_batch(2, 5, 2)
    expected = CausalLM().loss(logits, {"input_ids": ids})
    assert torch.equal(CausalLM().loss({"logits": logits}, {"input_ids": ids}), expected)
    assert torch.equal(CausalLM().loss((logits, None), {"input_ids": ids}), expected)


def test_causal_lm_loss_leaves_out_padded_positions():
    logits, ids = _random_batch(3, 8, 3)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(3, 7)
    kept = mask[:, 1:].double()
    expected = (per_token.double() * kept).sum() / kept.sum()
    got = CausalLM().loss(logits, {"input_ids": ids, "labels": ids, "attention_mask": mask})
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() != pytest.approx(per_token.mean().item(), rel=1e-3)  # the padding would have counted
    # the batch's labels are not changed by the loss
    assert (ids >= 0).all()


def test_causal_lm_loss_ignores_labels_of_minus_100():
    logits, ids = _random_batch(2, 6, 4)
    labels = ids.clone()
    labels[0, 2] = labels[1, 4] = labels[1, 5] = IGNORE_INDEX
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(2, 5)
    kept = (labels[:, 1:] != IGNORE_INDEX).double()
    assert kept.sum() == 7
    expected = (per_token.double() * kept).sum() / kept.sum()
    got = CausalLM().loss(logits, {"input_ids": ids, "labels": labels})
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # a label at position 0 predicts nothing: ignoring it changes nothing
    first = ids.clone()
    first[:, 0] = IGNORE_INDEX
    plain = CausalLM().loss(logits, {"input_ids": ids, "labels": ids})
    assert torch.allclose(CausalLM().loss(logits, {"input_ids": ids, "labels": first}), plain)


def test_causal_lm_loss_without_labels_predicts_the_input_ids():
    logits, ids = _random_batch(2, 6, 5)
    with_labels = CausalLM().loss(logits, {"input_ids": ids, "labels": ids})
    assert torch.equal(CausalLM().loss(logits, {"input_ids": ids}), with_labels)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(CausalLM().loss(logits, {"input_ids": ids, "attention_mask": mask}),
                       CausalLM().loss(logits, {"input_ids": ids, "labels": ids, "attention_mask": mask}))
    # (input_ids, labels) tuples too
    assert torch.equal(CausalLM().loss(logits, (ids, ids)), with_labels)


def test_causal_lm_loss_refuses_logits_of_the_wrong_shape():
    logits, ids = _random_batch(2, 6, 6)
    with pytest.raises(ValueError, match=r"\[batch, sequence, vocab\].*\(2, 5, 11\).*\(2, 6\)"):
        CausalLM().loss(logits[:, :5], {"input_ids": ids})
    with pytest.raises(ValueError, match="must be \\[batch, sequence, vocab\\]"):
        CausalLM().loss(logits[:, 0], {"input_ids": ids})  # [batch, vocab]: a classifier's
    with pytest.raises(ValueError, match="needs 'labels' or 'input_ids'"):
        CausalLM().loss(logits, {"attention_mask": torch.ones(2, 6)})


# ---- CausalLM.evaluate


class TableLM(nn.Module):
    """Logits looked up per token (an nn.Embedding of vocab x vocab), zeroed where the mask is 0
    (so the mask is a real input); records the mode it ran in."""

    def __init__(self, vocab=V, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Embedding(vocab, vocab)
        self.modes = []

    def forward(self, input_ids, attention_mask=None):
        self.modes.append(self.training)
        logits = self.table(input_ids)
        return logits if attention_mask is None else logits * attention_mask[..., None]


def _lm_batches():
    """Dict batches of different sizes, lengths, padding and ignored labels."""
    g = torch.Generator().manual_seed(7)
    a = torch.randint(0, V, (2, 8), generator=g)
    mask_a = torch.ones(2, 8, dtype=torch.long)
    mask_a[1, 3:] = 0  # one long row, one short one
    b = torch.randint(0, V, (3, 4), generator=g)
    c = torch.randint(0, V, (1, 12), generator=g)
    labels_c = c.clone()
    labels_c[0, 6:] = IGNORE_INDEX
    return [{"input_ids": a, "labels": a, "attention_mask": mask_a},
            {"input_ids": b, "attention_mask": torch.ones_like(b)},
            {"input_ids": c, "labels": labels_c}]


def _by_hand(model, batches):
    """(exp(total NLL / tokens), exp(mean of the batches' mean losses)), computed per token."""
    nll, tokens, means = 0.0, 0, []
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"]
            labels = batch.get("labels", ids).clone()
            mask = batch.get("attention_mask")
            if mask is not None:
                labels[mask == 0] = IGNORE_INDEX
            logits = model.table(ids) * (mask[..., None] if mask is not None else 1)
            batch_nll, batch_tokens = 0.0, 0
            for n in range(ids.shape[0]):
                for t in range(ids.shape[1] - 1):
                    target = int(labels[n, t + 1])
                    if target == IGNORE_INDEX:
                        continue
                    batch_nll -= float(torch.log_softmax(logits[n, t].double(), -1)[target])
                    batch_tokens += 1
            nll, tokens = nll + batch_nll, tokens + batch_tokens
            means.append(batch_nll / batch_tokens)
    return math.exp(nll / tokens), math.exp(sum(means) / len(means))


@pytest.mark.parametrize("training", [True, False])
def test_perplexity_is_over_every_token_of_every_batch_and_the_mode_is_restored(training):
    model = TableLM().train(training)
    batches = _lm_batches()
    expected, mean_of_means = _by_hand(model, batches)
    assert expected != pytest.approx(mean_of_means, rel=1e-3)  # the batches differ enough to tell them apart
    model.modes.clear()
    loader = DataLoader(batches, batch_size=None)
    got = CausalLM().evaluate(model, loader)
    assert got == pytest.approx(expected, rel=1e-6)  # (float32 logits)
    assert model.modes == [False, False, False]  # every batch, in eval mode
    assert model.training is training
    assert got > 1


def test_perplexity_of_a_model_that_knows_the_next_token_is_one_and_of_uniform_logits_the_vocab():
    ids = torch.arange(8).repeat(2, 1)  # 0 1 2 ... 7: the next token is always id + 1

    class Knows(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(100.0))

        def forward(self, input_ids):
            return self.scale * F.one_hot((input_ids + 1) % V, V).float()

    assert CausalLM().evaluate(Knows(), [{"input_ids": ids}]) == pytest.approx(1.0, abs=1e-6)

    class Uniform(Knows):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, V) * self.scale

    assert CausalLM().evaluate(Uniform(), [{"input_ids": ids}]) == pytest.approx(V, rel=1e-6)


def test_perplexity_of_a_loader_without_tokens_is_a_clear_error():
    model = TableLM()
    with pytest.raises(ValueError, match="yielded no tokens"):
        CausalLM().evaluate(model, [])
    with pytest.raises(ValueError, match="yielded no tokens"):  # every position padding
        ids = torch.zeros(2, 4, dtype=torch.long)
        CausalLM().evaluate(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])
    model.train()
    with pytest.raises(ValueError, match="must be \\[batch, sequence, vocab\\]"):
        CausalLM().evaluate(model, [{"input_ids": torch.zeros(2, dtype=torch.long)}])
    assert model.training


# ---- what max_drop means


def test_causal_lm_threshold_is_a_relative_perplexity_increase():
    task = CausalLM()
    assert task.threshold(20, 0.05) == pytest.approx(21)
    assert task.passes(21, 20, 0.05) and task.passes(20.5, 20, 0.05) and task.passes(15, 20, 0.05)
    assert not task.passes(21.01, 20, 0.05)
    assert task.drop(21, 20) == pytest.approx(0.05) and task.drop(18, 20) == pytest.approx(-0.1)
    assert task.passes(20, 20, 0) and not task.passes(20.001, 20, 0)
    assert "21.000" in task.rejection(21.5, 20, 0.05) and "perplexity 21.500" in task.rejection(21.5, 20, 0.05)
    for ok in (0, 0.05, 1, 10, 3):
        task.check_max_drop(ok)
    for bad in (-0.1, 11, True, None, "0.05", float("nan")):
        with pytest.raises(ValueError, match="relative perplexity increase"):
            task.check_max_drop(bad)
    assert task.check_baseline(1.5) is None
    assert (task.name, task.metric) == ("causal_lm", "perplexity")


def test_classification_threshold_is_accuracy_points_as_in_the_paper():
    task = Classification()
    assert task.threshold(90, 1.0) == 89
    assert task.passes(89, 90, 1.0) and task.passes(95, 90, 1.0) and not task.passes(88.99, 90, 1.0)
    assert task.drop(88.5, 90) == pytest.approx(1.5)
    assert "89.00" in task.rejection(88.5, 90, 1.0)
    for ok in (0, 1.0, 100, 5):
        task.check_max_drop(ok)
    for bad in (-1, 100.5, True, None, float("nan")):
        with pytest.raises(ValueError, match="accuracy points"):
            task.check_max_drop(bad)
    assert task.check_baseline(0.9) is not None and task.check_baseline(90.0) is None
    assert (task.name, task.metric) == ("classification", "accuracy")


def test_tasks_by_name():
    assert set(TASKS) == {"classification", "causal_lm"}
    assert isinstance(task_named("causal_lm"), CausalLM) and isinstance(task_named("classification"), Classification)
    with pytest.raises(ValueError, match="task must be one of classification, causal_lm, not 'lm'"):
        task_named("lm")


def test_classification_loss_and_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1, 1, 1])
    assert torch.allclose(Classification().loss(logits, (None, targets)), F.cross_entropy(logits, targets))

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return logits[x] * self.w

    loader = [(torch.tensor([0, 1]), targets[:2]), (torch.tensor([2, 3]), targets[2:])]
    assert Classification().evaluate(Fixed(), loader) == pytest.approx(75.0)


# ---- the loop, for perplexity


def _id_loader(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, 16), generator=g)
    return DataLoader([{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in range(0, n, 4)], batch_size=None)


def test_prune_a_tiny_gpt2_for_perplexity(tiny_gpt2):
    model = tiny_gpt2
    train, val = _id_loader(8, 1), _id_loader(8, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    baseline = CausalLM().evaluate(model, val)
    assert baseline > 1
    result = ek.prune(model, train, val, task=ek.tasks.CausalLM(), max_drop=0.05, optimizer="adamw", max_steps=1,
                      progress=False, lr=1e-3)
    assert result.baseline_accuracy == pytest.approx(baseline, rel=1e-5)
    assert len(result.history) == 1
    step = result.history[0]
    assert step.accepted == (step.val_accuracy <= result.baseline_accuracy * 1.05)
    assert step.val_accuracy > 1
    assert result.settings["task"] == "causal_lm" and result.settings["optimizer"] == "adamw"
    assert result.max_drop == 0.05
    assert result.linearized == (step.removed if step.accepted else [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is never modified
    # the result's network is what was measured: its perplexity on the validation loader
    if step.accepted:
        assert CausalLM().evaluate(result.model, val) == pytest.approx(step.val_accuracy, rel=1e-4)


@pytest.mark.parametrize("after, accepted", [(21.0, True), (21.01, False)])
def test_the_loop_accepts_a_step_by_the_tasks_threshold(tiny_gpt2, after, accepted):
    """A scripted metric (baseline 20, then `after`): accepted exactly up to 20 x 1.05."""
    model = tiny_gpt2
    loader = _id_loader(4, 0)
    values = iter([20.0, after])
    result = ek.prune(model, loader, loader, task=CausalLM(), max_drop=0.05, max_steps=1, progress=False,
                      evaluate=lambda net: next(values), plan="none")
    assert result.baseline_accuracy == 20.0
    assert [s.accepted for s in result.history] == [accepted]
    assert result.history[0].val_accuracy == after
    assert result.accuracy == (after if accepted else 20.0)
    assert bool(result.linearized) is accepted


def test_prune_refuses_accuracy_points_for_a_causal_lm(tiny_gpt2):
    model = tiny_gpt2
    loader = _id_loader(4, 0)
    with pytest.raises(ValueError, match="relative perplexity increase"):
        ek.prune(model, loader, loader, task=CausalLM(), max_drop=50, max_steps=1, progress=False)
