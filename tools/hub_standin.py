"""Build a local stand-in of everything the ``hub`` profile downloads, so it runs offline.

No machine the course is tested on reaches the Hugging Face Hub, yet the ``hub`` profile must work
for the student who switches to it on Colab. This tool writes, into one folder, a stand-in for each
Hub name of the profile, laid out as ``<folder>/<owner>/<name>`` (a dataset config in a subfolder):

* ``HuggingFaceTB/SmolLM2-135M`` and ``-Instruct``: ``LlamaForCausalLM`` with SmolLM2-135M's
  architecture config (``--size real``: 30 layers, hidden 576, 9 heads, 3 KV heads, vocabulary
  49,152, tied embeddings, rope theta 100,000) or a few-layer variant of the same class and shape
  rules (``--size small``, the default, for tests); random weights; safetensors.
* their tokenizers: byte-level BPE with SmolLM2's special tokens at its ids (``<|endoftext|>`` = 0,
  ``<|im_start|>`` = 1, ``<|im_end|>`` = 2, ...), the base's and the instruct model's bos/eos/pad
  tokens, and the instruct model's ChatML chat template (no ``{% generation %}`` markers, so the
  course's patching path runs).
* ``Skywork/Skywork-Reward-V2-Qwen3-0.6B``: ``Qwen3ForSequenceClassification`` with one output,
  small, and a Qwen-style tokenizer (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ChatML).
* ``Salesforce/wikitext/wikitext-2-raw-v1``, ``tatsu-lab/alpaca``,
  ``trl-lib/ultrafeedback_binarized``, ``openai/gsm8k/main``: parquet files with the real column
  names and types (wikitext's blank lines and `` = Heading = `` lines included; GSM8K's worked
  answers with ``<<calculator>>`` annotations and a final ``#### <number>`` line).

Point the course at it with ``COURSE_HUB_MIRROR=<folder>`` (see ``utils/hub.py``): every Hub name
is then read from the folder and nothing is downloaded. The texts are TinyWorld's and simple
templates: the stand-in proves that the code paths run, not what a real model learns.

    python tools/hub_standin.py /tmp/hub-standin                 # small (tests)
    python tools/hub_standin.py /tmp/hub-real --size real        # real architecture (sizing)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M's config.json
    architectures=["LlamaForCausalLM"],
    attention_bias=False,
    attention_dropout=0.0,
    bos_token_id=0,
    eos_token_id=0,
    hidden_act="silu",
    hidden_size=576,
    initializer_range=0.041666666666666664,
    intermediate_size=1536,
    max_position_embeddings=8192,
    mlp_bias=False,
    model_type="llama",
    num_attention_heads=9,
    num_hidden_layers=30,
    num_key_value_heads=3,
    pretraining_tp=1,
    rms_norm_eps=1e-05,
    rope_scaling=None,
    rope_theta=100000,
    tie_word_embeddings=True,
    use_cache=True,
    vocab_size=49152,
)
# the few-layer variant for tests: same class, head count and GQA ratio, tied embeddings
SMALL_LM = dict(hidden_size=72, intermediate_size=192, num_hidden_layers=2, max_position_embeddings=1024)
QWEN3_RM_SMALL = dict(  # Qwen3ForSequenceClassification, shrunk (the real one: 28 layers, hidden 1024)
    architectures=["Qwen3ForSequenceClassification"],
    model_type="qwen3",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-06,
    rope_theta=1000000,
    tie_word_embeddings=True,
    num_labels=1,
)

SMOLLM2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
    "<empty_output>",
]  # fmt: skip
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-135M-Instruct's chat template, verbatim: ChatML with a default system prompt
SMOLLM2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
PLAIN_CHATML = (  # a Qwen-style ChatML template without a default system prompt
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

LM_NAMES = ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct")
JUDGE_NAME = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
ALPACA = "tatsu-lab/alpaca"
ULTRAFEEDBACK = "trl-lib/ultrafeedback_binarized"
GSM8K = ("openai/gsm8k", "main")


def _texts(n_documents: int) -> list[str]:
    from utils.world import pretraining_documents

    return [d["text"] for d in pretraining_documents(n_documents)]


def _qa(n: int, seed: int, offset: int = 0) -> list[tuple[str, str, str, str]]:
    """(instruction, input, good answer, worse answer) from TinyWorld's single-turn requests, a
    third of them with an ``input`` field, as Alpaca has."""
    from utils.world import make_world, parse_request, respond, single_turn_prompts

    world, rng = make_world(), random.Random(seed)
    prompts = single_turn_prompts(world)
    random.Random(0).shuffle(prompts)  # one order for every call: distinct prompts, as in the real sets
    out = []
    for i in range(n):
        _, text = prompts[(offset + i) % len(prompts)]
        req = parse_request([{"role": "user", "content": text}], world)
        good = respond(world, req, "good", rng)
        worse = respond(
            world, req, rng.choice(["rude", "verbose", "comply" if req.kind == "unsafe" else "wrong"]), rng
        )
        if rng.random() < 0.3:
            out.append(("Answer the question below.", text, good, worse))
        else:
            out.append((text, "", good, worse))
    return out


def _tokenizer(texts: list[str], specials: list[str], vocab_size: int):
    # GPT-2-style pre-tokenisation, as SmolLM2's and Qwen's: no space added before the first word
    from utils.tokenizer import train_bpe

    return train_bpe(texts, vocab_size, specials, add_prefix_space=False)


def _save_tokenizer(tok, folder: Path, *, bos, eos, pad, template) -> None:
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token="<|endoftext|>" if eos == "<|endoftext|>" else None,
        pad_token=pad,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    if template is not None:
        wrapped.chat_template = template
    wrapped.save_pretrained(folder)


def lm_config(size: str, vocab_size: int = 2048) -> dict:
    """SmolLM2-135M's config (``real``), or its few-layer variant with the stand-in's vocabulary."""
    return dict(SMOLLM2_135M, **(dict(SMALL_LM, vocab_size=vocab_size) if size == "small" else {}))


def model_from(cfg: dict, seed: int | None = None):
    """A randomly initialised model of the class ``cfg["architectures"][0]``, configured by ``cfg``."""
    import torch
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(
        cfg["model_type"], **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    )
    return getattr(transformers, cfg["architectures"][0])(config)


def _save_model(cfg: dict, folder: Path, seed: int) -> None:
    model_from(cfg, seed).save_pretrained(folder, safe_serialization=True)


def _parquet(rows: dict, path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def build(root: str | Path, size: str = "small", n_rows: int = 800, seed: int = 0) -> Path:
    """Write the stand-in under ``root`` and return it. ``size``: ``small`` or ``real``."""
    if size not in ("small", "real"):
        raise ValueError(f"size must be 'small' or 'real', got {size!r}")
    from utils.world import single_turn_prompts

    n_prompts = len(single_turn_prompts())  # Alpaca, UltraFeedback's train and test: distinct prompts
    if n_rows + n_rows + max(n_rows // 10, 20) > n_prompts:
        raise ValueError(
            f"n_rows={n_rows} is too many: TinyWorld has {n_prompts:,} distinct single-turn prompts"
        )
    root = Path(root)
    texts = _texts(2000)
    rng = random.Random(seed)

    # tokenizers: SmolLM2's special tokens at their ids; the real vocabulary (49,152) is larger than
    # the stand-in's BPE, which is fine: every id the tokenizer makes is below the model's vocab
    vocab = 2048
    smol_tok = _tokenizer(texts, SMOLLM2_SPECIALS, vocab)
    lm_cfg = lm_config(size, vocab)
    for i, name in enumerate(LM_NAMES):
        folder = root / name
        instruct = name.endswith("Instruct")
        cfg = dict(lm_cfg, **({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2} if instruct else {}))
        _save_model(cfg, folder, seed + i)
        if instruct:
            _save_tokenizer(
                smol_tok,
                folder,
                bos="<|im_start|>",
                eos="<|im_end|>",
                pad="<|im_end|>",
                template=SMOLLM2_CHATML,
            )
        else:
            _save_tokenizer(
                smol_tok, folder, bos="<|endoftext|>", eos="<|endoftext|>", pad=None, template=SMOLLM2_CHATML
            )

    qwen_tok = _tokenizer(texts, QWEN_SPECIALS, 1024)
    judge_cfg = dict(QWEN3_RM_SMALL, vocab_size=1024, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    _save_model(judge_cfg, root / JUDGE_NAME, seed + 2)
    _save_tokenizer(
        qwen_tok, root / JUDGE_NAME, bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=PLAIN_CHATML
    )

    # wikitext: one line per row, blank lines and headings as in the real files
    lines = []
    for i, t in enumerate(texts):
        if i % 25 == 0:
            lines += ["", f" = Section {i // 25} = ", ""]
        lines.append(" " + t.replace(".", " .") + " ")
    folder = root / WIKITEXT[0] / WIKITEXT[1]
    n_val = len(lines) // 20
    _parquet({"text": lines[: -2 * n_val]}, folder / "train-00000-of-00001.parquet")
    _parquet({"text": lines[-2 * n_val : -n_val]}, folder / "validation-00000-of-00001.parquet")
    _parquet({"text": lines[-n_val:]}, folder / "test-00000-of-00001.parquet")

    # alpaca: instruction, input, output, text (the prompt-formatted record)
    qa = _qa(n_rows, seed, offset=0)
    _parquet(
        {
            "instruction": [q for q, _, _, _ in qa],
            "input": [x for _, x, _, _ in qa],
            "output": [a for _, _, a, _ in qa],
            "text": [f"### Instruction:\n{q}\n\n### Input:\n{x}\n\n### Response:\n{a}" for q, x, a, _ in qa],
        },
        root / ALPACA / "data" / "train-00000-of-00001.parquet",
    )

    # ultrafeedback_binarized (trl-lib): implicit prompt, conversational chosen/rejected, scores
    for split, n in (("train", n_rows), ("test", max(n_rows // 10, 20))):
        rows = {"chosen": [], "rejected": [], "score_chosen": [], "score_rejected": []}
        # train and test prompts are distinct, and distinct from Alpaca's
        for q, x, good, worse in _qa(n, seed + 1, offset=n_rows if split == "train" else 2 * n_rows):
            user = {"role": "user", "content": f"{q}\n\n{x}" if x else q}
            rows["chosen"].append([user, {"role": "assistant", "content": good}])
            rows["rejected"].append([user, {"role": "assistant", "content": worse}])
            rows["score_chosen"].append(float(rng.choice([7.0, 8.0, 9.0, 10.0])))
            rows["score_rejected"].append(float(rng.choice([2.0, 3.0, 4.0, 5.0])))
        _parquet(rows, root / ULTRAFEEDBACK / "data" / f"{split}-00000-of-00001.parquet")
    # gsm8k (main): question, answer = worked solution + "#### <number>"; train and test
    from utils.world import make_world

    names = sorted(make_world().creatures)
    for split, n, offset in (("train", max(n_rows // 2, 40), 0), ("test", max(n_rows // 8, 20), 10_000)):
        questions, answers = [], []
        for i in range(n):
            k = offset + i
            who, a, b, c = names[k % len(names)], 2 + k % 17, 3 + (k // 17) % 29, 1 + (k // 493) % 7
            questions.append(
                f"{who} picks {a} berries in the morning and {b} in the afternoon, then eats {c}. "
                f"How many berries does {who} have left?"
            )
            total = a + b - c
            answers.append(
                f"{who} picks {a} + {b} = <<{a}+{b}={a + b}>>{a + b} berries.\n"
                f"After eating {c}, {who} has {a + b} - {c} = <<{a + b}-{c}={total}>>{total} left.\n"
                f"#### {total}"
            )
        _parquet(
            {"question": questions, "answer": answers},
            root / GSM8K[0] / GSM8K[1] / f"{split}-00000-of-00001.parquet",
        )
    (root / "STANDIN.json").write_text(json.dumps({"size": size, "seed": seed, "n_rows": n_rows}) + "\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--size", choices=["small", "real"], default="small")
    ap.add_argument("--rows", type=int, default=800, help="rows of the Alpaca and UltraFeedback stand-ins")
    args = ap.parse_args()
    print(build(args.folder, args.size, args.rows))


if __name__ == "__main__":
    main()
