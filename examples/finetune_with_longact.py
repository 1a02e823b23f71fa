"""A plain Lightning fine-tuning project — with LongAct added in one line.

Everything except the ``LongAct(...)`` callback is what an existing project already has: a LightningModule wrapping
a HF causal LM, a dataloader, a Trainer. LongAct finds the model's query/key projections itself, measures their
channel saliency on the first training step, and from then on updates only the top 30 % rows of each W_Q / W_K.

Run:  python examples/finetune_with_longact.py --steps 10
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from longact_lightning import LongAct
from longact_lightning.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer

TEXTS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 8
    + f"One of the special magic numbers for the archive is: {n}."
    for n in (4817263, 9021734, 3310958, 7745120)
]


class CausalLMFineTune(pl.LightningModule):
    def __init__(self, model_name: str = EMBEDDED_MODEL, lr: float = 1e-5):
        super().__init__()
        self.model = load_causal_lm(model_name)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description="Fine-tune the embedded model with LongAct.")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
        callbacks=[LongAct(top_ratio=0.3)],  # <- the one line LongAct adds
    )
    trainer.fit(CausalLMFineTune(), DataLoader([dict(batch)] * args.steps, batch_size=None))


if __name__ == "__main__":
    main()
