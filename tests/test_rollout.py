"""utils.rollout: the KL of every results table is measured on the token ids that were sampled."""

import copy

import pytest
import torch

from utils import data, evaluate, rollout
from utils.models import chat_prompts, model_stop_ids


@pytest.fixture(scope="module")
def convs():
    return list(data.eval_conversations(12, split="test", seed=0, dialogues=0.25)["prompt"])


@pytest.fixture(scope="module")
def other_model(tiny_model):
    """The tiny model with every weight nudged: a second distribution over the same tokens."""
    m = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def _by_hand(model, tokenizer, conversation, ids, temperature=1.0):
    """log pi(ids | prompt) from one unpadded forward pass over prompt + ids."""
    prompt = tokenizer(chat_prompts(tokenizer, [conversation])[0], add_special_tokens=False)["input_ids"]
    full = torch.tensor([prompt + list(ids)])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0, :-1].float() / temperature
    logp = logits.log_softmax(-1)[len(prompt) - 1 :].gather(1, torch.tensor(ids)[:, None]).squeeze(1)
    return float(logp.sum())


def test_answers_keep_the_token_ids_that_were_drawn(tiny_model, tiny_tokenizer, convs):
    answers = evaluate.evaluate(tiny_model, tiny_tokenizer, convs, do_sample=True, seed=3)
    stops = model_stop_ids(tiny_model)
    for ids, n, finished in zip(answers["token_ids"], answers["n_tokens"], answers["finished"]):
        assert len(ids) == n and all(isinstance(t, int) for t in ids)
        assert not any(t in stops for t in ids[:-1])  # nothing after a stop token
        assert finished == (ids[-1] == tiny_tokenizer.eos_token_id)
    # an untrained model rarely ends its turn: these answers have no end token to score
    assert (~answers["finished"]).sum() >= 6


def test_answer_logprobs_are_those_of_the_sampled_ids_at_a_temperature(tiny_model, tiny_tokenizer, convs):
    answers = evaluate.evaluate(tiny_model, tiny_tokenizer, convs, do_sample=True, seed=3)
    ids = list(answers["token_ids"])
    roll = rollout.rollout_from_ids(tiny_tokenizer, convs, ids)
    for t in (1.0, 0.5):
        got = rollout.answer_logprobs(tiny_model, roll, temperature=t, batch_size=5)  # ragged batches
        want = [_by_hand(tiny_model, tiny_tokenizer, c, i, t) for c, i in zip(convs, ids)]
        assert got.tolist() == pytest.approx(want, abs=1e-4)
    # re-encoding the decoded text would have scored other tokens: an end token on every answer
    unfinished = [i for i, f in enumerate(answers["finished"]) if not f]
    assert all(tiny_tokenizer.eos_token_id not in ids[i] for i in unfinished)


def test_sequence_kl_is_the_mean_k1_that_ppo_logs_on_the_same_rollout(
    tiny_model, other_model, tiny_tokenizer, convs
):
    tok = copy.deepcopy(tiny_tokenizer)
    roll = rollout.sample_rollout(other_model, tok, convs, seed=5)
    with torch.no_grad():
        lp, _ = rollout.token_logprobs(other_model, roll)
        lr, _ = rollout.token_logprobs(tiny_model, roll)
    k1 = ((lp - lr) * roll.response_mask).sum(1).mean().item()  # what the PPO and GRPO loops log
    assert rollout.rollout_kl(other_model, tiny_model, roll) == pytest.approx(k1, abs=1e-4)
    ids = [r[m.bool()].tolist() for r, m in zip(roll.response, roll.response_mask)]
    assert rollout.sequence_kl(other_model, tiny_model, tok, convs, ids) == pytest.approx(k1, abs=1e-4)
    assert rollout.sequence_kl(tiny_model, tiny_model, tok, convs, ids) == 0.0
    assert k1 != pytest.approx(0.0, abs=1e-3)


def test_measure_reports_the_kl_on_its_sampled_answers(tiny_model, other_model, tiny_tokenizer, convs):
    sampled, _, stats = evaluate.measure(other_model, tiny_tokenizer, convs, tiny_model, greedy=False)
    by_hand = [
        _by_hand(other_model, tiny_tokenizer, c, i) - _by_hand(tiny_model, tiny_tokenizer, c, i)
        for c, i in zip(convs, sampled["token_ids"])
    ]
    assert stats["KL to SFT"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-4)


def test_text_is_refused_where_token_ids_are_needed(tiny_model, tiny_tokenizer, convs):
    with pytest.raises(TypeError, match="token ids"):
        rollout.sequence_kl(tiny_model, tiny_model, tiny_tokenizer, convs[:2], ["Alba is red.", "no."])
    with pytest.raises(ValueError, match="2 conversations but 1"):
        rollout.rollout_from_ids(tiny_tokenizer, convs[:2], [[1, 2]])
