"""``longact profile``: are query/key magnitudes concentrated in a few channels on long inputs, and are the selected
channels the same across tasks, lengths and checkpoints?

The model runs (no grad, plain HF forward) over *conditions*: a task's prompts at a long and a short target length
(or at every length of ``lengths``, e.g. 1k / 2k / 4k / 8k, contexts then named by their length), for each
checkpoint. Per condition and per query/key projection it records the mean ``|activation|`` of every channel over
real tokens (``ChannelStats``, padding excluded), then reports:

* sparsity per layer and projection (``sparsity.csv`` / ``.json``): ``max / median``, the magnitude share of the
  top ``top_ratio`` channels, and the Gini coefficient as concentration index (0 = all channels equal,
  ``(n-1)/n`` = one channel holds everything; see :mod:`longact_lightning.eval.metrics`);
* mask stability (``stability.csv`` / ``.json``): Jaccard overlap of the top-``top_ratio`` masks between tasks (same
  length), between lengths (same task; every pair) and between checkpoints (same task and length), next to the
  overlap two random masks of the same size would have by chance;
* the selected mask (``mask.json``: selected channel indices per projection, from all tasks pooled at the longest
  length, i.e. what LongAct's profiling pass would select) and figures (``heatmaps/layer_XX.png`` per head,
  ``histograms.png``, ``magnitude_map.png``, ``mask.png``).

Task ``"all"`` in the tables pools the tokens of every task of one length and checkpoint.

Prompts: with a :class:`~longact_lightning.data.ruler.RulerSource` (or explicit ``tasks``) each task is generated at
every target length (RULER sizes the haystack; the template and needles stay the same). Any other source (LongBench
v2, JSONL, HF datasets) is read as is, ``num_samples`` records per task, and each prompt is middle-truncated to the
lengths; the tables report the mean prompt tokens actually seen, so a prompt shorter than a length is visible as
such.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from longact_lightning.data.records import PromptRecord, chat_prompt_ids
from longact_lightning.data.ruler import RulerSource
from longact_lightning.data.sources import PromptSource
from longact_lightning.eval.checkpoints import load_policy, read_policy_checkpoint
from longact_lightning.eval.collect import collect_channel_stats, merge_stats
from longact_lightning.eval.metrics import chance_jaccard, mask_jaccards, sparsity_metrics
from longact_lightning.eval.plots import layer_channel_map, layer_heatmap, magnitude_histograms
from longact_lightning.eval.prompts import truncate_middle_ids
from longact_lightning.eval.report import print_table, write_csv, write_json
from longact_lightning.saliency.masks import num_selected, select_channels
from longact_lightning.saliency.projections import QKProjection, find_qk_projections
from longact_lightning.saliency.stats import STATISTICS, Statistic

DEFAULT_TASKS: tuple[str, ...] = ("niah_single_1", "niah_multikey_2", "fwe")
POOLED = "all"

# (checkpoint label, task, context) -> {projection key: [channels] score}
Scores = dict[tuple[str, str, str], dict[str, torch.Tensor]]


def run_profile(
    model: Any,
    datamodule: Any,
    output_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    long_length: int = 1024,
    short_length: int = 384,
    lengths: Sequence[int] | None = None,
    num_samples: int = 4,
    top_ratio: float = 0.3,
    statistic: Statistic = "mean_abs",
    batch_size: int = 4,
    ckpt_path: str | None = None,
    compare_model: str | None = None,
) -> dict[str, Any]:
    """Profile the policy's query/key channel magnitudes and write tables and figures to ``output_dir``.

    Args:
        model: an :class:`~longact_lightning.rl.module.RLPolicyModule` (its HF model is ``.policy``).
        datamodule: a :class:`~longact_lightning.data.datamodule.RolloutDataModule` (``.source``, ``.tokenizer``).
        output_dir: where tables and PNGs go (created).
        tasks: RULER tasks to profile; ``None`` = the source's task plus two of :data:`DEFAULT_TASKS` for a
            RulerSource, or the source's own records otherwise.
        long_length: RULER target length (or truncation length) of the long context.
        short_length: the same for the short context.
        lengths: profile at each of these lengths instead (contexts named by their length, longest first), to see
            how concentration and masks change with length.
        num_samples: prompts per task and length.
        top_ratio: fraction of channels in the mask (paper: 0.3).
        statistic: per-channel statistic: ``mean_abs`` (what LongAct selects on), ``rms`` or ``max_abs``.
        batch_size: prompts per forward pass.
        ckpt_path: a Lightning ``.ckpt`` of the module to load into ``model.policy`` first.
        compare_model: a second checkpoint (HF directory, model name or ``.ckpt``) for checkpoint stability.

    Returns:
        The summary written to ``sparsity.json`` / ``stability.json`` (``{"sparsity": [...], "stability": [...]}``).
    """
    if lengths is not None:
        if len(set(lengths)) < 2 or min(lengths) < 2:
            raise ValueError(f"lengths={list(lengths)} needs at least two different lengths, each > 1 token.")
        contexts = {str(n): n for n in sorted(set(lengths), reverse=True)}
    elif long_length > short_length > 1:
        contexts = {"long": long_length, "short": short_length}
    else:
        raise ValueError(
            f"Need long_length > short_length > 1, got long_length={long_length}, short_length={short_length}."
        )
    longest = next(iter(contexts))
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r} is not one of {STATISTICS}.")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1.")
    out = Path(output_dir)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = datamodule.tokenizer
    if ckpt_path is not None:
        state, _ = read_policy_checkpoint(ckpt_path)
        model.policy.load_state_dict(state, strict=True)
    prompt_sets = build_prompt_sets(datamodule.source, tokenizer, tasks, contexts, num_samples)
    task_names = list(dict.fromkeys(task for task, _ in prompt_sets))

    policies = {"policy": model.policy}
    if compare_model is not None:
        policies["compare"] = load_policy(compare_model, base_model=model.hparams.model)
    projections = find_qk_projections(model.policy)
    scores: Scores = {}
    for label, policy in policies.items():
        pad = tokenizer.pad_token_id
        scores.update(profile_scores(policy, prompt_sets, task_names, pad, statistic, batch_size, label))
    masks = {cond: {key: select_channels(s, top_ratio) for key, s in by_key.items()} for cond, by_key in scores.items()}

    prompt_tokens = {cond: statistics.fmean(len(p) for p in prompts) for cond, prompts in prompt_sets.items()}
    for context in contexts:
        prompt_tokens[(POOLED, context)] = statistics.fmean(
            len(p) for (_, ctx), prompts in prompt_sets.items() if ctx == context for p in prompts
        )
    sparsity = sparsity_rows(scores, projections, contexts, prompt_tokens, top_ratio)
    stability = stability_rows(masks, projections, task_names)
    summary = {
        "sparsity": summarize_sparsity(sparsity),
        "stability": summarize_stability(stability, projections, top_ratio),
    }
    config = {
        "model": model.hparams.model,
        "ckpt_path": ckpt_path,
        "compare_model": compare_model,
        "tasks": task_names,
        "lengths": contexts,
        "num_samples": num_samples,
        "top_ratio": top_ratio,
        "statistic": statistic,
    }
    write_csv(sparsity, out / "sparsity.csv")
    write_json({"config": config, "summary": summary["sparsity"], "rows": sparsity}, out / "sparsity.json")
    write_csv(stability, out / "stability.csv")
    write_json({"config": config, "summary": summary["stability"], "rows": stability}, out / "stability.json")
    selected = masks[("policy", POOLED, longest)]
    write_json(
        {
            "selected_from": f"policy, tasks pooled, longest context ({contexts[longest]} tokens)",
            "top_ratio": top_ratio,
            "statistic": statistic,
            "selected_channels": {key: torch.nonzero(m).flatten().tolist() for key, m in selected.items()},
        },
        out / "mask.json",
    )
    write_figures(scores, masks, projections, out)
    print_table("Q/K sparsity (mean over layers)", [r for r in summary["sparsity"] if r["task"] == POOLED])
    print_table("Mask stability (mean Jaccard over layers)", summary["stability"])
    print(f"profile written to {out} in {time.perf_counter() - started:.0f} s")
    return summary


def build_prompt_sets(
    source: Any, tokenizer: Any, tasks: Sequence[str] | None, lengths: Mapping[str, int], num_samples: int
) -> dict[tuple[str, str], list[list[int]]]:
    """``{(task, context): [prompt token ids]}`` for every task and context (``lengths``: context name -> tokens)."""
    if tasks is not None or isinstance(source, RulerSource):
        if tasks is None:
            tasks = [source.task, *(t for t in DEFAULT_TASKS if t != source.task)][:3]
        seed = source.seed if isinstance(source, RulerSource) else 42
        return {
            (task, context): [
                chat_prompt_ids(tokenizer, r) for r in RulerSource(task, length, tokenizer, num_samples, seed=seed)
            ]
            for task in tasks
            for context, length in lengths.items()
        }
    if isinstance(source, PromptSource):
        source.connect(tokenizer)
    by_task: dict[str, list[PromptRecord]] = {}
    for record in source:
        group = by_task.setdefault(record.task, [])
        if len(group) < num_samples:
            group.append(record)
    return {
        (task, context): [truncate_middle_ids(chat_prompt_ids(tokenizer, r), length) for r in records]
        for task, records in by_task.items()
        for context, length in lengths.items()
    }


def profile_scores(
    policy: torch.nn.Module,
    prompt_sets: Mapping[tuple[str, str], Sequence[Sequence[int]]],
    tasks: Sequence[str],
    pad_token_id: int,
    statistic: Statistic,
    batch_size: int,
    label: str,
) -> Scores:
    """Per-condition channel scores of one checkpoint, including the pooled task :data:`POOLED` per context."""
    projections = find_qk_projections(policy)
    stats = {
        cond: collect_channel_stats(policy, projections, prompts, pad_token_id, batch_size)
        for cond, prompts in prompt_sets.items()
    }
    for context in dict.fromkeys(context for _, context in prompt_sets):
        stats[(POOLED, context)] = {
            p.key: merge_stats([stats[(task, context)][p.key] for task in tasks]) for p in projections
        }
    return {(label, *cond): {key: s.value(statistic) for key, s in by_key.items()} for cond, by_key in stats.items()}


def sparsity_rows(
    scores: Scores,
    projections: Sequence[QKProjection],
    lengths: Mapping[str, int],
    prompt_tokens: Mapping[tuple[str, str], float],
    top_ratio: float,
) -> list[dict[str, Any]]:
    """One row per (checkpoint, task, context, layer, kind) with the metrics of :func:`sparsity_metrics`."""
    rows = []
    for (label, task, context), by_key in scores.items():
        for proj in projections:
            rows.append(
                {
                    "checkpoint": label,
                    "task": task,
                    "context": context,
                    "target_length": lengths[context],
                    "mean_prompt_tokens": round(prompt_tokens[(task, context)], 1),
                    "layer": proj.layer,
                    "kind": proj.kind,
                    "channels": proj.channels,
                    **sparsity_metrics(by_key[proj.key], top_ratio),
                }
            )
    return rows


def summarize_sparsity(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean over layers (and the largest ``max / median`` of any layer) per checkpoint, task, context and kind."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["checkpoint"], row["task"], row["context"], row["kind"]), []).append(row)
    return [
        {
            "checkpoint": label,
            "task": task,
            "context": context,
            "kind": kind,
            "mean_prompt_tokens": group[0]["mean_prompt_tokens"],
            "max_over_median": statistics.fmean(r["max_over_median"] for r in group),
            "max_over_median_worst_layer": max(r["max_over_median"] for r in group),
            "top_share": statistics.fmean(r["top_share"] for r in group),
            "gini": statistics.fmean(r["gini"] for r in group),
        }
        for (label, task, context, kind), group in groups.items()
    ]


def comparisons(
    conditions: Sequence[tuple[str, str, str]], tasks: Sequence[str]
) -> list[tuple[str, tuple[str, str, str], tuple[str, str, str]]]:
    """Which condition pairs to compare: ``("task" | "length" | "checkpoint", a, b)``.

    Tasks are compared at equal checkpoint and context, lengths (every pair) at equal checkpoint and task (pooled
    included), checkpoints at equal task and context.
    """
    labels = list(dict.fromkeys(c[0] for c in conditions))
    contexts = list(dict.fromkeys(c[2] for c in conditions))
    pairs = []
    for label, context in itertools.product(labels, contexts):
        for a, b in itertools.combinations(tasks, 2):
            pairs.append(("task", (label, a, context), (label, b, context)))
    for label, task in itertools.product(labels, [*tasks, POOLED]):
        for a, b in itertools.combinations(contexts, 2):
            pairs.append(("length", (label, task, a), (label, task, b)))
    for task, context in itertools.product([*tasks, POOLED], contexts):
        for a, b in itertools.combinations(labels, 2):
            pairs.append(("checkpoint", (a, task, context), (b, task, context)))
    return pairs


def stability_rows(
    masks: Mapping[tuple[str, str, str], Mapping[str, torch.Tensor]],
    projections: Sequence[QKProjection],
    tasks: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per compared pair and projection with the Jaccard overlap of the two top-ratio masks."""
    rows = []
    for comparison, a, b in comparisons(list(masks), tasks):
        overlaps = mask_jaccards(masks[a], masks[b])
        for proj in projections:
            rows.append(
                {
                    "comparison": comparison,
                    "a": "/".join(a),
                    "b": "/".join(b),
                    "layer": proj.layer,
                    "kind": proj.kind,
                    "jaccard": overlaps[proj.key],
                }
            )
    return rows


def summarize_stability(
    rows: Sequence[Mapping[str, Any]], projections: Sequence[QKProjection], top_ratio: float
) -> list[dict[str, Any]]:
    """Mean and minimum Jaccard over layers per compared pair and kind, with the chance level of random masks."""
    channels = {p.kind: p.channels for p in projections}
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["comparison"], row["a"], row["b"], row["kind"]), []).append(row["jaccard"])
    return [
        {
            "comparison": comparison,
            "a": a,
            "b": b,
            "kind": kind,
            "jaccard_mean": statistics.fmean(values),
            "jaccard_min": min(values),
            "chance": chance_jaccard(channels[kind], num_selected(channels[kind], top_ratio)),
        }
        for (comparison, a, b, kind), values in groups.items()
    ]


def write_figures(
    scores: Scores,
    masks: Mapping[tuple[str, str, str], Mapping[str, torch.Tensor]],
    projections: Sequence[QKProjection],
    out: Path,
) -> None:
    """Per-layer heatmaps (tasks pooled; every context of every checkpoint), histograms, and the magnitude map and
    mask of the longest context (the first)."""
    panels = {f"{label} · {context}": (label, task, context) for label, task, context in scores if task == POOLED}
    contexts = list(dict.fromkeys(context for _, _, context in scores))
    heads = {kind: next(p.num_heads for p in projections if p.kind == kind) for kind in ("q", "k")}
    by_layer: dict[int, dict[str, QKProjection]] = {}
    for proj in projections:
        by_layer.setdefault(proj.layer, {})[proj.kind] = proj
    for layer, projs in by_layer.items():
        layer_scores = {name: {kind: scores[cond][projs[kind].key] for kind in heads} for name, cond in panels.items()}
        layer_heatmap(layer_scores, heads, f"Layer {layer}: mean |activation| per channel",
                      out / "heatmaps" / f"layer_{layer:02d}.png")  # fmt: skip
    kinds = {kind: [p for p in projections if p.kind == kind] for kind in heads}
    ratios = {  # each channel relative to the median of its own projection, all layers together
        kind: {
            context: torch.cat([_over_median(scores[("policy", POOLED, context)][p.key]) for p in projs])
            for context in contexts
        }
        for kind, projs in kinds.items()
    }
    magnitude_histograms(ratios, out / "histograms.png")
    long_scores, long_masks = scores[("policy", POOLED, contexts[0])], masks[("policy", POOLED, contexts[0])]
    layer_channel_map({k: torch.stack([long_scores[p.key] for p in ps]) for k, ps in kinds.items()},
                      "Mean |activation| per channel, all tasks, long context", out / "magnitude_map.png")  # fmt: skip
    layer_channel_map({k: torch.stack([long_masks[p.key] for p in ps]) for k, ps in kinds.items()},
                      "Selected channels, all tasks, long context", out / "mask.png", boolean=True)  # fmt: skip


def _over_median(scores: torch.Tensor) -> torch.Tensor:
    """``[channels]`` scores divided by their median (the lower middle value; only for plotting)."""
    return scores / scores.median().clamp_min(1e-12)
