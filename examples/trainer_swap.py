"""A masked-LM Trainer script written for transformers' DataCollatorForLanguageModeling.

To run it with mlmkit's collator, change one line, the collator's import, to
    from mlmkit import MaskedLMCollator as DataCollatorForLanguageModeling
and nothing else. It uses what such scripts use: features as NumPy arrays, a label column kept
for the model (remove_unused_columns=False), seed=None (the Trainer's seed decides the masks), a
subclass that overrides torch_mask_tokens (every target the mask token, as NeoBERT trains), and a
batch asked for as NumPy per call.
"""

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForMaskedLM, AutoTokenizer, Trainer, TrainingArguments
from transformers import DataCollatorForLanguageModeling

MODEL = "bert-base-uncased"
tokenizer = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForMaskedLM.from_pretrained(MODEL)

texts = ["A gripping, beautifully shot film.", "Dull, slow and far too long.",
         "The cast is wonderful and the script sparkles.", "I wanted my two hours back."] * 16
dataset = Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0] * 16}).map(
    lambda batch: tokenizer(batch["text"], truncation=True, max_length=64,
                            return_special_tokens_mask=True),
    batched=True, remove_columns=["text"]).with_format("numpy")


class EveryTargetMasked(DataCollatorForLanguageModeling):
    """Every target becomes the mask token: no random replacements, none left unchanged."""

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        labels = inputs.clone()
        targets = torch.rand(inputs.shape) < self.mlm_probability
        targets &= ~special_tokens_mask.bool()
        labels[~targets] = -100
        return torch.where(targets, self.tokenizer.mask_token_id, inputs), labels


collator = EveryTargetMasked(tokenizer, mlm_probability=0.3, seed=None)

torch.manual_seed(0)
batch = collator([dataset[i] for i in range(8)])
targets = batch["labels"] != -100
assert targets.any() and (batch["input_ids"][targets] == tokenizer.mask_token_id).all()
assert batch["label"].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
as_numpy = collator([dataset[i] for i in range(8)], return_tensors="np")
assert isinstance(as_numpy["input_ids"], np.ndarray) and as_numpy["label"].shape == (8,)

args = TrainingArguments("swap-out", max_steps=3, per_device_train_batch_size=8, report_to="none",
                         remove_unused_columns=False, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
trainer.train()
loss = trainer.state.log_history[-1]["train_loss"]
print(f"trained {trainer.state.global_step} steps, loss {loss:.3f}")
