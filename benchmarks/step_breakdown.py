"""Where an RL step's time goes, and train-phase MFU against the bf16 matmul peak measured in the same run.

Runs this project's reference-workload step (``benchmarks/_longact_rl_step.py``: SmolLM2-135M, DAPO, 4x4 rollouts,
~500-token prompts, <= 32 new tokens, LongAct on) in fp32 and in bf16-mixed, each in its own process and each with
the comparison's micro-batch size (``_longact_rl_step.MICRO_BATCH_SIZE``), and reports: the rollout's share of the
step (weight sync, generation, and the rest: rewards, collation), and train-phase MFU = model FLOPs of the tokens the
trainer processed (``_longact_rl_step.model_flops``: linear layers, ``lm_head`` on completion tokens, causal
attention) / train-phase time (step - weight sync - rollout: forward, backward, optimizer, LongAct, logging) / the
bf16 matmul peak of this machine measured here (a 2048^3 bf16 matmul).

Usage: python -m benchmarks.step_breakdown [--steps 3] [--pad-to-multiple-of 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._longact_rl_step import MICRO_BATCH_SIZE, PAD_TO_MULTIPLE_OF, run
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


def summarize(name: str, result: dict, peak: float) -> str:
    """Median over the timed steps (the first step is warm-up: its generate, sync and train counts are dropped)."""
    steps = len(result["step_s"])
    per_step = len(result["train_flops"]) // steps  # train_* entries per step (one: counted per rollout batch)
    rows = []
    for i in range(1, steps):
        micro = slice(i * per_step, (i + 1) * per_step)
        rollout = result["rollout_s"][i]
        generate, sync = result["generate_s"][i], result["sync_s"][i]
        # the sync runs before the batch is pulled (on_train_batch_start), so it is not part of `rollout`
        rows.append((result["step_s"][i], rollout, generate, sync, rollout - generate,
                     result["step_s"][i] - rollout - sync, sum(result["train_tokens"][micro]),
                     sum(result["train_flops"][micro])))  # fmt: skip
    step, rollout, generate, sync, rest, train, tokens, flops = (statistics.median(column) for column in zip(*rows))
    mfus = [f / t / peak for *_, t, _, f in rows]
    return (
        f"{name}: step {step:.1f} s = weight sync {sync:.2f} s (**{100 * sync / step:.1f} %** of the step, target "
        f"<= 5 %) + rollout {rollout:.1f} s (generate {generate:.1f} s; rewards and collation {rest:.2f} s) + train "
        f"{train:.1f} s; train phase {tokens / train:.0f} tok/s, {flops / 1e12:.2f} TFLOP per step, "
        f"**MFU {100 * statistics.median(mfus):.0f} % of the bf16 peak** (target >= 35 %; per step "
        + ", ".join(f"{100 * m:.0f}" for m in mfus)
        + ")"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--pad-to-multiple-of", type=int, default=PAD_TO_MULTIPLE_OF, help="RLPolicyModule(pad_to_multiple_of=)"
    )
    args = ap.parse_args()
    peak = bf16_matmul_peak()
    extra = ["--pad-to-multiple-of", str(args.pad_to_multiple_of)]
    fp32 = run(args.steps + 1, bf16=False, extra=extra)
    bf16 = run(args.steps + 1, bf16=True, extra=extra)
    record(
        "RL step breakdown and train-phase MFU (SmolLM2-135M, DAPO, 4x4 rollouts, ~500-token prompts, LongAct on, "
        f"pad_to_multiple_of={args.pad_to_multiple_of})",
        [
            f"bf16 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s (2048^3, best of 10)",
            summarize(f"fp32, micro-batch {MICRO_BATCH_SIZE}", fp32, peak),
            summarize(f"bf16-mixed (engine bf16), micro-batch {MICRO_BATCH_SIZE}", bf16, peak),
        ],
    )


if __name__ == "__main__":
    main()
