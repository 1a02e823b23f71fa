"""The profile behind the train-phase MFU: one steady-state bf16 training step under the torch profiler.

Runs this project's reference-workload step (``benchmarks/_longact_rl_step.py``, bf16-mixed, the comparison's
micro-batch size) for three steps and profiles the third one's training (the rollout is left out). ATen operators are
grouped into families (``_longact_rl_step._OP_FAMILIES``) by self time, and the model FLOPs of the MFU are split into
the linear layers' (run as matmuls) and attention's (causal pairs only). Together with the bf16 matmul peak measured
in the same run this says how fast each family runs and how much of the step it takes, i.e. which part keeps MFU
where it is. Profiler bookkeeping slows the step a little; the shares are what matter.

Usage: python -m benchmarks.train_profile
"""

from __future__ import annotations

import argparse

from benchmarks._longact_rl_step import MICRO_BATCH_SIZE, run
from benchmarks._machine import record
from benchmarks.step_breakdown import bf16_matmul_peak

_PROFILED_STEP = 2  # 0-based: two warm-up steps (engine start, first allocations) come first


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    peak = bf16_matmul_peak()
    result = run(_PROFILED_STEP + 1, bf16=True, extra=["--profile-step", str(_PROFILED_STEP)])
    profile = result["profile"]
    per_step = len(result["train_flops"]) // len(result["step_s"])  # train_* entries per step (one per batch)
    micro = slice(_PROFILED_STEP * per_step, (_PROFILED_STEP + 1) * per_step)
    flops, attention_flops = sum(result["train_flops"][micro]), sum(result["attention_flops"][micro])
    wall, self_s = profile["wall_s"], profile["self_s"]
    rates = {"matmul": flops - attention_flops, "attention": attention_flops}

    def family(name: str) -> str:
        row = f"{name}: {self_s[name]:.2f} s ({100 * self_s[name] / wall:.0f} %)"
        if name in rates:
            rate = rates[name] / self_s[name]
            row += f" at {rate / 1e9:.0f} GFLOP/s = {100 * rate / peak:.0f} % of the bf16 peak"
        return row

    outside = wall - sum(self_s.values())
    families = "; ".join(family(name) for name in self_s)
    record(
        "Train-phase profile, bf16-mixed (SmolLM2-135M, DAPO, 4x4 rollouts, ~500-token prompts, LongAct on)",
        [
            f"bf16 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s (2048^3, best of 10); micro-batch "
            f"{MICRO_BATCH_SIZE}",
            f"profiled `training_step` of step {_PROFILED_STEP + 1}: {wall:.2f} s under the profiler, "
            f"{flops / 1e12:.2f} TFLOP of model FLOPs: **MFU {100 * flops / wall / peak:.0f} %** (profiler on)",
            f"self time by operator family: {families}; outside ATen operators (Python, autograd engine, hooks): "
            f"{outside:.2f} s ({100 * outside / wall:.0f} %)",
        ],
    )


if __name__ == "__main__":
    main()
