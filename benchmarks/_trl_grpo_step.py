"""TRL's side of the comparisons: TRL 1.16 ``GRPOTrainer`` on the reference workload, one process.

As TRL users run it on one CPU: HF ``generate`` for rollouts, gradient checkpointing on (TRL's default), all 16
sequences of a step in one batch. Prints one line per step and a final JSON line with the step times and peak RSS.

Usage: python -m benchmarks._trl_grpo_step MODEL_DIR [--steps 3] [--bf16] [--repeats 20]   (needs trl==1.16.0)
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from benchmarks._workload import DEFAULT_REPEATS, GROUP_SIZE, LEARNING_RATE, MAX_NEW_TOKENS, PROMPTS_PER_STEP, prompts


def reward(completions, answer, **_) -> list[float]:
    return [1.0 if a in c[0]["content"] else 0.0 for c, a in zip(completions, answer)]


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **_):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **_):
        self.seconds.append(time.perf_counter() - self._start)
        print(f"trl step {state.global_step}: {self.seconds[-1]:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="noise repeats per prompt (prompt length)")
    args = ap.parse_args()
    rows = [
        {"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]} for p in prompts(64, args.repeats)
    ]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        num_generations=GROUP_SIZE, max_completion_length=MAX_NEW_TOKENS, max_steps=args.steps,
        learning_rate=LEARNING_RATE, logging_steps=1, report_to=[], use_cpu=True, bf16=args.bf16, loss_type="dapo",
        epsilon_high=0.28, beta=0.0, save_strategy="no", gradient_checkpointing=True, dataloader_num_workers=0,
    )  # fmt: skip
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=args.model_dir, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows), callbacks=[timer]
    )
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": timer.seconds, "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
