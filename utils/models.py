"""A Llama-style model factory, and generation helpers shared by every chapter."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .config import course_seed
from .tokenizer import DOC_SEP, END

# ~0.9M parameters with a 1k vocabulary: learns TinyWorld on a CPU in a minute or so.
TINY_MODEL = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=384,
    max_position_embeddings=256,
)


def make_model(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised Llama-style causal LM sized by :data:`TINY_MODEL` (plus ``overrides``)."""
    cfg = dict(TINY_MODEL, **overrides)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(DOC_SEP),
        eos_token_id=tokenizer.convert_tokens_to_ids(END),
        attention_dropout=0.0,
        **cfg,
    )
    with torch.random.fork_rng():
        torch.manual_seed(course_seed(seed))
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids(END),
        tokenizer.convert_tokens_to_ids(DOC_SEP),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters; tied weights are counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def count_trainable(model) -> int:
    """Chapter 2's exercise: the number of parameters with ``requires_grad``, tied ones once."""
    return count_parameters(model, trainable_only=True)


@contextlib.contextmanager
def left_padding(tokenizer):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@dataclass
class Generation:
    text: str  # the decoded response, special tokens removed, stripped
    finished: bool  # stopped at the tokenizer's end-of-turn token (not cut off, not end-of-text)
    n_tokens: int  # tokens generated (the stop token included)
    token_ids: list[int] = field(default_factory=list)  # the tokens drawn, up to and including the stop token


def model_stop_ids(model) -> set[int]:
    """The token ids that end an answer: the model's generation config's end tokens."""
    ids = model.generation_config.eos_token_id
    return set(ids if isinstance(ids, list) else [ids])


def cut_at_stop(ids: list[int], stop_ids, eos_id: int) -> tuple[list[int], bool]:
    """The tokens a row drew, up to and including its first stop token (the sampler pads after it),
    and whether that stop was the end-of-turn token ``eos_id`` (an answer that ended its turn)."""
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    return (ids if cut is None else ids[: cut + 1]), (cut is not None and ids[cut] == eos_id)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 40,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> list[Generation]:
    """Continue each prompt string (already formatted; special tokens allowed) and decode.

    Greedy by default; with ``do_sample`` the draw is seeded, so results are reproducible (the
    prompts are answered ``batch_size`` at a time from one random stream, so a prompt's draw depends
    on its place in ``prompts``). Generation stops at any of the model's end tokens; ``finished`` is
    true only for the end-of-turn token (``tokenizer.eos_token``): a base model that ends a *document* has not
    answered properly.
    """
    from .sampling import sample_tokens

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_ids = model_stop_ids(model)
    out: list[Generation] = []
    with torch.random.fork_rng(), left_padding(tokenizer):
        torch.manual_seed(course_seed(seed))
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            new = sample_tokens(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                stop_ids=stop_ids,
                pad_id=tokenizer.pad_token_id,
            ).tolist()
            for ids in new:
                kept, finished = cut_at_stop(ids, stop_ids, tokenizer.eos_token_id)
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                out.append(Generation(text, finished, len(kept), kept))
    model.train(was_training)
    return out


def chat_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Render conversations with the chat template, ready for the assistant's next turn."""
    from .tokenizer import memo_render

    def render(c):
        return tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)

    return [memo_render(tokenizer, "prompt", c, lambda c=c: render(c)) for c in conversations]


def generate_responses(model, tokenizer, conversations: list[list[dict]], **kwargs) -> list[Generation]:
    """The assistant's next turn for each conversation (see :func:`generate_texts` for options)."""
    return generate_texts(model, tokenizer, chat_prompts(tokenizer, conversations), **kwargs)


def load_quantized(model, quantization_config, device_map: str | None = None):
    """Reload ``model`` with a ``transformers`` quantization config (e.g. bitsandbytes 4-bit).

    Quantisation happens at load time, so the model goes through a temporary folder.
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    from .progress import quiet_transformers

    device_map = device_map or next(model.parameters()).device.type
    with quiet_transformers(), tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quantization_config, device_map=device_map, use_safetensors=True
        )
