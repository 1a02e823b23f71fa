"""Where an RL step's time goes, and train-phase MFU against the bf16 matmul peak measured in the same run.

Runs this project's reference-workload step (``benchmarks/_longact_rl_step.py``: SmolLM2-135M, DAPO, 4x4 rollouts,
~500-token prompts, <= 32 new tokens, LongAct on) in fp32 and in bf16-mixed, each in its own process, and reports:
generation and weight-sync shares of the step, and train-phase MFU = model FLOPs of the tokens the trainer processed
(``_longact_rl_step.model_flops``: linear layers, ``lm_head`` on completion tokens, causal attention) / train-phase
time (step - generation - weight sync: forward, backward, optimizer, LongAct, logging) / the bf16 matmul peak of this
machine measured here (a 2048^3 bf16 matmul).

Usage: python -m benchmarks.step_breakdown [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._machine import record


def bf16_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square bf16 matmul on all cores (best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run(precision: list[str], steps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks._longact_rl_step", "--steps", str(steps + 1), *precision]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def summarize(name: str, result: dict, peak: float) -> str:
    """Median over the timed steps (the first step is warm-up: its generate, sync and micro-batches are dropped)."""
    steps = len(result["step_s"])
    per_step = len(result["train_flops"]) // steps  # micro-batches per step
    rows = []
    for i in range(1, steps):
        micro = slice(i * per_step, (i + 1) * per_step)
        train = result["step_s"][i] - result["generate_s"][i] - result["sync_s"][i]
        rows.append((result["step_s"][i], result["generate_s"][i], result["sync_s"][i], train,
                     sum(result["train_tokens"][micro]), sum(result["train_flops"][micro])))  # fmt: skip
    step, generate, sync, train, tokens, flops = (statistics.median(column) for column in zip(*rows))
    mfu = statistics.median(f / t / peak for *_, t, _, f in rows)
    return (
        f"{name}: step {step:.1f} s = generate {generate:.1f} s ({100 * generate / step:.0f} %) + weight sync "
        f"{sync:.2f} s (**{100 * sync / step:.1f} %**, target <= 5 %) + train {train:.1f} s; train phase "
        f"{tokens / train:.0f} tok/s, {flops / 1e12:.2f} TFLOP per step, **MFU {100 * mfu:.0f} % of the bf16 peak** "
        "(target >= 35 %)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    peak = bf16_matmul_peak()
    fp32 = run([], args.steps)
    bf16 = run(["--precision", "bf16-mixed", "--engine-dtype", "bfloat16"], args.steps)
    record(
        "RL step breakdown and train-phase MFU (SmolLM2-135M, DAPO, 4x4 rollouts, ~500-token prompts, LongAct on)",
        [
            f"bf16 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s (2048^3, best of 10)",
            summarize("fp32", fp32, peak),
            summarize("bf16-mixed (engine bf16)", bf16, peak),
        ],
    )


if __name__ == "__main__":
    main()
