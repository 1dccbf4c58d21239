"""The course's sampler draws what ``generate`` draws, token for token, with the same seed.

``utils.sampling.sample_tokens`` replaces ``model.generate`` wherever the course samples (evaluation,
PPO and GRPO rollouts, preference data), so every number the chapters print rests on it being the
same draw. Each case below runs both from the same seed on the same batch and requires equal tokens:
greedy and sampled, temperature, top-k, left padding, grouped-query attention (the hub models'
layout), stop tokens that end rows early, a LoRA-wrapped model, and the models it hands to
``generate`` instead.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from utils.sampling import ROW_BLOCK, sample_tokens, supports_fast_sampling

V, B, P, NEW = 300, 48, 11, 30  # B: three of the sampler's row blocks, so finished rows are dropped
STOPS = list(range(3, 80))  # a quarter of the vocabulary stops a row: rows end at different steps


def llama(kv_heads=4, attn="sdpa", seed=1):
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=96,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a peakier distribution than random init, so greedy and top-k differ from sampling
        model.model.embed_tokens.weight.mul_(6)
    return model


def batch(padded: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(40, V, (B, P), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for i, n in enumerate(torch.randint(0, P - 2, (B,), generator=g).tolist()):
            ids[i, :n], mask[i, :n] = 0, 0
    return ids, mask


def with_generate(model, ids, mask, *, do_sample, temperature=1.0, top_k=None, stops=STOPS, seed=3):
    kw = dict(max_new_tokens=NEW, do_sample=do_sample, pad_token_id=0, eos_token_id=list(stops) or None)
    if do_sample:
        kw.update(temperature=temperature, top_k=top_k or 0, top_p=1.0)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1] :]


def with_course(model, ids, mask, *, do_sample, temperature=1.0, top_k=None, stops=STOPS, seed=3):
    torch.manual_seed(seed)
    return sample_tokens(
        model,
        ids,
        mask,
        max_new_tokens=NEW,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        stop_ids=stops,
        pad_id=0,
    )


CASES = [
    dict(do_sample=True),
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, top_k=5),
    dict(do_sample=False),
]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("case", CASES, ids=["sampled", "T=0.7", "top-k", "greedy"])
def test_same_tokens_as_generate(kv_heads, padded, case):
    model = llama(kv_heads)
    assert supports_fast_sampling(model)
    ids, mask = batch(padded)
    ref = with_generate(model, ids, mask, **case)
    ours = with_course(model, ids, mask, **case)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref), f"{int((ours != ref).sum())} of {ref.numel()} tokens differ"


def test_rows_stop_and_pad_as_generate_does():
    model = llama()
    ids, mask = batch(True)
    ours = with_course(model, ids, mask, do_sample=True)
    stopped = torch.isin(ours, torch.tensor(STOPS))
    assert stopped.any(1).float().mean() > 0.5, "the case should end most rows early"
    for row in ours.tolist():
        cut = next((i for i, t in enumerate(row) if t in STOPS), None)
        if cut is not None:
            assert all(t == 0 for t in row[cut + 1 :]), "after its stop token a row is padding"
    # when every row has stopped, decoding stops too: fewer columns than max_new_tokens
    many = list(range(3, 260))
    short = with_course(model, ids, mask, do_sample=True, stops=many)
    assert short.shape[1] < NEW
    assert torch.equal(short, with_generate(model, ids, mask, do_sample=True, stops=many))


def test_finished_rows_leave_the_decoding_step():
    """Rows that stopped are dropped from the step, a block of rows at a time, and the draws stay
    generate's (the cases above compare the tokens)."""
    model = llama()
    ids, mask = batch(True)
    widths = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: widths.append(a[0].shape[0]))
    try:
        with_course(model, ids, mask, do_sample=True)
    finally:
        hook.remove()
    assert widths[0] == B, "the prefill encodes every prompt"
    assert min(widths[1:]) < B and all(w % ROW_BLOCK == 0 for w in widths[1:]), widths


def test_no_stop_tokens_runs_to_the_limit():
    model = llama()
    ids, mask = batch(True)
    ours = with_course(model, ids, mask, do_sample=True, stops=())
    assert ours.shape == (B, NEW)
    assert torch.equal(ours, with_generate(model, ids, mask, do_sample=True, stops=()))


def test_lora_wrapped_model_samples_its_adapted_weights():
    from peft import LoraConfig, get_peft_model

    base = llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    assert supports_fast_sampling(model)
    ids, mask = batch(True)
    ref = with_generate(model, ids, mask, do_sample=True)
    assert torch.equal(with_course(model, ids, mask, do_sample=True), ref)
    assert not torch.equal(ref, with_generate(base, ids, mask, do_sample=True)), (
        "the adapter changes the draw"
    )


def test_models_it_does_not_decode_go_to_generate():
    model = llama(attn="eager")
    assert not supports_fast_sampling(model)
    ids, mask = batch(True)
    assert torch.equal(
        with_course(model, ids, mask, do_sample=True), with_generate(model, ids, mask, do_sample=True)
    )


def test_the_trained_course_model_samples_as_generate(tiny_model, tiny_tokenizer):
    from utils.models import chat_prompts, left_padding

    model = copy.deepcopy(tiny_model)
    convs = [[{"role": "user", "content": f"What colour is creature {i}?"}] for i in range(9)]
    with left_padding(tiny_tokenizer):
        enc = tiny_tokenizer(chat_prompts(tiny_tokenizer, convs), return_tensors="pt", padding=True)
    stops = model.generation_config.eos_token_id
    ref = with_generate(model, enc["input_ids"], enc["attention_mask"], do_sample=True, stops=stops)
    ours = with_course(model, enc["input_ids"], enc["attention_mask"], do_sample=True, stops=stops)
    assert torch.equal(ours, ref)
