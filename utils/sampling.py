"""Sampling from the course's Llama-style models: what ``generate`` draws, token for token, faster.

For a model as small as the tiny profile's, ``model.generate`` spends most of each decoding step
outside arithmetic: it rebuilds the attention mask, runs its logits processors and stopping
criteria, grows its key/value cache by concatenation, and goes through the model's general forward.
:func:`sample_tokens` encodes the prompt with the model's own forward (the prefill, exactly as
``generate`` does it) and then decodes with a preallocated key/value cache, calling the model's own
modules (norms, projections, MLP, the rotary embedding; LoRA layers too) and doing attention
itself, with the operations ``generate``'s SDPA path uses. It draws from the same global random
stream in the same order, so with the same seed it samples the same tokens (``tests/test_sampling.py``
checks that token for token against ``generate``, greedy and sampled, with and without padding).

Models it does not know (another architecture, a quantised model, an attention implementation other
than PyTorch's SDPA, prompt-learning adapters) are handed to ``generate`` with the same settings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _llama(model):
    """The ``LlamaForCausalLM`` that :func:`sample_tokens` can decode inside ``model`` (a LoRA wrapper's
    base model too), or ``None``."""
    from transformers import LlamaForCausalLM

    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        if any(c.is_prompt_learning for c in model.peft_config.values()):
            return None  # its forward adds virtual tokens the decoding step would not
        model = model.get_base_model()
    if not isinstance(model, LlamaForCausalLM):
        return None
    if getattr(model, "hf_quantizer", None) is not None or model.config._attn_implementation != "sdpa":
        return None
    gc = model.generation_config  # logits processors it would add that the sampler does not apply
    if (
        (gc.repetition_penalty or 1.0) != 1.0
        or (gc.no_repeat_ngram_size or 0) > 0
        or gc.bad_words_ids
        or gc.suppress_tokens
        or gc.begin_suppress_tokens
        or (gc.min_length or 0) > 0
        or gc.min_new_tokens
        or gc.forced_bos_token_id is not None
        or gc.forced_eos_token_id is not None
        or gc.sequence_bias
    ):
        return None
    return model


def supports_fast_sampling(model) -> bool:
    """Whether :func:`sample_tokens` decodes ``model`` itself (otherwise it calls ``generate``)."""
    return _llama(model) is not None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _probs(logits, temperature, top_k):
    """``generate``'s sampling distribution for ``logits [rows, V]``: temperature, then top-k, softmax."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return F.softmax(logits, dim=-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Chapter 1's exercise: one token id per row of ``logits [batch, vocab]`` - greedy at
    ``temperature`` 0, else a draw from :func:`_probs`' temperature-scaled, top-k-filtered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(_probs(logits, temperature, top_k), 1, generator=generator).squeeze(-1)


# Bump when the course would draw other tokens for the same seed (the sampler, or how generate_texts
# splits prompts into random streams): cached answers and the preference pairs' recipe are keyed by it.
# 1: this sampler; 2: 256 prompts per stream (was 128).
SAMPLER_VERSION = 2

# Rows are dropped from the decoding step in blocks of this many (the batch must be a multiple of it):
# a matrix product computes a row the same way whatever the number of rows, as long as that number
# stays a multiple of the BLAS kernel's row block and clear of its small-matrix path (checked by
# tests/test_sampling.py against ``generate``, which computes every row to the end).
ROW_BLOCK = 16


class _Layer:
    """One decoder layer's weights, read once per call: the query/key/value and gate/up projections
    concatenated, so a step makes two matrix products where the model makes five (the same products
    column by column); LoRA and other wrapped projections are called as modules instead."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn, self.mlp = layer, attn, mlp
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.groups = attn.num_key_value_groups
        plain = all(type(m) is torch.nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.qkv = None
        if plain and all(m.bias is None for m in (attn.q_proj, attn.k_proj, attn.v_proj)):
            self.qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            self.split = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.gate_up = None
        if all(type(m) is torch.nn.Linear and m.bias is None for m in (mlp.gate_proj, mlp.up_proj)):
            self.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.inter = mlp.gate_proj.out_features

    def project_qkv(self, h):
        if self.qkv is None:
            a = self.attn
            return a.q_proj(h), a.k_proj(h), a.v_proj(h)
        return F.linear(h, self.qkv).split(self.split, dim=-1)

    def mlp_out(self, h):
        if self.gate_up is None:
            return self.mlp(h)
        gate, up = F.linear(h, self.gate_up).split([self.inter, self.inter], dim=-1)
        return self.mlp.down_proj(self.mlp.act_fn(gate) * up)


@torch.no_grad()
def sample_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_ids=(),
    pad_id: int = 0,
) -> torch.Tensor:
    """Continue each row of ``input_ids`` (``[B, P]``, left-padded, ``attention_mask`` 0 on padding).

    Returns the new tokens, ``[B, n]`` with ``n <= max_new_tokens``: a row that drew one of
    ``stop_ids`` keeps it and is ``pad_id`` after it; decoding stops once every row has stopped, as
    ``generate``'s output does (its columns after the prompt). Draws come from torch's global random
    stream (seed it before the call); ``do_sample=False`` is greedy. The caller sets eval mode.
    """
    lm = _llama(model)
    if lm is None:
        return _generate(
            model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, stop_ids, pad_id
        )
    B, P = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    padded = not bool((attention_mask == 1).all())
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    # 1. prefill: the model's own forward over the prompt, as generate runs it
    out = lm(
        input_ids=input_ids,
        attention_mask=attention_mask if padded else None,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, "cache", None)
    cache = getattr(out, "past_key_values", None) if cache is None else cache
    width = P + max_new_tokens
    keys, values = [], []  # preallocated for the whole answer, filled one column per step
    for i in range(len(lm.model.layers)):
        k, v = _cached(cache, i)
        keys.append(k.new_empty((B, k.shape[1], width, k.shape[3])))
        values.append(v.new_empty((B, v.shape[1], width, v.shape[3])))
        keys[i][:, :, :P], values[i][:, :, :P] = k, v
    # the key mask of the decoding steps (padding off; no mask at all without padding, as generate)
    key_mask = torch.ones((B, 1, 1, width), dtype=torch.bool, device=device)
    key_mask[:, 0, 0, :P] = attention_mask.bool()
    logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
    del out, cache

    # 2. decode, one token of every row per step
    key_mask = key_mask if padded else None
    position = position_ids[:, -1:]
    layers = [_Layer(layer) for layer in lm.model.layers]
    embed, norm, head, rotary = lm.model.embed_tokens, lm.model.norm, lm.lm_head, lm.model.rotary_emb
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    unfinished = torch.ones(B, dtype=torch.long, device=device)
    compact = len(stops) > 0 and B % ROW_BLOCK == 0
    rows = None  # the batch rows still decoded (None: all of them, in order)
    tokens = []
    for step in range(max_new_tokens):
        # draw every row's next token: the random stream is spent as generate spends it (one
        # multinomial over the whole batch), whichever rows are still decoded
        if do_sample:
            p = _probs(logits, temperature, top_k)
            if rows is not None:
                full = p.new_full((B, p.shape[1]), 1.0 / p.shape[1])
                full[rows] = p
                p = full
            nxt = torch.multinomial(p, num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(logits, dim=-1)
            if rows is not None:
                nxt = torch.full((B,), pad_id, dtype=nxt.dtype, device=device).index_put_((rows,), nxt)
        if len(stops):
            nxt = nxt * unfinished + pad_id * (1 - unfinished)
            unfinished = unfinished & ~torch.isin(nxt, stops)
        tokens.append(nxt)
        if step == max_new_tokens - 1:
            break
        if len(stops):
            left = int(unfinished.sum())
            if left == 0:
                break
            current = B if rows is None else len(rows)
            if compact and current - left >= ROW_BLOCK:  # drop finished rows, a block at a time
                keep = unfinished.nonzero().squeeze(1)
                keep = keep if rows is None else torch.searchsorted(rows, keep)
                extra = -left % ROW_BLOCK  # fill the last block with finished rows
                if extra:
                    done = torch.ones(current, dtype=torch.bool, device=device)
                    done[keep] = False
                    keep = torch.sort(torch.cat([keep, done.nonzero().squeeze(1)[:extra]]))[0]
                keys = [k[keep] for k in keys]
                values = [v[keep] for v in values]
                key_mask = None if key_mask is None else key_mask[keep]
                position = position[keep]
                rows = keep if rows is None else rows[keep]
        # one decoding step for the rows still decoded
        n = B if rows is None else len(rows)
        length = P + step + 1
        position = position + 1
        x = embed((nxt if rows is None else nxt[rows])[:, None])
        cos, sin = rotary(x, position)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = None if key_mask is None else key_mask[..., :length]
        for i, L in enumerate(layers):
            h = L.layer.input_layernorm(x)
            q, k, v = L.project_qkv(h)
            q = q.view(n, 1, -1, L.head_dim).transpose(1, 2)
            k = k.view(n, 1, -1, L.head_dim).transpose(1, 2)
            v = v.view(n, 1, -1, L.head_dim).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            keys[i][:, :, length - 1 : length] = k
            values[i][:, :, length - 1 : length] = v
            kk, vv = keys[i][:, :, :length], values[i][:, :, :length]
            if L.groups > 1 and mask is None:
                o = F.scaled_dot_product_attention(q, kk, vv, scale=L.scaling, enable_gqa=True)
            elif L.groups > 1:  # generate packs the query heads onto their key/value head
                o = F.scaled_dot_product_attention(
                    q.reshape(n, -1, L.groups, L.head_dim), kk, vv, attn_mask=mask, scale=L.scaling
                )
            else:
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=L.scaling)
            o = o.reshape(n, -1, 1, L.head_dim).transpose(1, 2).contiguous().reshape(n, 1, -1)
            x = x + L.attn.o_proj(o)
            x = x + L.mlp_out(L.layer.post_attention_layernorm(x))
        logits = head(norm(x))[:, -1].to(copy=True, dtype=torch.float32)
    return torch.stack(tokens, 1)


def _cached(cache, i):
    """Layer ``i``'s keys and values from the prefill's cache (``DynamicCache`` or the legacy tuple)."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache[i][0], cache[i][1]


def _generate(
    model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, stop_ids, pad_id
):
    """The same call made through ``generate`` (models :func:`sample_tokens` does not decode itself)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k or 0, top_p=1.0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    kwargs["eos_token_id"] = sorted(set(stop_ids)) or None
    seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return seqs[:, input_ids.shape[1] :]
