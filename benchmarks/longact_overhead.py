"""LongAct overhead: training step time with and without the callbacks, on the embedded model, in one run.

Arms alternate (off, on, off, on, ...) so that machine noise hits both alike; the first step of every fit (warm-up,
and for LongAct the statistics collection and selection) is excluded, so the ratio measures the steady-state cost
of the masks: zeroing frozen gradient rows, snapshotting and restoring frozen rows.

Usage: python benchmarks/longact_overhead.py [--rounds 3] [--steps 4] [--seq-len 256] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from benchmarks._machine import record
from longact_lightning.callbacks import LongAct
from longact_lightning.models import EMBEDDED_MODEL, load_causal_lm


class LMModule(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-5, weight_decay=0.1)


class StepTimer(Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model = load_causal_lm(EMBEDDED_MODEL)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for arm in ("off", "on"):
            model.load_state_dict(initial)
            timer = StepTimer()
            callbacks = [timer] + ([LongAct(top_ratio=0.3)] if arm == "on" else [])
            trainer = pl.Trainer(
                max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
            )  # fmt: skip
            trainer.fit(LMModule(model), DataLoader([batch] * args.steps, batch_size=None))
            times[arm] += timer.times[1:]
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    tokens = args.batch_size * args.seq_len
    record(
        "LongAct overhead (embedded SmolLM2-135M, fp32, AdamW)",
        [
            f"workload: batch {args.batch_size} x {args.seq_len} tokens, {args.rounds} alternating rounds x "
            f"{args.steps - 1} timed steps per arm",
            f"step time median: LongAct off {off:.3f} s, on {on:.3f} s; **ratio on/off = {on / off:.3f}** "
            f"(target <= 1.02); {tokens / off:.0f} tok/s off",
        ],
    )


if __name__ == "__main__":
    main()
