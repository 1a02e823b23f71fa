"""Tiny random-init causal LMs of every supported layout, a plain LM LightningModule and batches for it."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Phi3Config, Qwen3Config

_COMMON = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 96, "pad_token_id": 0,
    "eos_token_id": 1, "bos_token_id": 2,
}  # fmt: skip

TINY_CONFIGS = {
    "llama_gqa": lambda: LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "phi3": lambda: Phi3Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, num_attention_heads=4),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]())


class LMModule(pl.LightningModule):
    """An ordinary next-token fine-tuning module: what a user already has before adding LongAct."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-2, weight_decay: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def random_lm_batches(num: int, batch_size: int = 4, seq_len: int = 24, vocab: int = 96, seed: int = 0):
    """Token batches with some right padding, as dicts ready for LMModule."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq_len // 2 :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
