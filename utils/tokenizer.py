"""A byte-level BPE tokenizer trained on TinyWorld, with a chat template TRL understands.

The chat template wraps each assistant turn in ``{% generation %}...{% endgeneration %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` - and with it TRL's
``assistant_only_loss`` - can tell which tokens the assistant wrote.
"""

from __future__ import annotations

import json
import weakref
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DOC_SEP = "<|endoftext|>"  # between pretraining documents
PAD = "<|pad|>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
SPECIAL_TOKENS = [PAD, DOC_SEP, SYSTEM, USER, ASSISTANT, END]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    + SYSTEM
    + "{{ message['content'] }}"
    + END
    + "{%- elif message['role'] == 'user' -%}"
    + USER
    + "{{ message['content'] }}"
    + END
    + "{%- elif message['role'] == 'assistant' -%}"
    + ASSISTANT
    + "{% generation %}{{ message['content'] }}"
    + END
    + "{% endgeneration %}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    *,
    add_prefix_space: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, ``special_tokens`` first
    (ids 0, 1, ...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Every word gets a leading-space byte (``add_prefix_space``), so "Alba" is the same token at
    the start of a document, after a chat-role marker, and mid-sentence.
    """
    return wrap_tokenizer(train_bpe(texts, vocab_size, SPECIAL_TOKENS, min_frequency=min_frequency))


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` with the course's special tokens and chat template."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END,
        pad_token=PAD,
        bos_token=DOC_SEP,
        unk_token=None,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def check_chat_template(tokenizer) -> None:
    """Raise a clear error when ``tokenizer`` cannot do assistant-only loss."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the tokenizer has no chat template: set tokenizer.chat_template "
            "(see utils.tokenizer.CHAT_TEMPLATE for one with generation markers)"
        )
    if "{% generation %}" not in template.replace("{%- generation %}", "{% generation %}"):
        raise ValueError(
            "the chat template has no {% generation %} ... {% endgeneration %} markers "
            "around assistant turns, so the assistant tokens cannot be found for "
            "assistant-only loss; wrap each assistant message in them"
        )


# Chat templates rendered once per conversation: the course renders the same prompts for every model
# it evaluates and the same pairs in every epoch of every DPO run, and a render costs 0.1-0.3 ms.
_RENDERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
RENDER_MEMO_LIMIT = 200_000  # entries per tokenizer before the memo starts over


def memo_render(tokenizer, what: str, conversation, make: Callable):
    """``make()``, computed once per tokenizer, chat template, vocabulary size, ``what`` (a label for the
    rendering and its options) and conversation, then returned from a memo. Callers get the memo's
    value itself: return immutable values (strings) or copy before changing them."""
    try:
        key = (what, tokenizer.chat_template, len(tokenizer), json.dumps(conversation, sort_keys=True))
        table = _RENDERED.setdefault(tokenizer, {})
    except TypeError:  # a conversation json cannot write, or a tokenizer that cannot be weakly keyed
        return make()
    if key not in table:
        if len(table) >= RENDER_MEMO_LIMIT:
            table.clear()
        table[key] = make()
    return table[key]
