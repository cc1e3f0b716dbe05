"""MaskedLMCollator as a library, used the way a user would: in transformers' Trainer with its
defaults (a tokenized `datasets.Dataset` without idx), in DataLoaders with worker processes, and
as the README's examples show it.

What it proves: the model gets the attention mask and only keys its forward declares (padded and
packed); masks of rows without idx change from batch to batch and are not a function of the batch
slot, yet come back with the same seed; DataLoader workers draw their own masks, reproducibly from
the DataLoader's generator, while rows with idx get the same masks with workers as in one process.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from mlmkit import MaskedLMCollator
from mlmkit.collator import METADATA_KEYS

from readme_python import collator_examples, save_tiny_model


@pytest.fixture(scope="module")
def dataset(tokenizer):
    """256 paragraphs of the embedded corpus as a user tokenizes them: input_ids, token_type_ids
    and attention_mask, no idx; at least 16 words each (so every slot has early positions), cut
    at 32 tokens (the tiny model's steps cost what its 30,522-way head does)."""
    from datasets import Dataset

    from mlmkit.data import embedded_corpus

    texts = [t for t in embedded_corpus() if len(t.split()) >= 16][:256]
    return Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32),
        batched=True, remove_columns=["text"])


def tiny_bert(tiny_bert_dir):
    from transformers import AutoConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(AutoConfig.from_pretrained(tiny_bert_dir))


def declared(model) -> set[str]:
    """The keyword arguments model.forward declares by name (not those of its **kwargs)."""
    return {name for name, p in inspect.signature(model.forward).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def train(tokenizer, dataset, tiny_bert_dir, output_dir, **options):
    """A few Trainer steps with the Trainer's defaults; returns (trainer, model, what the model
    received at every forward)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_bert(tiny_bert_dir)
    received = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}),
        with_kwargs=True)
    collator = MaskedLMCollator(tokenizer, mlm_probability=0.15, seed=0, **options)
    args = TrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True, max_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    return trainer, model, received


@pytest.mark.parametrize("options", [dict(), dict(padding="packed", max_length=128)],
                         ids=["padded", "packed"])
def test_trainer_gets_the_mask_and_only_declared_keys(tokenizer, dataset, tiny_bert_dir, tmp_path,
                                                      options):
    assert "idx" not in dataset.column_names
    trainer, model, received = train(tokenizer, dataset, tiny_bert_dir, tmp_path / "a", **options)
    assert trainer.state.global_step == 3 and len(received) == 3
    names = declared(model)
    for kwargs in received:
        # num_items_in_batch is the Trainer's own loss argument (typed in the forward's **kwargs)
        assert set(kwargs) - {"num_items_in_batch"} <= names, set(kwargs) - names
        assert not set(kwargs) & set(METADATA_KEYS)
        assert {"input_ids", "attention_mask", "labels", "token_type_ids"} <= set(kwargs)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if options:  # packed: positions restart at every example, which attends only to itself
            assert mask.dtype == torch.bool and mask.shape == (len(ids), 1, ids.shape[1], ids.shape[1])
            segment = torch.cumsum(kwargs["position_ids"] == 0, dim=1)  # (R, T) padding: its own
            assert torch.equal(mask[:, 0], segment[:, :, None] == segment[:, None, :])
        else:
            assert mask.shape == ids.shape and (mask.sum(1) > 0).all()
        assert 0 < int((kwargs["labels"] != -100).sum()) < int((ids != 0).sum())
    if options:
        rows = {len(kwargs["input_ids"]) for kwargs in received}
        assert max(rows) < 8  # 8 examples per batch, packed into fewer rows
    # The same seed, the same masks: a second run receives exactly the same batches.
    _, _, again = train(tokenizer, dataset, tiny_bert_dir, tmp_path / "b", **options)
    for first, second in zip(received, again):
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(first[key], second[key]), key


def test_masks_are_not_a_function_of_the_batch_slot(tokenizer, dataset, tiny_bert_dir, tmp_path):
    """200 batches of the Trainer's own train DataLoader (shuffled, no idx): how often position p
    of slot s is masked is the overall rate, for every slot and position; a collator that keyed
    masks by the slot gives 0 or 1 there."""
    from transformers import Trainer, TrainingArguments

    collator = MaskedLMCollator(tokenizer, mlm_probability=0.15, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    trainer = Trainer(model=tiny_bert(tiny_bert_dir), args=args, train_dataset=dataset,
                      data_collator=collator)
    special = torch.zeros(len(tokenizer), dtype=torch.bool)
    special[tokenizer.all_special_ids] = True
    width, slots = 16, 8
    masked = torch.zeros(slots, width)
    eligible = torch.zeros(slots, width)
    batches = 0
    while batches < 200:
        for batch in trainer.get_train_dataloader():
            if batches == 200:
                break
            labels, ids = batch["labels"][:, :width], batch["input_ids"][:, :width]
            original = torch.where(labels != -100, labels, ids)
            ok = (batch["attention_mask"][:, :width] == 1) & ~special[original]
            eligible[:len(ok)] += ok
            masked[:len(ok)] += ok & (labels != -100)
            batches += 1
    rate = masked.sum() / eligible.sum()
    enough = eligible >= 150
    assert enough[:, 1:15].all()  # every slot, positions 1..14: 150+ ordinary tokens each
    per_cell = masked[enough] / eligible[enough]
    assert (per_cell - rate).abs().max() < 0.1, per_cell  # within a few points (sd ~0.03)
    per_slot = masked.sum(1) / eligible.sum(1)
    assert (per_slot - rate).abs().max() < 0.03, per_slot
    assert abs(rate - 0.15) < 0.01
    # The same examples collated twice in a row are masked differently (as in transformers).
    rows = [dataset[i] for i in range(8)]
    first, second = collator(rows), collator(rows)
    assert torch.equal(first["input_ids"] != 0, second["input_ids"] != 0)
    assert not torch.equal(first["labels"], second["labels"])


def loader_labels(tokenizer, rows, *, num_workers: int, generator_seed: int, epochs: int = 2,
                  **options) -> list[list[torch.Tensor]]:
    """Labels of every batch, epoch by epoch, of a DataLoader over ``rows`` (batches of 4)."""
    collator = MaskedLMCollator(tokenizer, mlm_probability=0.3, seed=0, **options)
    loader = torch.utils.data.DataLoader(
        rows, batch_size=4, num_workers=num_workers, collate_fn=collator,
        generator=torch.Generator().manual_seed(generator_seed))
    return [[batch["labels"] for batch in loader] for _ in range(epochs)]


def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(torch.equal(x, y) for ea, eb in zip(a, b) for x, y in zip(ea, eb))


def test_dataloader_workers_draw_their_own_masks_reproducibly(tokenizer, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ids = tokenizer("Every worker draws its own masks, and a seeded loader draws them again, "
                    "epoch after epoch.")["input_ids"]
    rows = [{"input_ids": ids} for _ in range(16)]  # the same tokens everywhere, no idx
    runs = [loader_labels(tokenizer, rows, num_workers=2, generator_seed=s) for s in (0, 0, 1)]
    first = runs[0]
    batches = [b for epoch in first for b in epoch]
    assert len(batches) == 8
    # Batches 0 and 1 are the first call of worker 0 and of worker 1; 0 and 2 worker 0's first
    # two; epoch 1's workers are new ones. All masks differ.
    assert len({tuple(b.flatten().tolist()) for b in batches}) == len(batches)
    assert same(first, runs[1])  # the same generator seed: the same masks
    assert not any(torch.equal(x, y) for x, y in zip(batches, [b for e in runs[2] for b in e]))
    # In one process too, every batch differs, and a new collator draws the same again.
    single = loader_labels(tokenizer, rows, num_workers=0, generator_seed=0)
    assert len({tuple(b.flatten().tolist()) for e in single for b in e}) == len(batches)
    assert same(single, loader_labels(tokenizer, rows, num_workers=0, generator_seed=5))


@pytest.mark.parametrize("options", [dict(), dict(padding="packed", max_length=64)],
                         ids=["padded", "packed"])
def test_rows_with_idx_get_the_same_masks_with_workers_as_in_one_process(tokenizer, monkeypatch,
                                                                          options):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ids = tokenizer("Rows that carry idx keep their masks wherever they are collated.")["input_ids"]
    rows = [{"input_ids": ids, "idx": i} for i in range(16)]
    one = loader_labels(tokenizer, rows, num_workers=0, generator_seed=0, epochs=1, **options)
    workers = loader_labels(tokenizer, rows, num_workers=2, generator_seed=1, epochs=2, **options)
    assert same(one, workers[:1]) and same(one, workers[1:])  # set_epoch, not workers, moves them
    assert len({tuple(b.flatten().tolist()) for b in one[0]}) == 4  # idx keys the draws


def test_readme_examples_run_as_written(tokenizer_path, tmp_path, monkeypatch):
    """The README's collator examples (Trainer, DataLoader loop with packed rows and workers, and
    paired masks under the Trainer), with only MODEL changed as the README's CPU note says."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    script = collator_examples(save_tiny_model(tmp_path / "tiny", tokenizer_path))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(script, "README.md (MaskedLMCollator as a library)", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 3
    assert namespace["paired"].calls > 0 and torch.isfinite(namespace["loss"])
    assert namespace["step"] == 2 and namespace["packed"].padding == "packed"
