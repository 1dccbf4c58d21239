"""Chapter 2's checkers accept correct code and reject planted bugs with a message that names them."""

import pytest
import torch
import torch.nn.functional as F

from utils.checks import CheckError, check_build_labels, check_collate, check_count_trainable, check_sft_loss
from utils.sft import build_labels, collate


# --- build_labels -------------------------------------------------------------------------
def unmasked(ids, mask):
    return list(ids)


def inverted(ids, mask):
    return [-100 if m else t for t, m in zip(ids, mask)]


def shifted(ids, mask):
    return ids[1:] + [-100]


def zero_fill(ids, mask):
    return [t if m else 0 for t, m in zip(ids, mask)]


def too_short(ids, mask):
    return [t if m else -100 for t, m in zip(ids[:-1], mask[:-1])]


def labels_stub(ids, mask):
    raise NotImplementedError()


def test_build_labels_accepts_reference():
    check_build_labels(build_labels)
    check_build_labels(lambda ids, mask: torch.where(torch.tensor(mask).bool(), torch.tensor(ids), -100))


@pytest.mark.parametrize(
    "bug, message",
    [
        (unmasked, "prompt is not masked"),
        (inverted, "other way round"),
        (shifted, "shifted the labels"),
        (zero_fill, "not 0 or -1"),
        (too_short, "one label per token"),
        (labels_stub, "not implemented yet"),
        (lambda ids: ids, "wrong signature"),
    ],
)
def test_build_labels_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_build_labels(bug)


# --- collate ------------------------------------------------------------------------------
def _pad(examples, pad_id, label_pad=-100, side="right", attn_all=False, length=None):
    n = length or max(len(e["input_ids"]) for e in examples)
    ids, labels, attn = [], [], []
    for e in examples:
        k = n - len(e["input_ids"])
        if side == "right":
            ids.append(e["input_ids"] + [pad_id] * k)
            labels.append(e["labels"] + [label_pad] * k)
            attn.append([1] * len(e["input_ids"]) + [1 if attn_all else 0] * k)
        else:
            ids.append([pad_id] * k + e["input_ids"])
            labels.append([label_pad] * k + e["labels"])
            attn.append([1 if attn_all else 0] * k + [1] * len(e["input_ids"]))
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(attn),
    }


def test_collate_accepts_reference():
    check_collate(collate)
    check_collate(lambda ex, pad_id: _pad(ex, pad_id))


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda ex, pad_id: _pad(ex, pad_id, label_pad=pad_id), "padded the labels with pad_id"),
        (lambda ex, pad_id: _pad(ex, pad_id, attn_all=True), "attention_mask to 1 everywhere"),
        (lambda ex, pad_id: _pad(ex, pad_id, side="left"), "padded on the left"),
        (lambda ex, pad_id: _pad(ex, pad_id, length=16), r"returned shape \(3, 16\)"),
        (lambda ex, pad_id: [e["input_ids"] for e in ex], "should return a dict"),
        (lambda ex, pad_id: {k: v.float() for k, v in _pad(ex, pad_id).items()}, "should be torch.long"),
    ],
)
def test_collate_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_collate(bug)


# --- sft_loss -----------------------------------------------------------------------------
def reference_loss(logits, labels):
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def per_sequence_mean(logits, labels):
    v = logits.size(-1)
    tok = F.cross_entropy(
        logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.size(0), -1)
    mask = labels[:, 1:] != -100
    return (tok.sum(1) / mask.sum(1)).mean()


def no_shift(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


def summed(logits, labels):
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def detached(logits, labels):
    return reference_loss(logits, labels).detach()


def test_sft_loss_accepts_reference():
    check_sft_loss(reference_loss)


@pytest.mark.parametrize(
    "bug, message",
    [
        (per_sequence_mean, "averaged within each sequence"),
        (no_shift, "did not shift"),
        (summed, "summed the token losses"),
        (detached, "detached"),
        (lambda logits, labels: reference_loss(logits, labels).unsqueeze(0), "should return a scalar"),
    ],
)
def test_sft_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_sft_loss(bug)


# --- count_trainable ----------------------------------------------------------------------
def count_ok(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_count_trainable_accepts_reference():
    check_count_trainable(count_ok)


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda m: sum(p.numel() for p in m.parameters()), "counts frozen parameters"),
        (lambda m: sum(t.numel() for t in m.state_dict().values()), "state_dict"),
        (lambda m: count_ok(m) / sum(p.numel() for p in m.parameters()), "should return an int"),
        (lambda m: count_ok(m) + 1, "count p.numel"),
    ],
)
def test_count_trainable_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_count_trainable(bug)
