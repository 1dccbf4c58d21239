"""Log-probabilities of labelled tokens: one helper for every loss that scores a whole answer.

Labels follow the ``transformers`` convention: the same length as ``input_ids``, not shifted
(the logits at position ``t`` predict ``labels[t + 1]``), ``IGNORE`` (-100) where nothing is
predicted (the prompt, padding). As in the rlhf-book code, one function serves both uses:

* summed over the answer's tokens: ``log pi(y | x)``, what DPO compares (Chapter 4);
* averaged over them: what ORPO turns into odds (Chapter 5), and SimPO uses.
"""

from __future__ import annotations

import torch

IGNORE = -100


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(labels[t + 1] | tokens <= t)`` at every position, and the mask of labelled ones.

    logits: ``[batch, seq, vocab]``; labels: ``[batch, seq]``. Returns two ``[batch, seq - 1]``
    tensors: the log-probabilities (0 where unlabelled) and a boolean mask.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or, with ``average``, mean) of ``log p(label_t | tokens < t)`` over each row's labelled
    tokens: ``[batch]``."""
    logp, mask = label_logprobs(logits, labels)
    total = logp.sum(-1)
    return total / mask.sum(-1) if average else total


def average_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each row's labelled tokens (ORPO's and SimPO's length-normalised
    score): ``[batch]``."""
    return sequence_logprobs(logits, labels, average=True)
