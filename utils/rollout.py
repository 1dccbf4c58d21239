"""Rollouts: answers sampled as token ids, and everything measured on those ids.

One module for what PPO (Chapter 3), GRPO (Chapter 7) and every results table need from sampled
answers: the :class:`Rollout` (prompt and answer token ids), :func:`sample_rollout`, each answer
token's log-probability under a model (:func:`token_logprobs`), a value model's estimates
(:func:`token_values`), the reward model's and the gold judge's scores, and the KL between two
models **on the tokens that were sampled** (:func:`rollout_kl`, :func:`sequence_kl`).

Why token ids and not text: decoding an answer and encoding it again does not give back the tokens
that were drawn. ``decode(...).strip()`` drops spaces, another tokenisation of the same text may be
chosen, and the chat template appends the end-of-turn token even to an answer that was cut off
before it ended. A KL measured on re-encoded text is then not the KL the training loop penalises,
and it is wrong exactly for the answers that never ended. Here nothing is re-encoded: an answer's
log-probability is read at the positions of the tokens the model sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import course_seed
from .padding import in_order, length_groups, pad_right
from .reward import reward_scores, score_answers


@dataclass
class Rollout:
    """A batch of sampled responses, as token ids.

    ``query`` ``[B, P]`` is the chat-formatted prompt, left-padded; ``response`` ``[B, T]`` the
    sampled tokens up to and including the first end token, right-padded; the masks are 1 on
    real tokens. ``finished`` is true where the response ended its turn (the end-of-turn token).
    """

    conversations: list
    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index) -> "Rollout":
        """The rows ``index``, without the padding columns that only other rows needed."""
        index = torch.as_tensor(index)
        qm, rm = self.query_mask[index], self.response_mask[index]
        q0 = int((qm.sum(0) > 0).nonzero()[0])  # first column any of these prompts uses (left padding)
        r1 = int(rm.sum(1).max())  # longest of these responses (right padding)
        return Rollout(
            [self.conversations[i] for i in index.tolist()],
            self.query[index][:, q0:],
            qm[:, q0:],
            self.response[index][:, :r1],
            rm[:, :r1],
            self.finished[index],
            [self.texts[i] for i in index.tolist()],
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` of prompt + response (positions skip
        the left padding)."""
        attention_mask = torch.cat([self.query_mask, self.response_mask], 1)
        return {
            "input_ids": torch.cat([self.query, self.response], 1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        }


@torch.no_grad()
def sample_rollout(
    policy, tokenizer, conversations, *, max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0
) -> Rollout:
    """Sample one response per conversation from ``policy`` (pure sampling at ``temperature``: no top-k/top-p,
    so the log-probabilities PPO computes are those of the distribution that was sampled)."""
    from .models import chat_prompts, cut_at_stop, left_padding, model_stop_ids
    from .sampling import sample_tokens

    device = next(policy.parameters()).device
    stop = model_stop_ids(policy)
    with left_padding(tokenizer):
        enc = tokenizer(
            chat_prompts(tokenizer, conversations),
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(device)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(course_seed(seed))
        new = sample_tokens(
            policy,
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_ids=stop,
            pad_id=tokenizer.pad_token_id,
        ).tolist()
    kept, finished = zip(*(cut_at_stop(ids, stop, tokenizer.eos_token_id) for ids in new))
    return _answered(tokenizer, conversations, enc, kept, finished, device)


def _answered(tokenizer, conversations, enc, responses, finished, device) -> Rollout:
    """The :class:`Rollout` of ``conversations`` (``enc``: their prompts, tokenised left-padded) and
    the answers' token ids ``responses``, right-padded."""
    width = max([1, *map(len, responses)])
    response = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, : len(r)] = 1
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    return Rollout(
        list(conversations),
        enc["input_ids"],
        enc["attention_mask"],
        response.to(device),
        response_mask.to(device),
        torch.as_tensor(list(map(bool, finished)), device=device),
        texts,
    )


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi(y_t | x, y_<t)`` of each response token and the policy's entropy there, both ``[B, T]``.

    The logits are divided by the sampling ``temperature``: PPO's ratio must compare the
    distribution the tokens were drawn from. Gradients flow into the log-probabilities if enabled
    by the caller; the entropy is a diagnostic, computed without them. The rows run in groups of
    similar length (:mod:`utils.padding`).
    """
    groups = length_groups(rollout.query_mask.sum(1) + rollout.response_mask.sum(1))
    if len(groups) == 1:
        return _token_logprobs(model, rollout, temperature)
    width = rollout.response.shape[1]
    parts = [_token_logprobs(model, rollout.subset(rows), temperature) for rows in groups]
    logp = in_order([pad_right(lp, width) for lp, _ in parts], groups)
    entropy = in_order([pad_right(e, width) for _, e in parts], groups)
    return logp, entropy


def _token_logprobs(
    model, rollout: Rollout, temperature: float, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logp_all = token_distributions(model, rollout, temperature)
    logp = torch.gather(logp_all, 2, rollout.response.unsqueeze(-1)).squeeze(-1)
    mask = rollout.response_mask
    if not entropy:
        return logp * mask, None
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp * mask, ent * mask


def token_values(value_model, rollout: Rollout) -> torch.Tensor:
    """The value model's estimate ``V(x, y_<t)`` before each response token, ``[B, T]``.

    The value model is a sequence-classification model (like the reward model); its scalar head
    is applied to every position's hidden state instead of the last one only. The rows run in
    groups of similar length (:mod:`utils.padding`).
    """
    groups = length_groups(rollout.query_mask.sum(1) + rollout.response_mask.sum(1))
    if len(groups) == 1:
        return _token_values(value_model, rollout)
    width = rollout.response.shape[1]
    return in_order([pad_right(_token_values(value_model, rollout.subset(r)), width) for r in groups], groups)


def _token_values(value_model, rollout: Rollout) -> torch.Tensor:
    inputs = rollout.model_inputs()
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(**inputs).last_hidden_state
    start = rollout.query.shape[1] - 1
    return value_model.score(hidden[:, start:-1]).squeeze(-1).float() * rollout.response_mask


def rollout_scores(reward_model, tokenizer, rollout: Rollout) -> torch.Tensor:
    """The reward model's score of each response, read at the end of the chat-formatted conversation."""
    return reward_scores(
        reward_model,
        tokenizer,
        rollout.conversations,
        [[{"role": "assistant", "content": t}] for t in rollout.texts],
    )


def require_tinyworld_judge(what: str) -> None:
    """Refuse TinyWorld's gold judge on a profile that has a public one (``hub``).

    The rubric knows TinyWorld's facts; a real model's answers to real prompts, scored by it, get a
    number that means nothing. ``what`` names the caller in the error, which says what to pass."""
    from .config import get_profile

    profile = get_profile()
    if profile.judge_model is not None:
        raise ValueError(
            f"{what}: TinyWorld's gold judge scores TinyWorld's questions only. On the "
            f"{profile.name!r} profile pass judge=(reward model, tokenizer), the public judge that "
            "utils.artifacts.evaluation_prompts returns, or leave gold out"
        )


def gold_scores(rollout: Rollout, judge=None) -> list[float]:
    """The gold judge's score of each response (an unfinished answer is penalised by the rubric), or,
    with ``judge = (reward model, its tokenizer)`` (real prompts: the ``hub`` profile), that model's.
    Without a judge on the ``hub`` profile it refuses (:func:`require_tinyworld_judge`)."""
    if judge is not None:
        return score_answers(*judge, rollout.conversations, rollout.texts).cpu().tolist()
    require_tinyworld_judge("gold_scores")
    from . import judge as rubric

    return [
        rubric.score(c, t, bool(f)) for c, t, f in zip(rollout.conversations, rollout.texts, rollout.finished)
    ]


def rollout_from_ids(tokenizer, conversations, responses, finished=None, device=None) -> Rollout:
    """A :class:`Rollout` of answers already sampled, given as token ids: ``responses`` holds one list of
    ids per conversation, the ids the sampler drew (the stop token included where the answer stopped),
    as :func:`utils.models.generate_texts` keeps them in ``Generation.token_ids`` and
    :func:`utils.evaluate.evaluate` in its ``token_ids`` column. Only the prompts are tokenised (with the
    chat template, as they were for sampling). ``finished`` defaults to "ends with the end-of-turn token".
    """
    from .models import chat_prompts, left_padding

    conversations, responses = list(conversations), [list(r) for r in responses]
    if len(conversations) != len(responses):
        raise ValueError(f"{len(conversations)} conversations but {len(responses)} answers")
    if any(not all(isinstance(t, int) for t in r) for r in responses):
        raise TypeError(
            "answers must be the sampled token ids (lists of ints: the `token_ids` column of evaluate's "
            "frame, or Generation.token_ids), not text: text encoded again is not what was sampled"
        )
    device = device if device is not None else torch.device("cpu")
    with left_padding(tokenizer):
        prompts = chat_prompts(tokenizer, conversations)
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    if finished is None:
        finished = [bool(r) and r[-1] == tokenizer.eos_token_id for r in responses]
    return _answered(tokenizer, conversations, enc, responses, finished, device)


def token_distributions(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """The model's whole next-token distribution at each response position of ``rollout``, as
    log-probabilities ``[B, T, vocabulary]`` (the logits divided by ``temperature``). With two models'
    distributions at the same sampled contexts, the KL at each position is exact: a sum over the
    vocabulary instead of one sampled token (Chapter 7 checks the k1/k2/k3 estimators against it).
    Padding positions hold a distribution too; mask them with ``rollout.response_mask``."""
    inputs = rollout.model_inputs()
    width = rollout.response.shape[1]  # the logits at position i predict token i + 1: keep the last width + 1
    logits = model(**inputs, logits_to_keep=width + 1).logits[:, :-1].float() / temperature
    return logits.log_softmax(-1)


@torch.no_grad()
def answer_logprobs(model, rollout: Rollout, temperature: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """``log pi(y | x)``: each answer's sampled tokens' log-probabilities summed, ``[B]`` (at
    ``temperature``: the logits divided by it). Rows of similar length run ``batch_size`` at a time."""
    model.eval()
    total = rollout.query_mask.sum(1) + rollout.response_mask.sum(1)
    order = torch.argsort(total.cpu(), stable=True)
    out = torch.empty(len(rollout))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        logp, _ = _token_logprobs(model, rollout.subset(rows), temperature, entropy=False)
        out[rows] = logp.sum(1).float().cpu()
    return out


def rollout_kl(policy, reference, rollout: Rollout, temperature: float = 1.0) -> float:
    """Monte-Carlo estimate of KL(policy || reference) in nats per answer, from answers *sampled from the
    policy* at ``temperature``: the mean over answers of ``log pi(y|x) - log pi_ref(y|x)`` on the sampled
    token ids (k1 summed over each answer's tokens; the reference at temperature 1). At temperature 1
    it is the KL that the PPO and GRPO loops log on their rollouts (``tests/test_rollout.py``)."""
    if policy is reference and temperature == 1.0:
        return 0.0
    lp = answer_logprobs(policy, rollout, temperature)
    lr = answer_logprobs(reference, rollout)
    return float((lp - lr).mean())


def sequence_kl(policy, reference, tokenizer, conversations, token_ids, temperature: float = 1.0) -> float:
    """:func:`rollout_kl` for answers the policy sampled for ``conversations``, given as their token ids
    (the ``token_ids`` column of :func:`utils.evaluate.evaluate`'s frame)."""
    device = next(policy.parameters()).device
    return rollout_kl(
        policy, reference, rollout_from_ids(tokenizer, conversations, token_ids, device=device), temperature
    )
