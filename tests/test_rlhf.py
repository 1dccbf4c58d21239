"""The reference reward model (utils.rlhf): Bradley-Terry loss, scalar head, and that it learns
the annotators' preferences from the course's preference pairs."""
import math

import pytest
import torch

from utils.rlhf import bradley_terry_loss, pairwise_accuracy, reward_model_from, reward_scores, train_reward_model


def test_bradley_terry_loss_values_and_gradient():
    r = torch.tensor([0.3, -1.0, 2.0])
    assert math.isclose(bradley_terry_loss(r, r).item(), math.log(2), rel_tol=1e-6)
    rc = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = bradley_terry_loss(rc, torch.tensor([0.0, 0.0]))
    loss.backward()
    assert (rc.grad < 0).all(), "raising the chosen reward must lower the loss"
    assert bradley_terry_loss(torch.tensor([50.0]), torch.tensor([-50.0])).item() < 1e-6
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-500.0]), torch.tensor([500.0])))


def test_reward_model_has_a_scalar_head_on_the_same_backbone(tiny_model, tiny_tokenizer):
    rm = reward_model_from(tiny_model, tiny_tokenizer)
    prompts = [[{"role": "user", "content": "What colour is Alba?"}]] * 2
    completions = [[{"role": "assistant", "content": "Alba is blue."}], [{"role": "assistant", "content": "blue."}]]
    scores = reward_scores(rm, tiny_tokenizer, prompts, completions)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]
    emb = rm.get_input_embeddings().weight
    assert torch.equal(emb, tiny_model.get_input_embeddings().weight) and emb.data_ptr() != tiny_model.get_input_embeddings().weight.data_ptr()


@pytest.mark.slow
def test_reward_model_learns_the_preferences():
    from utils.dpo import get_preference_data
    from utils.sft import get_sft_model

    sft, tok = get_sft_model(show_progress=False)
    split = get_preference_data(show_progress=False).train_test_split(test_size=0.2, seed=0)
    rm = reward_model_from(sft, tok)
    history = train_reward_model(rm, tok, split["train"], epochs=2, lr=3e-4, show_progress=False)
    assert sum(h["loss"] for h in history[-5:]) / 5 < math.log(2)
    acc = pairwise_accuracy(rm, tok, split["test"])
    assert acc["vs_labels"] > 0.6 and acc["vs_gold"] > 0.75, acc  # measured 0.70 and 0.84 (ceiling 0.85)
