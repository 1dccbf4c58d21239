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
