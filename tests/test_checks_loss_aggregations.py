"""Chapter 7's Exercise 7: GRPO's loss aggregated as the GRPO paper does (each answer's tokens
averaged, then the answers) and as Dr. GRPO does (summed over a constant). The checker accepts the
course's references and TRL's own aggregations on sampled batches, and rejects planted bugs with the
hint that names each."""

import pytest
import torch

from utils.checks import CheckError, check_loss_aggregations
from utils.grpo import GRPOSettings, constant_norm_loss, grpo_loss, per_answer_loss


def loop_per_answer(logp, old, ref, adv, mask, clip, beta):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    log_r = ref - logp
    per_token = -surrogate + beta * (torch.expm1(log_r) - log_r)
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def vectorised_constant(logp, old, ref, adv, mask, clip, beta):
    return grpo_loss(logp, old, ref, adv, mask, clip, beta) * mask.sum() / (len(adv) * 40)


def test_the_constant_is_the_loops_max_new_tokens():
    assert GRPOSettings().max_new_tokens == 40
    assert constant_norm_loss.__defaults__[-1] == GRPOSettings().max_new_tokens


def test_checker_accepts_the_references_and_other_correct_forms():
    check_loss_aggregations(per_answer_loss, constant_norm_loss)
    check_loss_aggregations(loop_per_answer, vectorised_constant)


def test_checker_matches_trl_grpo_trainer(tiny_model, tiny_tokenizer):
    from utils.data import eval_conversations

    prompts = eval_conversations(4, split="train", seed=0)["prompt"]
    check_loss_aggregations(loop_per_answer, vectorised_constant, 40, tiny_model, tiny_tokenizer, prompts)


def token_mean(logp, old, ref, adv, mask, clip, beta):
    return grpo_loss(logp, old, ref, adv, mask, clip, beta)


def over_tokens(logp, old, ref, adv, mask, clip, beta):
    return grpo_loss(logp, old, ref, adv, mask, clip, beta)  # Dr. GRPO's sum over mask.sum()


def over_width(logp, old, ref, adv, mask, clip, beta):
    return grpo_loss(logp, old, ref, adv, mask, clip, beta) * mask.sum() / mask.numel()


def padding_in_each_mean(logp, old, ref, adv, mask, clip, beta):
    rows = [
        grpo_loss(logp[[i]], old[[i]], ref[[i]], adv[[i]], torch.ones_like(mask[[i]]), clip, beta)
        for i in range(len(adv))
    ]
    return torch.stack(rows).mean()


def detached_count(logp, old, ref, adv, mask, clip, beta):
    total = grpo_loss(logp, old, ref, adv, mask, clip, beta).detach() * mask.sum()
    return total / (len(adv) * 40) + 0 * logp.sum()


def fixed_beta(logp, old, ref, adv, mask, clip, beta):
    return per_answer_loss(logp, old, ref, adv, mask, clip, 0.04)


@pytest.mark.parametrize(
    "per_answer, constant, hint",
    [
        (token_mean, constant_norm_loss, "average each answer over its own tokens first"),
        (constant_norm_loss, constant_norm_loss, "you divided the sum by a constant"),
        (padding_in_each_mean, constant_norm_loss, "aggregate them as each answer's tokens averaged"),
        (fixed_beta, constant_norm_loss, "aggregate them as each answer's tokens averaged"),
        (per_answer_loss, over_tokens, "which grows with the answers' lengths"),
        (per_answer_loss, per_answer_loss, "the GRPO paper's 1/|o|"),
        (per_answer_loss, over_width, "the batch's width"),
        (per_answer_loss, detached_count, "not its gradient"),
    ],
)
def test_checker_rejects_planted_bugs_naming_them(per_answer, constant, hint):
    with pytest.raises(CheckError, match=None) as error:
        check_loss_aggregations(per_answer, constant)
    assert hint in str(error.value), str(error.value)
    assert "from utils.grpo import per_answer_loss, constant_norm_loss" in str(error.value)
