"""The LongAct ablation: four row-selection arms x several seeds, trained and evaluated on the same data.

Arms (``--longact.mode``): ``high`` (LongAct: update the most salient 30 % of the W_Q / W_K rows), ``none`` (uniform
updates, the baseline), ``random`` (a random 30 % of the rows: the same sparsity without the saliency) and ``low`` (the
least salient 30 %). For every seed all arms see the same prompt stream, the same rollout sampling seed and the same
held-out set, so the comparison with ``none`` is paired by seed.

Each run is ``longact fit`` (:func:`~longact_lightning.cli.cli_main`) on a base config with overrides, in its own
subprocess (vLLM and torch state never leak between runs); at the end of that subprocess the exported HF policy is read
back from disk into the run's already-running rollout engine and scored greedily on a fixed held-out RULER set (a
different generator seed than any training stream), which saves a second engine start per run. Results go to
``<out>/<arm>_seed<k>/result.json``;
an existing ``result.json`` is skipped, so rerunning the same command resumes where an interrupted ablation stopped.
The base model is evaluated once on the same held-out set (``<out>/base/result.json``) as a reference.

At the end (and with ``--report-only`` at any time) it writes ``results.csv`` / ``results.md`` (per arm: mean held-out
accuracy with a 95 % t-interval over seeds; per arm vs ``none``: the paired per-seed difference with its t-interval and
two-sided p-value) and ``ablation.png`` (training reward per step, mean over seeds with a 95 % band, and held-out
accuracy per arm).

    python -m longact_lightning.eval.ablation --out docs/ablation --seeds 0 1 2 --steps 4

The statistics are small pure functions (:func:`mean_ci`, :func:`paired_difference`, :func:`t_quantile`) that need
no scipy.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARMS = ("high", "none", "random", "low")
BASELINE = "none"
DEFAULT_CONFIG = "configs/smollm_cpu_demo.yaml"
HELDOUT_SEED = 1_000_003  # training streams use the run seed (0, 1, 2, ...); this one is far from any of them

# ----------------------------------------------------------------------------------------------------------------
# Statistics (pure; unit-tested in tests/unit/test_ablation_stats.py)
# ----------------------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """CDF of Student's t distribution with ``dof`` degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"dof={dof} must be > 0.")
    tail = 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """Inverse of :func:`t_cdf` (bisection; 1e-12 accurate), e.g. ``t_quantile(0.975, 2) = 4.3027``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1).")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t confidence interval (``half_width`` is NaN for fewer than two values)."""

    n: int
    mean: float
    sd: float
    half_width: float
    confidence: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided ``confidence`` t-interval: ``mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)`` (sd with n-1)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci() needs at least one value.")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, confidence)
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, half, confidence)


@dataclass(frozen=True)
class PairedDifference:
    """``treatment - control`` over the keys (seeds) both have: the per-key differences, their t-interval, the
    paired t statistic and its two-sided p-value (NaN when undefined: fewer than two pairs or zero spread)."""

    keys: tuple[Any, ...]
    differences: tuple[float, ...]
    interval: Interval
    t: float
    p_value: float


def paired_difference(
    treatment: Mapping[Any, float], control: Mapping[Any, float], confidence: float = 0.95
) -> PairedDifference:
    """Paired comparison of two arms run with the same seeds: differences per shared seed, then :func:`mean_ci`."""
    keys = tuple(sorted(set(treatment) & set(control)))
    if not keys:
        raise ValueError("paired_difference() needs at least one key (seed) present in both arms.")
    diffs = tuple(float(treatment[k]) - float(control[k]) for k in keys)
    interval = mean_ci(diffs, confidence)
    t = p = math.nan
    if interval.n >= 2:
        se = interval.sd / math.sqrt(interval.n)
        if se > 0:
            t = interval.mean / se
            p = 2.0 * (1.0 - t_cdf(abs(t), interval.n - 1))
        elif interval.mean != 0:
            t, p = math.copysign(math.inf, interval.mean), 0.0
    return PairedDifference(keys, diffs, interval, t, p)


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AblationSettings:
    """Everything that defines the ablation; written into every result so runs with different settings are not mixed.

    ``train_overrides`` are extra ``longact fit`` arguments applied to every run (after the ablation's own).
    """

    config: str = DEFAULT_CONFIG
    steps: int = 4
    lr: float = 5e-5
    task: str = "niah_multikey_2"
    target_length: int = 512
    prompts_per_step: int = 2
    group_size: int = 4
    max_new_tokens: int = 24
    heldout_samples: int = 48
    heldout_seed: int = HELDOUT_SEED
    eval_max_tokens: int = 32
    engine: str = "vllm"
    kvcache_gib: float = 1.0
    train_overrides: tuple[str, ...] = ()

    @property
    def engine_options(self) -> dict[str, Any]:
        if self.engine != "vllm":
            return {"dtype": "float32"}
        max_len = self.target_length + max(self.max_new_tokens, self.eval_max_tokens) + 64
        return {"dtype": "float32", "max_model_len": max_len, "kv_cache_gib": self.kvcache_gib}


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_seed{seed}"


def train_args(settings: AblationSettings, arm: str, seed: int, run_dir: Path) -> list[str]:
    """``longact fit`` arguments of one run: the base config, the arm, the seed (everywhere a seed matters) and sizes.

    The seed sets the global RNG (``seed_everything``), the training prompt stream (``data.source.init_args.seed``),
    the rollout sampling seed (``data.seed``) and the random arm's row draw (``longact.seed``); the arm changes only
    ``longact.mode``. Dynamic sampling is off so each step consumes exactly ``prompts_per_step`` prompts: all arms of a
    seed then train on the same prompts in the same order, and ``train/reward_mean`` is the mean over all rollouts
    (not only the groups dynamic sampling would keep). Checkpoints are off (a run is short; an interrupted run is
    redone); the CSV log and the HF export go under ``run_dir``.
    """
    logger = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": str(run_dir), "name": "logs", "version": ""}},
    ]  # fmt: skip
    return [
        "fit",
        "--config", settings.config,
        "--longact.mode", arm,
        "--longact.seed", str(seed),
        "--seed_everything", str(seed),
        "--trainer.max_steps", str(settings.steps),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--checkpoint.save_last", "false",
        "--checkpoint.save_top_k", "0",
        "--checkpoint.every_n_train_steps", "0",
        "--checkpoint.save_on_exception", "false",
        "--model.export_dir", str(run_dir / "hf"),
        "--model.lr", repr(settings.lr),
        "--data.source.class_path", "longact_lightning.data.ruler.RulerSource",
        "--data.source.init_args.task", settings.task,
        "--data.source.init_args.target_length", str(settings.target_length),
        "--data.source.init_args.num_samples", str(max(64, settings.steps * settings.prompts_per_step)),
        "--data.source.init_args.seed", str(seed),
        "--data.seed", str(seed),
        "--data.engine", settings.engine,
        "--data.engine_options", json.dumps(settings.engine_options),
        "--data.prompts_per_step", str(settings.prompts_per_step),
        "--data.group_size", str(settings.group_size),
        "--data.max_new_tokens", str(settings.max_new_tokens),
        "--data.dynamic_sampling", "false",
        *settings.train_overrides,
    ]  # fmt: skip


def eval_args(settings: AblationSettings, model_dir: str, output: Path) -> list[str]:
    return [
        "_eval",
        "--model", model_dir,
        "--output", str(output),
        "--task", settings.task,
        "--target-length", str(settings.target_length),
        "--num-samples", str(settings.heldout_samples),
        "--seed", str(settings.heldout_seed),
        "--max-tokens", str(settings.eval_max_tokens),
        "--engine", settings.engine,
        "--engine-options", json.dumps(settings.engine_options),
    ]  # fmt: skip


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd``, appending its output to ``log_path``; returns seconds; raises with the log tail on failure."""
    started = time.perf_counter()
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_subprocess_env(), check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-40:])
        raise RuntimeError(f"{cmd[:4]}... failed with exit code {proc.returncode}; see {log_path}. Tail:\n{tail}")
    return seconds


def evaluate_model(
    model: str,
    task: str,
    target_length: int,
    num_samples: int,
    seed: int,
    max_tokens: int,
    engine: str = "vllm",
    engine_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Greedy held-out accuracy (RULER's metric, in percent) of ``model`` on ``num_samples`` records from ``seed``."""
    from longact_lightning.data.ruler import RulerSource
    from longact_lightning.data.scoring import evaluate_records
    from longact_lightning.eval.evaluate import summarize
    from longact_lightning.models import load_tokenizer
    from longact_lightning.rollout import build_engine

    started = time.perf_counter()
    tokenizer = load_tokenizer(model)
    records = list(RulerSource(task, target_length, tokenizer, num_samples=num_samples, seed=seed))
    serving = build_engine(engine, model, **dict(engine_options or {}))
    results = evaluate_records(serving, tokenizer, records, max_tokens)
    return {**_heldout_result(model, results, started), "summary_score": summarize(results)["ruler"][0]["score"]}


def evaluate_export(
    datamodule: Any,
    export_dir: str | Path,
    task: str,
    target_length: int,
    num_samples: int,
    seed: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Held-out accuracy of the exported HF policy, served by the run's own (already started) rollout engine.

    The exported safetensors are read back from ``export_dir`` and pushed into the engine (the same in-place weight
    load the trainer uses after each step, which also drops the prefix cache), so what is scored is exactly the
    exported policy, without paying for a second engine start in a fresh process.
    """
    from safetensors.torch import load_file

    from longact_lightning.data.ruler import RulerSource
    from longact_lightning.data.scoring import evaluate_records

    started = time.perf_counter()
    files = sorted(Path(export_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors in {export_dir}: did the run export its policy (model.export_dir)?")
    engine, tokenizer = datamodule.engine, datamodule.tokenizer
    for file in files:
        engine.load_weights(load_file(str(file)).items())
    records = list(RulerSource(task, target_length, tokenizer, num_samples=num_samples, seed=seed))
    return _heldout_result(str(export_dir), evaluate_records(engine, tokenizer, records, max_tokens), started)


def _heldout_result(model: str, results: Sequence[Any], started: float) -> dict[str, Any]:
    """The JSON-ready record of one held-out evaluation (accuracy in percent, per-record scores and predictions)."""
    scores = [r.score for r in results]
    return {
        "model": model,
        "accuracy": 100.0 * statistics.fmean(scores),
        "records": len(results),
        "scores": scores,
        "predictions": [r.prediction for r in results],
        "answers": [list(r.answers) for r in results],
        "truncated": sum(r.truncated for r in results),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _train_eval_main(argv: Sequence[str]) -> None:
    """Worker: ``longact fit`` (in this process, through :func:`cli_main`), then :func:`evaluate_export`."""
    parser = argparse.ArgumentParser(prog="ablation _train_eval", description="Train one run, score its export.")
    parser.add_argument("--spec", required=True, type=Path, help="JSON: fit_args, export_dir, eval, output")
    spec = json.loads(parser.parse_args(argv).spec.read_text())
    # Import everything the evaluation needs before training: a module imported lazily after a long fit could come
    # from a newer checkout than the ones already loaded (other people edit this tree while runs are going).
    import longact_lightning.data.ruler  # noqa: F401
    import longact_lightning.eval.evaluate  # noqa: F401
    from longact_lightning.cli import cli_main

    started = time.perf_counter()
    cli = cli_main(spec["fit_args"])
    train_seconds = time.perf_counter() - started
    result = evaluate_export(cli.datamodule, spec["export_dir"], **spec["eval"])
    result["train_seconds"] = round(train_seconds, 1)
    Path(spec["output"]).write_text(json.dumps(result, indent=2))
    print(f"held-out accuracy of {spec['export_dir']}: {result['accuracy']:.2f} % on {result['records']} records")


def _read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning CSV log (rows with an empty cell skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return series
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step", "")
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None) or step == "":
                    continue
                series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


def run_one(settings: AblationSettings, arm: str, seed: int, out: Path, keep_weights: bool = False) -> dict[str, Any]:
    """Train and evaluate one arm x seed unless ``<out>/<arm>_seed<seed>/result.json`` exists; returns the result."""
    run_dir = out / run_name(arm, seed)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    if run_dir.exists():  # an interrupted run: start it over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    eval_path = run_dir / "eval.json"
    spec = {
        "fit_args": train_args(settings, arm, seed, run_dir),
        "export_dir": str(run_dir / "hf"),
        "eval": {"task": settings.task, "target_length": settings.target_length,
                 "num_samples": settings.heldout_samples, "seed": settings.heldout_seed,
                 "max_tokens": settings.eval_max_tokens},
        "output": str(eval_path),
    }  # fmt: skip
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    cmd = [sys.executable, "-m", "longact_lightning.eval.ablation", "_train_eval", "--spec", str(run_dir / "spec.json")]
    seconds = _run(cmd, run_dir / "run.log")
    evaluation = json.loads(eval_path.read_text())
    train_seconds, eval_seconds = evaluation["train_seconds"], evaluation["seconds"]
    metrics = _read_metrics(run_dir / "logs" / "metrics.csv")
    rewards = [v for _, v in sorted(metrics.get("train/reward_mean", []))]
    result = {
        "arm": arm,
        "seed": seed,
        "accuracy": evaluation["accuracy"],
        "heldout_records": evaluation["records"],
        "heldout_scores": evaluation["scores"],
        "reward_curve": rewards,
        "steps_logged": len(rewards),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": round(seconds, 1),
        "settings": asdict(settings),
        "train_command": "longact " + shlex.join(train_args(settings, arm, seed, run_dir)),
    }
    if not keep_weights:
        shutil.rmtree(run_dir / "hf", ignore_errors=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    result_path.write_text(json.dumps(result, indent=2))
    return result


def run_base(settings: AblationSettings, out: Path) -> dict[str, Any]:
    """The untrained model on the same held-out set (``<out>/base/result.json``), once."""
    from longact_lightning.models import EMBEDDED_MODEL

    base_dir = out / "base"
    result_path = base_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    base_dir.mkdir(parents=True, exist_ok=True)
    eval_path = base_dir / "eval.json"
    cmd = [sys.executable, "-m", "longact_lightning.eval.ablation", *eval_args(settings, EMBEDDED_MODEL, eval_path)]
    seconds = _run(cmd, base_dir / "run.log")
    evaluation = json.loads(eval_path.read_text())
    result = {
        "arm": "base",
        "accuracy": evaluation["accuracy"],
        "heldout_records": evaluation["records"],
        "heldout_scores": evaluation["scores"],
        "eval_seconds": round(seconds, 1),
        "settings": asdict(settings),
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def load_results(out: Path) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, Any] | None]:
    """``({arm: {seed: result}}, base result or None)`` from every ``result.json`` under ``out``."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    base = None
    for path in sorted(out.glob("*/result.json")):
        result = json.loads(path.read_text())
        if result["arm"] == "base":
            base = result
        else:
            runs.setdefault(result["arm"], {})[int(result["seed"])] = result
    return runs, base


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def summary_rows(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], last_k: int = 3) -> list[dict[str, Any]]:
    """One row per arm: held-out accuracy mean ± 95 % CI, paired difference vs ``none``, final training reward."""
    rows = []
    control = {s: r["accuracy"] for s, r in runs.get(BASELINE, {}).items()}
    for arm in [a for a in ARMS if a in runs] + sorted(set(runs) - set(ARMS)):
        by_seed = runs[arm]
        acc = mean_ci([r["accuracy"] for r in by_seed.values()])
        final_rewards = [statistics.fmean(r["reward_curve"][-last_k:]) for r in by_seed.values() if r["reward_curve"]]
        reward = mean_ci(final_rewards) if final_rewards else None
        row: dict[str, Any] = {
            "arm": arm,
            "seeds": acc.n,
            "heldout_acc_mean": round(acc.mean, 2),
            "heldout_acc_ci95": round(acc.half_width, 2) if not math.isnan(acc.half_width) else "",
            "per_seed": " ".join(f"{s}:{by_seed[s]['accuracy']:.1f}" for s in sorted(by_seed)),
            f"reward_last{last_k}_mean": round(reward.mean, 3) if reward else "",
            f"reward_last{last_k}_ci95": (
                round(reward.half_width, 3) if reward and not math.isnan(reward.half_width) else ""
            ),
            "diff_vs_none": "",
            "diff_ci95": "",
            "paired_t": "",
            "p_value": "",
            "train_s_mean": round(statistics.fmean(r["train_seconds"] for r in by_seed.values()), 1),
            "eval_s_mean": round(statistics.fmean(r["eval_seconds"] for r in by_seed.values()), 1),
        }
        if arm != BASELINE and control and set(control) & set(by_seed):
            diff = paired_difference({s: r["accuracy"] for s, r in by_seed.items()}, control)
            row["diff_vs_none"] = round(diff.interval.mean, 2)
            row["diff_ci95"] = "" if math.isnan(diff.interval.half_width) else round(diff.interval.half_width, 2)
            row["paired_t"] = "" if math.isnan(diff.t) else round(diff.t, 2)
            row["p_value"] = "" if math.isnan(diff.p_value) else round(diff.p_value, 3)
        rows.append(row)
    return rows


def write_report(out: Path, command: str | None = None) -> list[dict[str, Any]]:
    """``results.csv``, ``results.md`` and ``ablation.png`` from the results present under ``out``.

    ``command`` (default: the one saved in ``<out>/command.txt`` by the last run) is quoted in ``results.md``.
    """
    if command is None and (out / "command.txt").is_file():
        command = (out / "command.txt").read_text().strip()
    runs, base = load_results(out)
    rows = summary_rows(runs)
    if rows:
        with (out / "results.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    lines = ["# LongAct ablation: results", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    any_run = next((r for by_seed in runs.values() for r in by_seed.values()), None)
    if any_run:
        s = any_run["settings"]
        lines += [
            f"Training: `{s['config']}` with {s['steps']} steps, lr {s['lr']}, RULER `{s['task']}` at "
            f"{s['target_length']} tokens, {s['prompts_per_step']} prompts x {s['group_size']} samples per step, "
            f"{s['max_new_tokens']} new "
            f"tokens, dynamic sampling off. Held-out: {s['heldout_samples']} records (seed {s['heldout_seed']}), "
            f"greedy, {s['eval_max_tokens']} new tokens, engine `{s['engine']}`.",
            "",
        ]
    if base:
        lines += [
            f"Base model (untrained) held-out accuracy: **{base['accuracy']:.1f} %** "
            f"({base['heldout_records']} records).",
            "",
        ]
    lines += [
        "| arm | seeds | held-out acc % (mean ± 95 % CI) | per seed | paired diff vs none (± 95 % CI) |"
        " paired t | p | final train reward (last 3 steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f" ± {r['heldout_acc_ci95']:.1f}" if r["heldout_acc_ci95"] != "" else ""
        diff = (
            ""
            if r["diff_vs_none"] == ""
            else f"{r['diff_vs_none']:+.1f}" + (f" ± {r['diff_ci95']:.1f}" if r["diff_ci95"] != "" else "")
        )
        reward = (
            ""
            if r["reward_last3_mean"] == ""
            else f"{r['reward_last3_mean']:.3f}"
            + (f" ± {r['reward_last3_ci95']:.3f}" if r["reward_last3_ci95"] != "" else "")
        )
        lines.append(
            f"| {r['arm']} | {r['seeds']} | {r['heldout_acc_mean']:.1f}{ci} | {r['per_seed']} | {diff or '—'} | "
            f"{r['paired_t'] if r['paired_t'] != '' else '—'} | {r['p_value'] if r['p_value'] != '' else '—'} | "
            f"{reward} |"
        )
    lines += [
        "",
        "CI: two-sided 95 % Student-t interval over seeds (n − 1 dof). Paired diff: per-seed accuracy(arm) −"
        " accuracy(none) with the same seed (same prompts, sampling seed and held-out set), then the t-interval and"
        " a paired t-test of those differences.",
        "",
        "![ablation](ablation.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    if runs:
        plot(runs, base, out / "ablation.png")
    return rows


def plot(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], base: Mapping[str, Any] | None, path: Path) -> None:
    """Left: ``train/reward_mean`` per step, mean over seeds with a 95 % t-band. Right: held-out accuracy per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in runs]
    colors = {"high": "tab:red", "none": "tab:gray", "random": "tab:blue", "low": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in arms:
        curves = [r["reward_curve"] for r in runs[arm].values() if r["reward_curve"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        steps = list(range(length))
        stats = [mean_ci([c[i] for c in curves]) for i in steps]
        means = [s.mean for s in stats]
        left.plot(steps, means, marker="o", color=colors.get(arm), label=f"{arm} (n={len(curves)})")
        if len(curves) > 1:
            left.fill_between(steps, [s.low for s in stats], [s.high for s in stats], color=colors.get(arm), alpha=0.15)
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("optimizer step (reward of the rollouts that step trained on)")
    left.set_ylabel("train/reward_mean (all rollouts)")
    left.set_title("Training reward: mean over seeds, 95 % t-band")
    left.legend()
    for i, arm in enumerate(arms):
        values = [runs[arm][s]["accuracy"] for s in sorted(runs[arm])]
        ci = mean_ci(values)
        right.scatter([i + 0.12] * len(values), values, color=colors.get(arm), alpha=0.6, s=18)
        err = 0.0 if math.isnan(ci.half_width) else ci.half_width
        right.errorbar([i], [ci.mean], yerr=[err], fmt="o", color=colors.get(arm), capsize=6, markersize=8)
    if base:
        label = f"base model {base['accuracy']:.1f} %"
        right.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1, label=label)
        right.legend(loc="lower right")
    right.set_xticks(range(len(arms)), arms)
    right.set_xlim(-0.5, len(arms) - 0.5)
    right.set_ylabel("held-out accuracy (%)")
    right.set_title("Held-out accuracy: mean ± 95 % CI (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def _eval_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="ablation _eval", description="Held-out evaluation of one model (worker).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--task", required=True)
    parser.add_argument("--target-length", type=int, required=True)
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--engine-options", default="{}")
    a = parser.parse_args(argv)
    result = evaluate_model(a.model, a.task, a.target_length, a.num_samples, a.seed, a.max_tokens, a.engine,
                            json.loads(a.engine_options))  # fmt: skip
    a.output.write_text(json.dumps(result, indent=2))
    print(f"held-out accuracy of {a.model}: {result['accuracy']:.2f} % on {result['records']} records")


def build_parser() -> argparse.ArgumentParser:
    d = AblationSettings()
    p = argparse.ArgumentParser(
        prog="python -m longact_lightning.eval.ablation",
        description="LongAct ablation: arms x seeds, each trained with `longact fit` in a subprocess and evaluated on "
        "a fixed held-out RULER set; resumable (runs with a result.json are skipped).",
    )
    p.add_argument("--out", type=Path, default=Path("docs/ablation"), help="output directory")
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
    p.add_argument("--eval-max-tokens", type=int, default=d.eval_max_tokens)
    p.add_argument("--engine", default=d.engine, choices=("vllm", "hf"))
    p.add_argument("--kvcache-gib", type=float, default=d.kvcache_gib)
    p.add_argument("--no-base", action="store_true", help="skip the base-model reference evaluation")
    p.add_argument("--keep-weights", action="store_true", help="keep each run's HF export (~0.5 GB each)")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.md/csv and the plot")
    p.epilog = "Arguments after a bare `--` are passed to every `longact fit` run (after the ablation's own)."
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_eval":
        _eval_main(argv[1:])
        return
    if argv and argv[0] == "_train_eval":
        _train_eval_main(argv[1:])
        return
    overrides: tuple[str, ...] = ()
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], tuple(argv[cut + 1 :])
    args = build_parser().parse_args(argv)
    settings = AblationSettings(
        config=args.config, steps=args.steps, lr=args.lr, task=args.task, target_length=args.target_length,
        prompts_per_step=args.prompts_per_step, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        heldout_samples=args.heldout_samples, heldout_seed=args.heldout_seed, eval_max_tokens=args.eval_max_tokens,
        engine=args.engine, kvcache_gib=args.kvcache_gib, train_overrides=overrides,
    )  # fmt: skip
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    full_argv = [*argv, *(["--", *overrides] if overrides else [])]
    command = None if args.report_only else "python -m longact_lightning.eval.ablation " + shlex.join(full_argv)
    if command:
        (out / "command.txt").write_text(command + "\n")
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
                write_report(out, command)
        elapsed = time.perf_counter() - started
        print(f"[ablation] finished in {elapsed:.0f} s; failed runs: {failed or 'none'}", flush=True)
    rows = write_report(out, command)
    for row in rows:
        print(row)
    if not args.report_only and failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed}; rerun the same command to retry them.")


if __name__ == "__main__":
    main()
