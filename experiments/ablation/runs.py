"""One ablation run: ``longact fit`` in its own subprocess, then the held-out score of the policy it exported.

Each run is a fresh process (vLLM and torch state never leak between runs). At the end of that process the exported
HF policy is read back from disk into the run's already-running rollout engine and scored greedily on a fixed
held-out RULER set (a generator seed far from any training stream) at one or more lengths (the training length, and
2x it to see whether a gain carries to longer inputs), which saves a second engine start per run. A run
writes ``<out>/<arm>_seed<k>/result.json`` last, so a run without it is redone from scratch and the ablation resumes
by rerunning its command.
"""

from __future__ import annotations

import argparse
import csv
import json
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

from safetensors.torch import load_file

from benchmarks._machine import machine_line
from longact_lightning.cli import cli_main
from longact_lightning.data.ruler import RulerSource
from longact_lightning.data.scoring import RecordResult, evaluate_records
from longact_lightning.models import EMBEDDED_MODEL, load_tokenizer
from longact_lightning.rollout import EngineKind, build_engine

DEFAULT_CONFIG = "configs/smollm_cpu_demo.yaml"
HELDOUT_SEED = 1_000_003  # training streams use the run seed (0, 1, 2, ...); this one is far from any of them
DRIVER = [sys.executable, "-m", "experiments.ablation"]


@dataclass(frozen=True)
class HeldOut:
    """The fixed held-out set: ``num_samples`` RULER ``task`` records per length in ``lengths``, all from generator
    ``seed`` (so only the haystack grows with the length), decoded greedily up to ``max_tokens`` new tokens."""

    task: str
    lengths: tuple[int, ...]
    num_samples: int
    seed: int
    max_tokens: int

    def evaluate(self, engine: Any, tokenizer: Any, model: str) -> dict[str, dict[str, Any]]:
        """``{str(length): result}`` (see :func:`_heldout_result`) of what ``engine`` serves, named ``model``."""
        evaluations = {}
        for length in self.lengths:
            started = time.perf_counter()
            records = list(RulerSource(self.task, length, tokenizer, num_samples=self.num_samples, seed=self.seed))
            results = evaluate_records(engine, tokenizer, records, self.max_tokens)
            evaluations[str(length)] = _heldout_result(model, results, started)
        return evaluations


@dataclass(frozen=True)
class AblationSettings:
    """Everything that defines the ablation; written into every result, so the report names any that differs.

    ``heldout_lengths`` are the held-out prompt budgets (default: the training length alone); the first is the
    run's headline ``accuracy``. ``precision`` is the trainer's (``32-true`` or ``bf16-mixed``, fp32 master weights
    either way); the engine serves in the matching dtype, as vLLM does bf16 on GPUs. ``train_overrides`` are extra
    ``longact fit`` arguments applied to every run (after the ablation's own).
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
    heldout_lengths: tuple[int, ...] = ()
    heldout_seed: int = HELDOUT_SEED
    eval_max_tokens: int = 32
    engine: EngineKind = "vllm"
    precision: str = "32-true"
    kvcache_gib: float = 1.0
    train_overrides: tuple[str, ...] = ()

    @property
    def heldout(self) -> HeldOut:
        lengths = self.heldout_lengths or (self.target_length,)
        return HeldOut(self.task, lengths, self.heldout_samples, self.heldout_seed, self.eval_max_tokens)

    @property
    def engine_options(self) -> dict[str, Any]:
        dtype = "bfloat16" if self.precision.startswith("bf16") else "float32"
        if self.engine != "vllm":
            return {"dtype": dtype}
        # one engine serves the rollouts and every held-out length; RULER prompts stay within their budget
        longest = max(self.target_length, *self.heldout.lengths)
        max_len = longest + max(self.max_new_tokens, self.eval_max_tokens) + 64
        return {"dtype": dtype, "max_model_len": max_len, "kv_cache_gib": self.kvcache_gib}


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
        "--trainer.precision", settings.precision,
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
        "--data.val_source", "null",  # the held-out score is taken once, at the end, on the ablation's own set
        *settings.train_overrides,
    ]  # fmt: skip


def eval_args(settings: AblationSettings, model_dir: str, output: Path) -> list[str]:
    return [
        "_eval",
        "--model", model_dir,
        "--output", str(output),
        "--task", settings.task,
        "--lengths", *map(str, settings.heldout.lengths),
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
    model: str, heldout: HeldOut, engine: EngineKind = "vllm", engine_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Greedy held-out accuracy (RULER's metric, in percent) of ``model``, served by a new engine, per length."""
    serving = build_engine(engine, model, **dict(engine_options or {}))
    return heldout.evaluate(serving, load_tokenizer(model), model)


def evaluate_export(datamodule: Any, export_dir: str | Path, heldout: HeldOut) -> dict[str, dict[str, Any]]:
    """Held-out accuracy of the exported HF policy, served by the run's own (already started) rollout engine.

    The exported safetensors are read back from ``export_dir`` and pushed into the engine (the same in-place weight
    load the trainer uses after each step, which also drops the prefix cache), so what is scored is exactly the
    exported policy, without paying for a second engine start in a fresh process.
    """
    files = sorted(Path(export_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors in {export_dir}: did the run export its policy (model.export_dir)?")
    engine = datamodule.engine
    for file in files:
        engine.load_weights(load_file(str(file)).items())
    return heldout.evaluate(engine, datamodule.tokenizer, str(export_dir))


def _heldout_result(model: str, results: Sequence[RecordResult], started: float) -> dict[str, Any]:
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


def train_eval_main(argv: Sequence[str]) -> None:
    """Worker: ``longact fit`` (in this process, through :func:`cli_main`), then :func:`evaluate_export`."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.ablation _train_eval", description="Train one run, score its export."
    )
    parser.add_argument("--spec", required=True, type=Path, help="JSON: fit_args, export_dir, eval, output")
    spec = json.loads(parser.parse_args(argv).spec.read_text())
    started = time.perf_counter()
    cli = cli_main(spec["fit_args"])
    train_seconds = time.perf_counter() - started
    heldout = HeldOut(**{**spec["eval"], "lengths": tuple(spec["eval"]["lengths"])})
    evaluations = evaluate_export(cli.datamodule, spec["export_dir"], heldout)
    output = {"train_seconds": round(train_seconds, 1), "heldout": evaluations}
    Path(spec["output"]).write_text(json.dumps(output, indent=2))
    _print_heldout(spec["export_dir"], evaluations)


def _print_heldout(model: str, evaluations: Mapping[str, Mapping[str, Any]]) -> None:
    for length, result in evaluations.items():
        print(f"held-out accuracy of {model} at {length} tokens: {result['accuracy']:.2f} % on {result['records']} "
              f"records")  # fmt: skip


def eval_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.ablation _eval", description="Held-out evaluation of one model (worker)."
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--task", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", required=True)
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--engine", default="vllm", choices=("vllm", "hf"))
    parser.add_argument("--engine-options", default="{}")
    a = parser.parse_args(argv)
    heldout = HeldOut(a.task, tuple(a.lengths), a.num_samples, a.seed, a.max_tokens)
    evaluations = evaluate_model(a.model, heldout, a.engine, json.loads(a.engine_options))
    a.output.write_text(json.dumps({"heldout": evaluations}, indent=2))
    _print_heldout(a.model, evaluations)


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


def _heldout_summary(evaluations: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A run's held-out fields: ``accuracy`` at the first length (the headline) and ``heldout`` per length."""
    first = next(iter(evaluations.values()))
    kept = ("accuracy", "records", "scores")
    return {
        "accuracy": first["accuracy"],
        "heldout": {length: {key: e[key] for key in kept} for length, e in evaluations.items()},
        "eval_seconds": round(sum(e["seconds"] for e in evaluations.values()), 1),
    }


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
        "eval": asdict(settings.heldout),
        "output": str(eval_path),
    }  # fmt: skip
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    cmd = [*DRIVER, "_train_eval", "--spec", str(run_dir / "spec.json")]
    seconds = _run(cmd, run_dir / "run.log")
    evaluation = json.loads(eval_path.read_text())
    metrics = _read_metrics(run_dir / "logs" / "metrics.csv")
    rewards = [v for _, v in sorted(metrics.get("train/reward_mean", []))]
    result = {
        "arm": arm,
        "seed": seed,
        **_heldout_summary(evaluation["heldout"]),
        "reward_curve": rewards,
        "steps_logged": len(rewards),
        "train_seconds": evaluation["train_seconds"],
        "wall_seconds": round(seconds, 1),
        "machine": machine_line(),
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
    base_dir = out / "base"
    result_path = base_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    base_dir.mkdir(parents=True, exist_ok=True)
    eval_path = base_dir / "eval.json"
    cmd = [*DRIVER, *eval_args(settings, EMBEDDED_MODEL, eval_path)]
    seconds = _run(cmd, base_dir / "run.log")
    evaluation = json.loads(eval_path.read_text())
    result = {"arm": "base", **_heldout_summary(evaluation["heldout"]), "wall_seconds": round(seconds, 1),
              "machine": machine_line(), "settings": asdict(settings)}  # fmt: skip
    result_path.write_text(json.dumps(result, indent=2))
    return result
