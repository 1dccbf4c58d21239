"""utils.progress: the trainers' progress is one bar, not one printed dict per logging step."""

import copy

import pytest


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_trainer_bar_replaces_the_printed_logs(tiny_model, tiny_tokenizer, tmp_path, capsys, disable_tqdm):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from utils.progress import trainer_bar

    ids = tiny_tokenizer("Alba eats apples. Alba is blue.")["input_ids"]
    trainer = Trainer(
        model=copy.deepcopy(tiny_model),
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=4,
            per_device_train_batch_size=2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=disable_tqdm,
        ),
        train_dataset=Dataset.from_dict({"input_ids": [ids] * 8}),
        data_collator=DataCollatorForLanguageModeling(tiny_tokenizer, mlm=False),
    )
    assert trainer_bar(trainer, desc="tiny run") is trainer
    capsys.readouterr()
    trainer.train()
    out = capsys.readouterr()
    printed = out.out + out.err
    assert "{'loss'" not in printed and "'train_runtime'" not in printed, printed
    assert "tiny run" in printed and "4/4" in printed and "loss=" in printed, printed
    assert sum("loss" in h for h in trainer.state.log_history) >= 4, "the logs must still be kept"


def test_trl_logprob_tiles_fit_the_vocabulary_and_change_no_number(tiny_model, monkeypatch):
    """TRL's fused LM head allocates tiles 32,768 wide on every call; `fit_trl_logprob_tiles` sizes them
    to the vocabulary. The log-probabilities and their gradient must be bit for bit the same."""
    import torch
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from utils.config import TRL_LOGPROB_TILE, fit_trl_logprob_tiles

    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_LOGPROB_TILE)
    vocab = tiny_model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(0))

    def logprobs_and_grad():
        model = copy.deepcopy(tiny_model)
        add_fused_lm_head(model, outputs=("log_probs",))
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        out.loss.backward()
        return out.log_probs.detach(), model.get_output_embeddings().weight.grad.clone()

    before = logprobs_and_grad()
    assert fit_trl_logprob_tiles(tiny_model) == vocab < TRL_LOGPROB_TILE
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == vocab
    after = logprobs_and_grad()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])

    class Wide:  # a real model's vocabulary, wider than TRL's tile: TRL's width stays
        def get_output_embeddings(self):
            return torch.nn.Linear(4, 50_000, bias=False)

    assert fit_trl_logprob_tiles(Wide()) == TRL_LOGPROB_TILE == trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


def test_an_executed_bar_keeps_one_line():
    """nbclient stores each redraw of a bar as its own stream output starting with a carriage return;
    the runner joins one stream's consecutive outputs and keeps what a terminal shows: one line."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from tools.execution import collapse_carriage_returns

    outputs = [
        new_output("stream", name="stdout", text="\rbar:   0%| 0/4"),
        new_output("stream", name="stdout", text="\rbar:  50%| 2/4"),
        new_output("stream", name="stdout", text="\rbar: 100%| 4/4\n"),
        new_output("stream", name="stdout", text="4 steps in 1 s\n"),
        new_output("stream", name="stderr", text="a warning\n"),
        new_output("display_data", data={"text/plain": "<Figure>"}),
        new_output("stream", name="stdout", text="after the figure\n"),
    ]
    nb = new_notebook(cells=[new_code_cell("run()", outputs=outputs)])
    collapse_carriage_returns(nb)
    got = nb.cells[0].outputs
    assert [o.get("text") for o in got if o.output_type == "stream"] == [
        "bar: 100%| 4/4\n4 steps in 1 s\n",
        "a warning\n",
        "after the figure\n",
    ]
    assert [o.output_type for o in got] == ["stream", "stream", "display_data", "stream"]
    nbformat.validate(nb)
