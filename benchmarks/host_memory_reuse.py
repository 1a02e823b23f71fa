"""What ``HostMemoryReuse`` buys: the reference RL step with and without it, alternating, in bf16-mixed.

Each arm runs ``benchmarks/_longact_rl_step.py`` in its own process (so peak RSS is its own) with the comparison's
settings (``_longact_rl_step.run``), the first step being warm-up; the arms alternate round by round. Reports the
median step, the median train phase (step - rollout) and peak RSS of each arm, and their ratios.

Usage: python -m benchmarks.host_memory_reuse [--rounds 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks._longact_rl_step import run
from benchmarks._machine import record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (one more warm-up step runs first)")
    args = ap.parse_args()
    arms: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for arm in arms:
            arms[arm].append(run(args.steps + 1, bf16=True, extra=[] if arm == "on" else ["--no-host-memory-reuse"]))
    rows = {}
    for arm, results in arms.items():
        steps = [s for r in results for s in r["step_s"][1:]]
        train = [s - t for r in results for s, t in zip(r["step_s"][1:], r["rollout_s"][1:])]
        rows[arm] = (statistics.median(steps), statistics.median(train), max(r["peak_rss_mb"] for r in results))
    (on_step, on_train, on_rss), (off_step, off_train, off_rss) = rows["on"], rows["off"]
    record(
        "HostMemoryReuse on / off (SmolLM2-135M, DAPO, 4x4 rollouts, ~500-token prompts, bf16-mixed, LongAct on)",
        [
            f"{args.rounds} alternating rounds x {args.steps} timed steps per arm",
            f"on: median step {on_step:.1f} s, train phase {on_train:.1f} s, peak RSS {on_rss} MB",
            f"off: median step {off_step:.1f} s, train phase {off_train:.1f} s, peak RSS {off_rss} MB",
            f"**train phase on / off {on_train / off_train:.2f}**, step {on_step / off_step:.2f}, peak RSS "
            f"{on_rss / off_rss:.2f}",
        ],
    )


if __name__ == "__main__":
    main()
