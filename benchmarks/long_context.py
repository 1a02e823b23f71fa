"""The RL step at long context: prompt length 1k to 8k tokens, this project vs TRL 1.16, checkpointing on vs off.

Each run is its own process (peak RSS is its own) on the reference workload at a longer prompt
(``benchmarks/_workload.py``: 4 prompts x 4 rollouts, <= 32 new tokens, DAPO, SmolLM2-135M whose context is 8192).
This project runs its long-context setting: prompt sharing, activation checkpointing, a token budget of
``--budget`` tokens per pass and, on this CPU, ``HostMemoryReuse(own_pages_from_mb=--own-pages-from-mb)`` (blocks of
8 MiB and more out of the heap, which otherwise fragments within an 8k-token pass); TRL runs ``GRPOTrainer`` as its
users do on a CPU (HF generate, gradient checkpointing, one batch). Train-phase MFU = model FLOPs of the tokens trained
(linear layers, ``lm_head`` on completions, causal attention) / (step - rollout) / the bf16 matmul peak measured in
this run.

``--checkpointing LENGTH`` instead compares, at one prompt length, three ways to score the same step: prompt sharing
without checkpointing, prompt sharing with checkpointing (this project's long-context setting), and checkpointing
without sharing (each sequence whole, how checkpointed runs scored before sharing worked under checkpointing).

Usage:
    python -m benchmarks.long_context [--lengths 1024 2048 4096 8128] [--trl-lengths 2048 8128] [--fp32] [--steps 1]
    python -m benchmarks.long_context --checkpointing 4096 [--arms plain shared unshared] [--steps 1]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys

from benchmarks._longact_rl_step import run
from benchmarks._machine import record
from benchmarks._workload import repeats_for
from benchmarks.step_breakdown import bf16_matmul_peak
from longact_lightning.models import EMBEDDED_MODEL, resolve_model


def ours(length: int, bf16: bool, steps: int, flags: list[str]) -> dict:
    result = run(steps, bf16, ["--repeats", str(repeats_for(length)), *flags], reference_workload=False)
    train = [s - r for s, r in zip(result["step_s"], result["rollout_s"])]
    per_step = len(result["train_flops"]) // steps
    flops = [sum(result["train_flops"][i * per_step : (i + 1) * per_step]) for i in range(steps)]
    tokens = [sum(result["train_tokens"][i * per_step : (i + 1) * per_step]) for i in range(steps)]
    attention = sum(result["attention_flops"]) / max(sum(result["train_flops"]), 1.0)
    return {"step_s": result["step_s"], "train_s": train, "flops": flops, "tokens": tokens,
            "attention_share": attention, "peak_rss_mb": result["peak_rss_mb"]}  # fmt: skip


def trl(length: int, bf16: bool, steps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks._trl_grpo_step", resolve_model(EMBEDDED_MODEL), "--steps", str(steps),
           "--repeats", str(repeats_for(length)), *(["--bf16"] if bf16 else [])]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd())
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    import json

    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _ours_row(name: str, result: dict, peak: float) -> str:
    step, train = _median(result["step_s"]), _median(result["train_s"])
    mfu = _median([f / t / peak for f, t in zip(result["flops"], result["train_s"])])
    tokens = _median([n / t for n, t in zip(result["tokens"], result["train_s"])])
    attention = 100 * result["attention_share"]
    return (f"{name}: step {step:.1f} s (train {train:.1f} s, {tokens:.0f} train tok/s, MFU {100 * mfu:.0f} %, "
            f"attention {attention:.0f} % of the FLOPs), peak RSS {result['peak_rss_mb']} MB")  # fmt: skip


def sweep(args: argparse.Namespace, peak: float) -> None:
    bf16 = not args.fp32
    flags = ["--gradient-checkpointing", "--max-tokens-per-micro-batch", str(args.budget)]
    flags += ["--host-memory-own-pages-from-mb", str(args.own_pages_from_mb)] if args.own_pages_from_mb else []
    rows, steps, trains = [], {}, {}
    for length in args.lengths:
        result = ours(length, bf16, args.steps, flags)
        steps[length], trains[length] = _median(result["step_s"]), _median(result["train_s"])
        rows.append(_ours_row(f"{length} tokens, longact-lightning", result, peak))
        print(rows[-1], flush=True)
        if length in args.trl_lengths:
            other = trl(length, bf16, args.steps)
            if "error" in other:
                rows.append(f"{length} tokens, TRL: failed ({other['error']})")
            else:
                trl_step = _median(other["step_s"])
                rows.append(
                    f"{length} tokens, TRL GRPOTrainer: step {trl_step:.1f} s, peak RSS {other['peak_rss_mb']} MB; "
                    f"**speed-up {trl_step / steps[length]:.2f}x, RSS ratio "
                    f"{result['peak_rss_mb'] / other['peak_rss_mb']:.2f}**"
                )
            print(rows[-1], flush=True)
    if len(steps) > 1:
        rows.append(
            f"growth over {min(steps)}-{max(steps)} tokens (log-log slope, 1 = linear): step time ~ length^"
            f"{_slope(steps):.2f}, train phase ~ length^{_slope(trains):.2f}"
        )
    precision = "bf16-mixed" if bf16 else "fp32"
    record(
        f"Long context: RL step vs prompt length ({precision}; 4x4 rollouts, <= 32 new tokens; ours: shared prompt + "
        f"checkpointing + {args.budget}-token budget + own pages from {args.own_pages_from_mb} MiB; "
        f"{args.steps} step(s) per process, the first included)",
        [f"bf16 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s", *rows,
         f"1-min load average at the end: {os.getloadavg()[0]:.1f}"],
    )  # fmt: skip


def _slope(seconds: dict[int, float]) -> float:
    """Least-squares slope of log(seconds) against log(length)."""
    x, y = zip(*((math.log(n), math.log(t)) for n, t in seconds.items()))
    mx, my = statistics.mean(x), statistics.mean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def checkpointing(args: argparse.Namespace, peak: float) -> None:
    bf16 = not args.fp32
    arms = {
        "plain": ("shared prompt, no checkpointing (one group per pass)", ["--micro-batch-size", "4"]),
        "shared": ("shared prompt + checkpointing (one group per pass)",
                   ["--micro-batch-size", "4", "--gradient-checkpointing"]),
        "unshared": ("checkpointing, no sharing (4 sequences per pass)",
                     ["--micro-batch-size", "4", "--gradient-checkpointing", "--no-share-prompt"]),
    }  # fmt: skip
    results = {key: ours(args.checkpointing, bf16, args.steps, arms[key][1]) for key in args.arms}
    rows = [_ours_row(arms[key][0], result, peak) for key, result in results.items()]
    step = {key: _median(r["step_s"]) for key, r in results.items()}
    train = {key: _median(r["train_s"]) for key, r in results.items()}
    if "shared" in step and "plain" in step:
        rows.append(
            f"**shared + checkpointing vs shared: {step['shared'] / step['plain']:.2f}x the step** (train phase "
            f"{train['shared'] / train['plain']:.2f}x)"
        )
    if "shared" in step and "unshared" in step:
        rows.append(f"**vs checkpointing without sharing: {step['unshared'] / step['shared']:.2f}x faster**")
    precision = "bf16-mixed" if bf16 else "fp32"
    record(
        f"Long context: activation checkpointing with and without prompt sharing ({precision}; {args.checkpointing}-"
        f"token prompts, 4x4 rollouts, <= 32 new tokens; {args.steps} step(s) per process, the first included)",
        [f"bf16 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s", *rows,
         f"1-min load average at the end: {os.getloadavg()[0]:.1f}"],
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8128])
    ap.add_argument("--trl-lengths", type=int, nargs="*", default=[2048, 8128])
    ap.add_argument(
        "--budget", type=int, default=16384, help="max_tokens_per_micro_batch of this project's runs (>= one group)"
    )
    ap.add_argument(
        "--own-pages-from-mb", type=int, default=8, help="HostMemoryReuse(own_pages_from_mb=) of this project's runs"
    )
    ap.add_argument("--fp32", action="store_true", help="both sides in fp32 (default: bf16-mixed, bf16 engine)")
    ap.add_argument("--steps", type=int, default=1, help="steps per process (all timed: at 8k a step takes minutes)")
    ap.add_argument("--checkpointing", type=int, metavar="LENGTH", help="compare the scoring paths at this length")
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=["plain", "shared", "unshared"],
        default=["plain", "shared", "unshared"],
        help="with --checkpointing: which scoring paths to run",
    )
    args = ap.parse_args()
    peak = bf16_matmul_peak()
    if args.checkpointing:
        checkpointing(args, peak)
    else:
        sweep(args, peak)


if __name__ == "__main__":
    main()
