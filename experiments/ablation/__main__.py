"""``python -m experiments.ablation``: the driver (arms x seeds, resumable), and the per-run workers it spawns.

    python -m experiments.ablation --out docs/ablation/512 --seeds 0 1 2 --steps 4

Runs go seed-major (every arm of seed 0, then seed 1, ...), so a partial ablation is still paired; a run with a
``result.json`` is skipped, so rerunning the same command continues an interrupted ablation. Arguments after a bare
``--`` are passed to every ``longact fit`` run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from experiments.ablation.report import ARMS, record_command, write_report
from experiments.ablation.runs import AblationSettings, eval_main, run_base, run_name, run_one, train_eval_main


def build_parser() -> argparse.ArgumentParser:
    d = AblationSettings()
    p = argparse.ArgumentParser(
        prog="python -m experiments.ablation",
        description="LongAct ablation: arms x seeds, each trained with `longact fit` in a subprocess and evaluated on "
        "a fixed held-out RULER set; resumable (runs with a result.json are skipped).",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (one per design)")
    p.add_argument("--config", default=d.config, help="base `longact fit` config")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--task", default=d.task)
    p.add_argument("--target-length", type=int, default=d.target_length)
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--heldout-samples", type=int, default=d.heldout_samples)
    p.add_argument("--heldout-seed", type=int, default=d.heldout_seed)
    p.add_argument("--heldout-lengths", type=int, nargs="+", default=None,
                   help="held-out prompt budgets, e.g. the training length and 2x it (default: the training length); "
                   "the first is each run's headline accuracy")  # fmt: skip
    p.add_argument("--eval-max-tokens", type=int, default=d.eval_max_tokens)
    p.add_argument("--engine", default=d.engine, choices=("vllm", "hf"))
    p.add_argument("--precision", default=d.precision, choices=("32-true", "bf16-mixed"),
                   help="trainer precision; the engine serves in the matching dtype")  # fmt: skip
    p.add_argument("--kvcache-gib", type=float, default=d.kvcache_gib)
    p.add_argument("--no-base", action="store_true", help="skip the base-model reference evaluation")
    p.add_argument("--keep-weights", action="store_true", help="keep each run's HF export (~0.5 GB each)")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.md/csv and the plot")
    p.epilog = "Arguments after a bare `--` are passed to every `longact fit` run (after the ablation's own)."
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_eval":
        eval_main(argv[1:])
        return
    if argv and argv[0] == "_train_eval":
        train_eval_main(argv[1:])
        return
    overrides: tuple[str, ...] = ()
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], tuple(argv[cut + 1 :])
    args = build_parser().parse_args(argv)
    settings = AblationSettings(
        config=args.config, steps=args.steps, lr=args.lr, task=args.task, target_length=args.target_length,
        prompts_per_step=args.prompts_per_step, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        heldout_samples=args.heldout_samples, heldout_seed=args.heldout_seed,
        heldout_lengths=tuple(args.heldout_lengths or ()), eval_max_tokens=args.eval_max_tokens,
        engine=args.engine, precision=args.precision, kvcache_gib=args.kvcache_gib, train_overrides=overrides,
    )  # fmt: skip
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    full_argv = [*argv, *(["--", *overrides] if overrides else [])]
    command = None if args.report_only else "python -m experiments.ablation " + shlex.join(full_argv)
    if command:
        record_command(out, command)
    if not args.report_only:
        started = time.perf_counter()
        if not args.no_base:
            base = run_base(settings, out)
            print(f"[ablation] base model: {base['accuracy']:.1f} %", flush=True)
        failed = []
        # Seed-major order: after each seed every arm has a result, so a partial ablation is still paired.
        for seed in args.seeds:
            for arm in args.arms:
                t0 = time.perf_counter()
                existed = (out / run_name(arm, seed) / "result.json").is_file()
                try:
                    result = run_one(settings, arm, seed, out, keep_weights=args.keep_weights)
                except RuntimeError as error:  # keep going; the failed run has no result.json and is retried next time
                    failed.append(run_name(arm, seed))
                    print(f"[ablation] {run_name(arm, seed)}: FAILED after {time.perf_counter() - t0:.0f} s: {error}",
                          flush=True)  # fmt: skip
                    continue
                status = "skipped (result.json exists)" if existed else f"done in {time.perf_counter() - t0:.0f} s"
                print(f"[ablation] {run_name(arm, seed)}: held-out {result['accuracy']:.1f} %, {status}", flush=True)
                write_report(out)
        elapsed = time.perf_counter() - started
        print(f"[ablation] finished in {elapsed:.0f} s; failed runs: {failed or 'none'}", flush=True)
    rows = write_report(out)
    for row in rows:
        print(row)
    if not args.report_only and failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed}; rerun the same command to retry them.")


if __name__ == "__main__":
    main()
