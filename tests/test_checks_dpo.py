"""Chapter 4's checkers accept correct code and reject planted bugs, naming them."""

import pytest
import torch
import torch.nn.functional as F

from utils.checks import CheckError, check_dpo_loss, check_sequence_logprobs
from utils.data import annotator_preferences
from utils.dpo import dpo_loss
from utils.logprobs import sequence_logprobs


def mean_not_sum(logits, labels):
    lp = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels[:, 1:] != -100
    return (lp * mask).sum(-1) / mask.sum(-1)


def no_shift(logits, labels):
    lp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (labels != -100)).sum(-1)


def unmasked(logits, labels):
    # "forgets" the mask: every position's log-prob of its clamped label counts
    lp = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.sum(-1)


def test_sequence_logprobs_accepts_reference():
    check_sequence_logprobs(sequence_logprobs)


@pytest.mark.parametrize(
    "bug, message",
    [
        (mean_not_sum, "averaged over tokens"),
        (no_shift, "no shift"),
        (unmasked, "sum log_softmax|prompt is not masked"),
        (lambda logits, labels: sequence_logprobs(logits, labels).sum(), r"returned shape \(\)"),
    ],
)
def test_sequence_logprobs_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_sequence_logprobs(bug)


def good(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def test_dpo_loss_accepts_reference_and_tuple_returns():
    check_dpo_loss(good)
    check_dpo_loss(dpo_loss)  # returns (loss, chosen_rewards, rejected_rewards)


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda pc, pr, rc, rr, b: -F.logsigmoid(-b * ((pc - rc) - (pr - rr))).mean(), "sign is flipped"),
        (lambda pc, pr, rc, rr, b: -F.logsigmoid(b * (pc - pr)).mean(), "reference model is missing"),
        (lambda pc, pr, rc, rr, b: (-b * F.logsigmoid((pc - rc) - (pr - rr))).mean(), "inside the sigmoid"),
        (lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pc - rc) - (pr - rr))).sum(), "instead of summing"),
        (
            lambda pc, pr, rc, rr, b: -torch.log(torch.sigmoid(b * ((pc - rc) - (pr - rr)))).mean(),
            "F.logsigmoid",
        ),
        (lambda pc, pr, rc, rr, b: good(pc, pr, rc, rr, b).detach(), "detached"),
        (lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pc - rc) - (pr - rr))), "one number"),
        (lambda pc, pr, rc, rr: good(pc, pr, rc, rr, 0.1), "wrong signature"),
    ],
)
def test_dpo_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_dpo_loss(bug)


def test_dpo_loss_against_dpo_trainer(tiny_model, tiny_tokenizer):
    import copy

    pairs = annotator_preferences(16)
    policy = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a policy that differs from the reference
    check_dpo_loss(good, policy, tiny_model, tiny_tokenizer, pairs, beta=0.3)
    with pytest.raises(CheckError, match="trl.DPOTrainer gives"):
        check_dpo_loss(
            lambda pc, pr, rc, rr, b: good(pc, pr, rc, rr, b) + 1e-3 * (pc.detach().abs().mean() > 50),
            policy,
            tiny_model,
            tiny_tokenizer,
            pairs,
            beta=0.3,
        )
