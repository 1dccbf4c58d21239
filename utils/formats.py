"""The row formats TRL's trainers read, and conversions between them (no TinyWorld, no network).

* language modelling: ``text``;
* SFT: ``messages`` (a chat), or Alpaca's ``instruction``/``input``/``output``;
* preferences: ``prompt``/``chosen``/``rejected``, each a list of chat messages; an *implicit*
  prompt is one that ``chosen`` and ``rejected`` both repeat in full.
"""

from __future__ import annotations


def require_columns(dataset, columns, purpose: str) -> None:
    """Raise a clear error if ``dataset`` lacks any of ``columns``."""
    have = set(dataset.column_names)
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(
            f"{purpose} needs the column(s) {missing}, but the dataset has {sorted(have)}. "
            f"Rename or add them (e.g. dataset.rename_column('old', '{missing[0]}'))."
        )


def alpaca_to_messages(record: dict) -> list[dict]:
    """An Alpaca record (instruction, input, output) as a one-turn conversation."""
    user = record["instruction"]
    if record.get("input"):
        user += f"\n\n{record['input']}"
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": record["output"]},
    ]


def split_implicit_prompt(row: dict) -> dict:
    """``chosen``/``rejected`` that both hold the whole conversation -> explicit ``prompt`` + answers."""
    chosen, rejected = row["chosen"], row["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
