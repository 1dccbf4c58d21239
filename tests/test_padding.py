"""Rows computed in groups of similar length give the per-row results and the gradients of the padded
batch (to float rounding), in the batch's order; the grouping holds every row once and cuts padding."""

import copy

import pytest
import torch

from utils.padding import by_length, in_order, length_groups, pad_right


def padded_area(lengths, groups):
    return sum(len(g) * int(max(lengths[i] for i in g.tolist())) for g in groups)


@pytest.mark.parametrize(
    "lengths",
    [
        [5] * 10,
        [3, 40, 4, 38, 5, 5, 6, 41],
        list(range(1, 33)),
        [7],
        [12, 12, 13, 60, 61, 12, 13, 14, 62, 12, 11, 10, 60, 59, 11, 12],
    ],
)
def test_groups_hold_every_row_once_and_cut_padding(lengths):
    lengths = torch.tensor(lengths)
    groups = length_groups(lengths, max_groups=4, overhead=8)
    rows = torch.cat(groups).tolist()
    assert sorted(rows) == list(range(len(lengths)))
    assert len(groups) <= 4
    assert padded_area(lengths, groups) <= len(lengths) * int(lengths.max())
    for g in groups:  # a group is a run of the sorted lengths: no longer row sits in an earlier group
        assert len(g) > 0
    maxima = [int(lengths[g].max()) for g in groups]
    minima = [int(lengths[g].min()) for g in groups]
    assert all(mx <= mn for mx, mn in zip(maxima, minima[1:]))


def test_the_cut_is_the_cheapest():
    lengths = torch.tensor([10] * 12 + [50] * 4)
    # one group: 16 x 50 = 800; two: 12 x 10 + 4 x 50 = 320, worth it with an overhead of 100
    assert len(length_groups(lengths, max_groups=4, overhead=100)) == 2
    # an overhead larger than the padding saved keeps one group
    assert len(length_groups(lengths, max_groups=4, overhead=1000)) == 1
    assert len(length_groups(lengths, max_groups=1, overhead=0)) == 1


def test_in_order_restores_the_batch_order_and_is_differentiable():
    x = torch.randn(7, 3, requires_grad=True)
    groups = [torch.tensor([4, 0]), torch.tensor([6, 1, 3]), torch.tensor([2, 5])]
    out = in_order([x[g] * 2 for g in groups], groups)
    assert torch.equal(out, x * 2)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_pad_right():
    x = torch.ones(2, 3)
    assert pad_right(x, 3) is x
    assert torch.equal(pad_right(x, 5), torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 0, 0]]))


def _batch(tokenizer):
    from utils.dpo import pair_batch

    rows = [
        {
            "prompt": [{"role": "user", "content": "What colour is Alba?" + " Please" * k}],
            "chosen": [{"role": "assistant", "content": "Alba is red." + " Truly." * (3 * k)}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
        for k in range(6)
    ]
    return pair_batch(tokenizer, rows)


def test_by_length_matches_the_padded_batch_values_and_gradients(tiny_model, tiny_tokenizer):
    from utils.logprobs import sequence_logprobs

    batch = _batch(tiny_tokenizer)
    lengths = batch["attention_mask"].sum(1)
    assert len(length_groups(lengths)) > 1, "the case should be split into groups"

    def logps(model, b):
        return sequence_logprobs(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
        )

    padded_model, grouped_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    padded = logps(padded_model, batch)
    grouped = by_length(batch, lambda b: logps(grouped_model, b))
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-5)
    weights = torch.arange(1.0, len(padded) + 1)  # a loss that tells the rows apart
    (padded * weights).sum().backward()
    (grouped * weights).sum().backward()
    for (name, a), b in zip(padded_model.named_parameters(), grouped_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_ppo_log_probs_and_values_match_the_padded_rollout(tiny_model, tiny_tokenizer, monkeypatch):
    import utils.padding

    monkeypatch.setattr(utils.padding, "GROUP_OVERHEAD", 16)  # eight rows: split them anyway
    from utils.reward import reward_model_from
    from utils.rollout import Rollout, _token_logprobs, _token_values, token_logprobs, token_values

    convs = [[{"role": "user", "content": "What colour is Alba?" + " Please" * k}] for k in range(8)]
    answers = [[5 + (i % 50) for i in range(n)] for n in (3, 30, 4, 4, 28, 5, 3, 31)]
    enc = tiny_tokenizer(
        [tiny_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    width = max(len(a) for a in answers)
    response = torch.tensor([a + [0] * (width - len(a)) for a in answers])
    mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])
    roll = Rollout(
        convs,
        enc["input_ids"],
        enc["attention_mask"],
        response,
        mask,
        torch.ones(8, dtype=torch.bool),
        [""] * 8,
    )
    lengths = roll.query_mask.sum(1) + roll.response_mask.sum(1)
    assert len(length_groups(lengths)) > 1, "the case should be split into groups"
    lp, ent = token_logprobs(tiny_model, roll)
    ref_lp, ref_ent = _token_logprobs(tiny_model, roll, 1.0)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    vm = reward_model_from(tiny_model, tiny_tokenizer)
    torch.testing.assert_close(token_values(vm, roll), _token_values(vm, roll), rtol=1e-5, atol=1e-5)


def test_token_mean_matches_the_padded_loss_and_gradient(tiny_model, tiny_tokenizer):
    from utils.padding import token_mean
    from utils.pretrain import next_token_loss

    batch = _batch(tiny_tokenizer)
    batch["labels"][3] = -100  # a row with nothing to predict still counts right

    def loss(model, b):
        return next_token_loss(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
        )

    padded_model, grouped_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    padded = loss(padded_model, batch)
    grouped = token_mean(batch, lambda b: loss(grouped_model, b))
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-6)
    padded.backward()
    grouped.backward()
    for (name, a), b in zip(padded_model.named_parameters(), grouped_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
