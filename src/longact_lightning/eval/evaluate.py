"""``longact eval``: greedy generation on RULER-style tasks and LongBench v2, scored with the official metrics.

The core is two plain functions that need no CLI, DataModule or Trainer, so experiments (the LongAct ablation) call
them on any engine:

* :func:`~longact_lightning.data.scoring.evaluate_records` — generate greedily for each record through a rollout
  engine and score the completion with the task's official metric (RULER ``string_match_all`` /
  ``string_match_part``, LongBench v2's extracted letter, InfiniteBench's); the validation loop of ``fit`` uses it
  too;
* :func:`summarize` — official aggregates: RULER per task and length (mean × 100, 2 decimals) plus the mean over
  tasks per length, LongBench v2's overall / easy / hard / short / medium / long (``result.py``), and the mean × 100
  of any other task.

:func:`run_eval` wires them to the CLI: records from the DataModule's source or from explicit RULER tasks/lengths
(plus LongBench v2 when its data path is given), the DataModule's engine (vLLM by default, its ``engine_options``
honoured; ``engine: hf`` or a missing vLLM uses transformers), and JSON / CSV / JSONL / rich output.

A Lightning ``.ckpt`` (``ckpt_path``) is loaded into the module's policy and exported to ``<output_dir>/policy_hf``,
which the engine then serves; a HF directory is evaluated directly with ``--model.model <dir>``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

from longact_lightning.data import longbench, ruler
from longact_lightning.data.records import PromptRecord
from longact_lightning.data.rewards import postprocess_prediction, ruler_score
from longact_lightning.data.ruler import RulerSource
from longact_lightning.data.scoring import RecordResult, evaluate_records
from longact_lightning.data.sources import PromptSource
from longact_lightning.eval.checkpoints import export_policy, read_policy_checkpoint
from longact_lightning.eval.report import print_table, write_csv, write_json
from longact_lightning.rollout import build_engine


def summarize(results: Sequence[RecordResult]) -> dict[str, Any]:
    """Official aggregates of :func:`evaluate_records` results.

    Returns:
        ``{"ruler": [{task, target_length, metric, score, samples, nulls, official}],
        "ruler_mean": [{target_length, score, tasks}], "longbench_v2": {overall, easy, hard, short, medium, long,
        samples} | None, "other": [{task, metric, score, samples}]}``; scores in percent. ``nulls`` counts empty
        predictions, as RULER's ``evaluate.py`` reports them; ``ruler_mean`` is the plain mean of the task scores of
        one length (RULER's per-length number).
    """
    ruler_groups: dict[tuple[str, int], list[RecordResult]] = {}
    other_groups: dict[str, list[RecordResult]] = {}
    longbench_results = []
    for result in results:
        if result.task in ruler.TASKS:
            ruler_groups.setdefault((result.task, int(result.metadata["target_length"])), []).append(result)
        elif result.task == longbench.TASK:
            longbench_results.append(result)
        else:
            other_groups.setdefault(result.task, []).append(result)
    ruler_rows: list[dict[str, Any]] = [
        {
            "task": task,
            "target_length": length,
            "metric": group[0].metric,
            "score": ruler_score(r.score for r in group),
            "samples": len(group),
            "nulls": sum(postprocess_prediction(r.prediction) == "" for r in group),
            "official": bool(group[0].metadata.get("official", True)),
        }
        for (task, length), group in sorted(ruler_groups.items(), key=lambda item: (item[0][1], item[0][0]))
    ]
    lengths = sorted({row["target_length"] for row in ruler_rows})
    ruler_mean = [
        {
            "target_length": length,
            "score": round(statistics.fmean(r["score"] for r in ruler_rows if r["target_length"] == length), 2),
            "tasks": sum(r["target_length"] == length for r in ruler_rows),
        }
        for length in lengths
    ]
    longbench_summary = None
    if longbench_results:
        items = [
            {
                "difficulty": r.metadata["difficulty"],
                "length": r.metadata["length"],
                "judge": r.score == 1.0,
                "pred": r.metadata["pred"],
            }
            for r in longbench_results
        ]
        longbench_summary = {**longbench.breakdown(items), "samples": len(items)}
    other = [
        {"task": task, "metric": group[0].metric, "score": ruler_score(r.score for r in group), "samples": len(group)}
        for task, group in other_groups.items()
    ]
    return {"ruler": ruler_rows, "ruler_mean": ruler_mean, "longbench_v2": longbench_summary, "other": other}


def score_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The summary as one flat table: ``benchmark, task, target_length, metric, score, samples``."""
    rows = [
        {"benchmark": "ruler", "task": r["task"], "target_length": r["target_length"], "metric": r["metric"],
         "score": r["score"], "samples": r["samples"]}
        for r in summary["ruler"]
    ]  # fmt: skip
    rows += [
        {"benchmark": "ruler", "task": "mean", "target_length": r["target_length"], "metric": "mean_of_tasks",
         "score": r["score"], "samples": r["tasks"]}
        for r in summary["ruler_mean"]
    ]  # fmt: skip
    if summary["longbench_v2"] is not None:
        lb = summary["longbench_v2"]
        rows += [
            {"benchmark": "longbench_v2", "task": key, "target_length": "", "metric": "accuracy", "score": lb[key],
             "samples": lb["samples"]}
            for key in longbench.BREAKDOWN_KEYS
        ]  # fmt: skip
    rows += [
        {"benchmark": "other", "task": r["task"], "target_length": "", "metric": r["metric"], "score": r["score"],
         "samples": r["samples"]}
        for r in summary["other"]
    ]  # fmt: skip
    return rows


def run_eval(
    model: Any,
    datamodule: Any,
    output_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    lengths: Sequence[int] | None = None,
    num_samples: int | None = None,
    longbench_path: str | None = None,
    longbench_max_length: int | None = None,
    max_tokens: int | None = None,
    ckpt_path: str | None = None,
) -> dict[str, Any]:
    """Evaluate the module's model (or ``ckpt_path``) and write ``scores.csv``, ``scores.json``, ``predictions.jsonl``.

    Args:
        model: an :class:`~longact_lightning.rl.module.RLPolicyModule`; ``hparams.model`` names what is evaluated.
        datamodule: a :class:`~longact_lightning.data.datamodule.RolloutDataModule`: its source, tokenizer and engine
            (``engine``, ``engine_options``) are used.
        output_dir: where results go (created).
        tasks: RULER tasks to generate; ``None`` = the source's task for a RulerSource, else the source's records.
        lengths: RULER target lengths; ``None`` = the RulerSource's own, else 1024.
        num_samples: records per RULER task and length (``None``: the RulerSource's ``num_samples``, else 20); for
            other sources and LongBench v2, the first ``num_samples`` records (``None`` = all).
        longbench_path: LongBench v2 data (hub id, ``data.json`` or parquet); ``None`` skips it.
        longbench_max_length: middle-truncate LongBench v2 prompts to this many tokens (the model's context).
        max_tokens: tokens to generate for every record; ``None`` = each benchmark's own budget.
        ckpt_path: a Lightning ``.ckpt`` of the module; its policy is exported to ``<output_dir>/policy_hf`` and served.

    Returns:
        The :func:`summarize` summary.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = datamodule.tokenizer
    records = eval_records(datamodule.source, tokenizer, tasks, lengths, num_samples)
    if longbench_path is not None:
        source = longbench.LongBenchV2Source(longbench_path, max_length=longbench_max_length, tokenizer=tokenizer)
        records += list(islice(source, num_samples))
    if ckpt_path is not None:
        state, _ = read_policy_checkpoint(ckpt_path)
        model.policy.load_state_dict(state, strict=True)
        served = export_policy(model.policy, model.hparams.tokenizer or model.hparams.model, out / "policy_hf")
        engine = build_engine(datamodule.engine_kind, served, **datamodule.engine_options)
    else:
        served = datamodule.model
        engine = datamodule.engine
    results = evaluate_records(engine, tokenizer, records, max_tokens)
    summary = summarize(results)
    rows = score_rows(summary)
    config = {
        "model": model.hparams.model,
        "served": served,
        "ckpt_path": ckpt_path,
        "engine": type(engine).__name__,
        "max_tokens": max_tokens,
        "records": len(records),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_csv(rows, out / "scores.csv")
    write_json({"config": config, "summary": summary}, out / "scores.json")
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(asdict(result), default=str) + "\n")
    print_table(f"Scores of {model.hparams.model} ({config['engine']}, greedy)", rows, digits=2)
    return summary


def eval_records(
    source: Any,
    tokenizer: Any,
    tasks: Sequence[str] | None,
    lengths: Sequence[int] | None,
    num_samples: int | None,
) -> list[PromptRecord]:
    """RULER records for ``tasks`` x ``lengths`` (defaults from a RulerSource), or the source's own records."""
    is_ruler = isinstance(source, RulerSource)
    if tasks is None and not is_ruler:
        if isinstance(source, PromptSource):
            source.connect(tokenizer)
        return list(islice(source, num_samples))
    tasks = list(tasks) if tasks is not None else [source.task]
    lengths = list(lengths) if lengths is not None else [source.target_length if is_ruler else 1024]
    count = num_samples or (source.num_samples if is_ruler else 20)
    seed = source.seed if is_ruler else 42
    return [
        record
        for length in lengths
        for task in tasks
        for record in RulerSource(task, length, tokenizer, num_samples=count, seed=seed)
    ]
