"""``python -m experiments.ablation.screen``: the untrained model's greedy held-out score on candidate RULER tasks.

An RL ablation needs a task the base model neither solves nor always misses: GRPO / DAPO learn only from groups whose
rollouts score differently, and a held-out score near 0 or 100 % has nowhere to show a difference. This scores the
candidates at the lengths of interest with one engine, on records from a generator seed that no ablation run trains
or is scored on, and writes one CSV row per task and length.

    python -m experiments.ablation.screen --tasks niah_multikey_2 niah_multivalue_noise --lengths 4000 \\
        --out docs/ablation/4k/task_screen.csv
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

from experiments.ablation.runs import HeldOut
from longact_lightning.data.ruler import TASKS
from longact_lightning.models import EMBEDDED_MODEL, load_tokenizer
from longact_lightning.rollout import build_engine

SCREEN_SEED = 999  # training streams use the run seeds (0, 1, ...), the held-out set 1_000_003


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(prog="python -m experiments.ablation.screen", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", required=True, choices=sorted(TASKS))
    p.add_argument("--lengths", nargs="+", type=int, required=True, help="RULER prompt budgets (tokens)")
    p.add_argument("--samples", type=int, default=16, help="records per task and length")
    p.add_argument("--seed", type=int, default=SCREEN_SEED)
    p.add_argument("--max-tokens", type=int, default=48, help="greedy new tokens per record")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--engine", default="vllm", choices=("vllm", "hf"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the engine's dtype")
    p.add_argument("--kvcache-gib", type=float, default=1.0)
    p.add_argument("--out", type=Path, required=True, help="CSV to write")
    a = p.parse_args(argv)
    options: dict[str, object] = {"dtype": a.dtype}
    if a.engine == "vllm":
        options.update(max_model_len=max(a.lengths) + a.max_tokens + 64, kv_cache_gib=a.kvcache_gib)
    engine = build_engine(a.engine, a.model, **options)
    tokenizer = load_tokenizer(a.model)
    rows: list[dict[str, object]] = []
    for task in a.tasks:
        heldout = HeldOut(task, tuple(a.lengths), a.samples, a.seed, a.max_tokens)
        for length, result in heldout.evaluate(engine, tokenizer, a.model).items():
            row = {"task": task, "length": int(length), "records": result["records"],
                   "base_accuracy": round(result["accuracy"], 1), "seconds": result["seconds"]}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
