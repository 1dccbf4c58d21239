"""Chapters 1 and 2's checkers against the classes of wrong answers that once got through (#31):
options honoured one at a time, stated contracts never tested, values checked but not gradients,
inputs too tame to show an unstable form or a shortcut, and messages that pointed away from the bug.
Each planted bug below passed the checker before; each must now fail with a message that names it,
while the course's reference (and the notebooks' solutions) still pass."""

import pytest
import torch
import torch.nn.functional as F

from utils import models, pretrain, sampling, sft
from utils.checks import (
    CheckError,
    check_build_labels,
    check_collate,
    check_count_trainable,
    check_next_token_loss,
    check_sample_next_token,
    check_sft_loss,
)


def _ids(x):
    return x.__name__ if callable(x) else ""


# === the references still pass =============================================================
def notebook_sampler(logits, temperature=1.0, top_k=None, generator=None):  # solutions/01, as written
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if top_k is not None:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def notebook_collate(examples, pad_id):  # solutions/02, as written
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@pytest.mark.parametrize(
    "check, fn, kwargs",
    [
        (check_next_token_loss, pretrain.next_token_loss, {}),
        (check_sample_next_token, sampling.sample_next_token, {}),
        (check_sample_next_token, notebook_sampler, {}),
        (check_build_labels, sft.build_labels, {}),
        (check_collate, sft.collate, {}),
        (check_collate, sft.collate, {"pad_id": 2}),  # the checker's other padding id moves
        (check_collate, notebook_collate, {"pad_id": 0}),
        (check_sft_loss, sft.sft_loss, {}),
        (check_count_trainable, models.count_trainable, {}),
    ],
    ids=lambda x: x.__name__ if callable(x) else str(x or ""),
)
def test_the_references_still_pass(check, fn, kwargs, capsys):
    check(fn, **kwargs)
    assert "[check passed]" in capsys.readouterr().out


def test_the_sampler_check_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_sample_next_token(notebook_sampler)
    assert torch.equal(torch.rand(3), expected)


# === check_next_token_loss =================================================================
def _shifted(logits, input_ids):
    return logits[:, :-1], input_ids[:, 1:]


def constant_normaliser(logits, input_ids):  # "log Z is a constant": its gradient never flows
    z, targets = _shifted(logits, input_ids)
    keep = targets != -100
    with torch.no_grad():
        log_z = z.logsumexp(-1)
    picked = z.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (log_z - picked)[keep].mean()


def number_rewrapped(logits, input_ids):  # requires_grad, but a new leaf: no path to the logits
    z, targets = _shifted(logits, input_ids)
    loss = F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1), ignore_index=-100)
    return torch.tensor(loss.item(), requires_grad=True)


def log_of_softmax(logits, input_ids):  # log(0) = -inf once a logit is ~100 above the target's
    z, targets = _shifted(logits, input_ids)
    keep = targets != -100
    logp = torch.log(F.softmax(z, dim=-1))
    return -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()


def exp_by_hand(logits, input_ids):  # exp(100) overflows float32
    z, targets = _shifted(logits, input_ids)
    keep = targets != -100
    log_z = torch.exp(z).sum(-1).log()
    picked = z.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (log_z - picked)[keep].mean()


def mask_from_lengths(logits, input_ids):  # -100 read as trailing padding only
    z, targets = _shifted(logits, input_ids)
    lengths = (input_ids != -100).sum(1)
    keep = torch.arange(targets.size(1)) < (lengths - 1)[:, None]  # the last real token predicts nothing
    per_token = F.cross_entropy(z.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return per_token[keep].mean()


def per_sequence_mean(logits, input_ids):  # rejected before, with a generic hint
    z, targets = _shifted(logits, input_ids)
    per_token = F.cross_entropy(z.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return (per_token.sum(1) / (targets != -100).sum(1)).mean()


@pytest.mark.parametrize(
    "fn, message",
    [
        (constant_normaliser, r"right value but not the right gradient .*log-sum-exp normaliser"),
        (number_rewrapped, r"not connected to the logits' graph .*new tensor from the number"),
        (log_of_softmax, r"on case 3 .*magnitude up to \d+.*log\(softmax\(\.\.\.\)\) underflowed"),
        (exp_by_hand, r"on case 3 .*exp\(logits\) overflowed"),
        (mask_from_lengths, r"on case 3 .*mask from each row's length.*-100 can be anywhere"),
        (per_sequence_mean, "averaged within each sequence and then over the batch"),
    ],
    ids=_ids,
)
def test_loss_checker_rejects_planted_bugs(fn, message):
    with pytest.raises(CheckError, match=message):
        check_next_token_loss(fn)


# === check_sample_next_token ===============================================================
def _top_k(logits, k):
    return logits.masked_fill(logits < logits.topk(k, dim=-1).values[:, -1:], float("-inf"))


def _draw(logits, generator):
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def top_k_before_greedy(logits, temperature, top_k, generator):  # if/elif: top-k first
    if top_k is not None:
        scaled = _top_k(logits, top_k)
    elif temperature == 0:
        return logits.argmax(-1)
    else:
        scaled = logits / temperature
    return _draw(scaled, generator)


def temperature_ignored_with_top_k(logits, temperature, top_k, generator):  # if/elif: one option
    if temperature == 0:
        return logits.argmax(-1)
    if top_k is not None:
        return _draw(_top_k(logits, top_k), generator)
    return _draw(logits / temperature, generator)


def top_k_ignored_off_one(logits, temperature, top_k, generator):  # if/elif: the other option
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        return _draw(logits / temperature, generator)
    return _draw(_top_k(logits, top_k) if top_k is not None else logits, generator)


def softmax_by_hand(logits, temperature, top_k, generator):  # exp(100) = inf, inf / inf = nan
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_k is not None:
        scaled = _top_k(scaled, top_k)
    probs = torch.exp(scaled) / torch.exp(scaled).sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def ignores_generator(logits, temperature, top_k, generator):  # draws from the global stream
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_k is not None:
        scaled = _top_k(scaled, top_k)
    return torch.multinomial(scaled.softmax(-1), 1).squeeze(-1)


def own_generator(logits, temperature, top_k, generator):  # "reproducible", whatever the seed
    generator = torch.Generator().manual_seed(0)
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    return _draw(_top_k(scaled, top_k) if top_k is not None else scaled, generator)


def samples_first_row(logits, temperature, top_k, generator):  # rejected before, as "top_k=1"
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_k is not None:
        scaled = _top_k(scaled, top_k)
    probs = scaled.softmax(-1)
    return torch.multinomial(probs[0], logits.size(0), replacement=True, generator=generator)


def always_argmax(logits, temperature, top_k, generator):  # rejected before, with no hint
    return logits.argmax(-1)


@pytest.mark.parametrize(
    "fn, message",
    [
        (top_k_before_greedy, r"with temperature 0 and top_k=3 .* should still be greedy"),
        (temperature_ignored_with_top_k, r"temperature 0.5 and top_k=3 .*temperature is ignored when top_k"),
        (top_k_ignored_off_one, r"temperature 0.5 and top_k=3 .*top-k is ignored when the temperature"),
        (softmax_by_hand, r"on logits of magnitude 100 .*exp\(100\) overflows"),
        (ignores_generator, "two generators seeded alike: the draw must come from the `generator`"),
        (own_generator, "same 1000 tokens from generators seeded differently"),
        (samples_first_row, r"each row must be sampled from its own probabilities .*num_samples=batch"),
        (always_argmax, r"at temperature 1.0 .* always picked the most likely token"),
    ],
    ids=_ids,
)
def test_sampler_checker_rejects_planted_bugs(fn, message):
    with pytest.raises(CheckError, match=message):
        check_sample_next_token(fn)


# === check_build_labels ====================================================================
def labels_alias_the_ids(ids, mask):  # `labels = ids` does not copy
    labels = ids
    for i, m in enumerate(mask):
        if not m:
            labels[i] = -100
    return labels


def truthy_token(ids, mask):  # token id 0 times 1 is falsy
    return [(t * m) or -100 for t, m in zip(ids, mask)]


@pytest.mark.parametrize(
    "fn, message",
    [
        (labels_alias_the_ids, r"changed the lists passed in .*does not copy"),
        (truthy_token, r"token id 0 lost its label"),
    ],
    ids=_ids,
)
def test_build_labels_checker_rejects_planted_bugs(fn, message):
    with pytest.raises(CheckError, match=message):
        check_build_labels(fn)


# === check_collate =========================================================================
def extends_the_examples(examples, pad_id):  # rejected before, as a wrong attention_mask
    n = max(len(e["input_ids"]) for e in examples)
    for e in examples:
        k = n - len(e["input_ids"])
        e["attention_mask"] = [1] * len(e["input_ids"]) + [0] * k
        e["input_ids"] += [pad_id] * k
        e["labels"] += [-100] * k
    return {
        key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels", "attention_mask")
    }


def rebinds_the_examples(examples, pad_id):  # replaces the dataset's own lists with padded ones
    n = max(len(e["input_ids"]) for e in examples)
    for e in examples:
        k = n - len(e["input_ids"])
        e["attention_mask"] = [1] * len(e["input_ids"]) + [0] * k
        e["input_ids"] = e["input_ids"] + [pad_id] * k
        e["labels"] = e["labels"] + [-100] * k
    return {
        key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels", "attention_mask")
    }


def zero_padded(examples, pad_id):  # right while the tokenizer's pad id is 0
    batch = notebook_collate(examples, pad_id)
    batch["input_ids"] = batch["input_ids"] * batch["attention_mask"]
    return batch


def mask_from_pad_id(examples, pad_id):
    batch = notebook_collate(examples, pad_id)
    batch["attention_mask"] = (batch["input_ids"] != pad_id).long()
    return batch


def labels_from_pad_id(examples, pad_id):
    batch = notebook_collate(examples, pad_id)
    batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == pad_id, -100)
    return batch


@pytest.mark.parametrize(
    "fn, message",
    [
        (extends_the_examples, r"changed the examples passed in .*\+= \[pad_id\] \* k"),
        (rebinds_the_examples, "changed the examples passed in"),
        (zero_padded, "padded input_ids with 0 where pad_id is 2"),
        (mask_from_pad_id, r"\['attention_mask'\]` is wrong only at real tokens that equal pad_id \(2\)"),
        (labels_from_pad_id, r"\['labels'\]` is wrong only at real tokens that equal pad_id \(2\)"),
    ],
    ids=_ids,
)
def test_collate_checker_rejects_planted_bugs(fn, message):
    with pytest.raises(CheckError, match=message):
        check_collate(fn)  # pad_id=0, as the course's tokenizer's


# === check_sft_loss ========================================================================
def sft_constant_normaliser(logits, labels):
    return constant_normaliser(logits, labels)


def sft_log_of_softmax(logits, labels):
    return log_of_softmax(logits, labels)


def sft_number_rewrapped(logits, labels):
    return number_rewrapped(logits, labels)


def sft_mask_from_lengths(logits, labels):  # rejected before, with a generic hint
    return mask_from_lengths(logits, labels)


@pytest.mark.parametrize(
    "fn, message",
    [
        (sft_constant_normaliser, r"on case 0 .*right value but not the right gradient"),
        (sft_log_of_softmax, r"on case 2 .*log\(softmax\(\.\.\.\)\) underflowed"),
        (sft_number_rewrapped, r"detached from the logits .*new tensor from the number"),
        (sft_mask_from_lengths, r"mask from each row's length"),
    ],
    ids=_ids,
)
def test_sft_loss_checker_rejects_planted_bugs(fn, message):
    with pytest.raises(CheckError, match=message):
        check_sft_loss(fn)


# === check_count_trainable =================================================================
def tied_counted_twice(model):  # rejected before, as if it counted the state_dict
    return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad)


def test_count_trainable_names_both_ways_of_counting_a_tied_weight_twice():
    with pytest.raises(CheckError, match=r"tied embedding twice .*state_dict.*remove_duplicate=False"):
        check_count_trainable(tied_counted_twice)
