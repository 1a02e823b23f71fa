"""Resident memory step after step, with and without ``HostMemoryReuse``: does a long run's footprint settle?

The TRL comparison reads peak RSS over four steps. This runs this project's reference-workload step
(``benchmarks/_longact_rl_step.py``, bf16-mixed, the comparison's micro-batch size) for longer in three arms:
``HostMemoryReuse`` keeping freed memory for the whole run, the same releasing the heap's free pages after every step,
and glibc's defaults. It reports the resident set after every step, the peak, the step time and glibc's heap (in use
and free but held), so growth that a four-step peak hides shows up and fragmentation is told apart from memory the
process keeps.

Usage: python -m benchmarks.rss_growth [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks._longact_rl_step import MICRO_BATCH_SIZE, run
from benchmarks._machine import record


def summarize(name: str, result: dict) -> str:
    """The resident set after every step, its growth over the second half, and the median step time (first step =
    warm-up, not counted)."""
    rss = result["rss_mb"]
    half = len(rss) // 2
    growth = (rss[-1] - rss[half - 1]) / (len(rss) - half)
    heap = [h for h in result["heap_mb"] if h is not None]
    in_use = "; glibc heap in use / free but held after each step (MB) " + ", ".join(f"{u}/{f}" for u, f in heap)
    return (
        f"{name}: RSS after each step (MB) "
        + ", ".join(str(r) for r in rss)
        + f"; growth over steps {half + 1}-{len(rss)}: **{growth:.0f} MB per step**; peak RSS "
        f"**{result['peak_rss_mb']} MB**; median step {statistics.median(result['step_s'][1:]):.1f} s"
        + (in_use if heap else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    reuse = run(args.steps, bf16=True, extra=["--host-memory-release-every", "0"])
    released = run(args.steps, bf16=True)
    plain = run(args.steps, bf16=True, extra=["--no-host-memory-reuse"])
    record(
        "Resident memory per step, bf16-mixed (SmolLM2-135M, DAPO, 4x4 rollouts, ~500-token prompts, LongAct on)",
        [
            f"micro-batch {MICRO_BATCH_SIZE}, {args.steps} steps per arm",
            summarize("HostMemoryReuse, never released", reuse),
            summarize("HostMemoryReuse, free pages released after every step (the CLI default)", released),
            summarize("HostMemoryReuse off (glibc defaults)", plain),
        ],
    )


if __name__ == "__main__":
    main()
