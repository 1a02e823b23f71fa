"""The ablation's report from the ``result.json`` files present: ``results.csv``, ``results.md`` and ``ablation.png``.

For each held-out length, per arm: the mean held-out accuracy with a 95 % t-interval over seeds; per arm against
``none``: the paired per-seed difference with its t-interval, the paired t-test (raw and Holm-adjusted across the
arms), and the smallest difference this many seeds could detect with 80 % power given the measured spread of the
differences (the power statement: a non-significant result only rules out differences above it); which machine
each run ran on, and any setting not shared by all runs. Rebuilt after every run, and by ``--report-only`` at any time.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments.ablation.stats import detectable_difference, holm, mean_ci, paired_difference

ARMS = ("high", "none", "random", "low")
BASELINE = "none"


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


def heldout_accuracy(result: Mapping[str, Any]) -> dict[int, float]:
    """``{held-out length: accuracy %}`` of one result; results that predate ``--heldout-lengths`` scored only the
    training length, as their ``accuracy``."""
    if "heldout" in result:
        return {int(length): float(e["accuracy"]) for length, e in result["heldout"].items()}
    return {int(result["settings"]["target_length"]): float(result["accuracy"])}


def grouped(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
    base: Mapping[str, Any] | None,
    label: Callable[[Mapping[str, Any]], str],
) -> dict[str, str]:
    """``{label(result): "arm: seeds ...; ..."}`` over every run and the base model: which runs share a label."""
    seeds: dict[str, dict[str, list[int]]] = {}
    for arm, by_seed in [*runs.items(), *([("base", {0: base})] if base else [])]:
        for seed, result in sorted(by_seed.items()):
            seeds.setdefault(label(result), {}).setdefault(arm, []).append(seed)

    def listed(arm: str, arm_seeds: list[int]) -> str:
        return arm if arm == "base" else f"{arm}: seeds {' '.join(map(str, arm_seeds))}"

    return {key: "; ".join(listed(*item) for item in by_arm.items()) for key, by_arm in seeds.items()}


def machines(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], base: Mapping[str, Any] | None) -> dict[str, str]:
    """``{machine: "arm: seeds ..."}``, which runs ran on which machine (results written before the driver recorded
    it are under ``"not recorded"``). Kernels round differently on different CPUs, so a seed's arms should share
    one: the report lists the machines so that a mixed ablation shows."""
    return grouped(runs, base, lambda result: result.get("machine", "not recorded"))


def differing_settings(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]], base: Mapping[str, Any] | None
) -> dict[str, dict[str, str]]:
    """``{setting: {value: "arm: seeds ..."}}`` for every setting that is not the same in all runs (and the base).

    The tables pool all runs of an arm, so a design finished under a changed setting (say another precision on a
    machine without bf16 units) must say so where its numbers are; values are shown as JSON.
    """
    results = [r for by_seed in runs.values() for r in by_seed.values()] + ([base] if base else [])
    keys = sorted({key for r in results for key in r["settings"]})
    differing = {}
    for key in keys:
        if len({json.dumps(r["settings"].get(key)) for r in results}) > 1:
            differing[key] = grouped(runs, base, functools.partial(_setting, key))
    return differing


def _setting(key: str, result: Mapping[str, Any]) -> str:
    return json.dumps(result["settings"].get(key))


def heldout_lengths(runs: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[int]:
    return sorted({length for by_seed in runs.values() for r in by_seed.values() for length in heldout_accuracy(r)})


def summary_rows(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]], length: int, last_k: int = 3
) -> list[dict[str, Any]]:
    """One row per arm at held-out ``length``: held-out accuracy mean ± 95 % CI, paired difference vs ``none``, final
    training reward. Runs not scored at ``length`` are left out."""

    def scores(by_seed: Mapping[int, Mapping[str, Any]]) -> dict[int, float]:
        scored = {s: heldout_accuracy(r) for s, r in by_seed.items()}
        return {s: acc[length] for s, acc in scored.items() if length in acc}

    rows = []
    raw_p: dict[int, float] = {}  # row index -> unrounded paired p, for the Holm adjustment across arms
    control = scores(runs.get(BASELINE, {}))
    for arm in [a for a in ARMS if a in runs] + sorted(set(runs) - set(ARMS)):
        accuracy = scores(runs[arm])
        if not accuracy:
            continue
        by_seed = {s: runs[arm][s] for s in accuracy}
        acc = mean_ci(list(accuracy.values()))
        final_rewards = [statistics.fmean(r["reward_curve"][-last_k:]) for r in by_seed.values() if r["reward_curve"]]
        reward = mean_ci(final_rewards) if final_rewards else None
        row: dict[str, Any] = {
            "heldout_length": length,
            "arm": arm,
            "seeds": acc.n,
            "heldout_acc_mean": round(acc.mean, 2),
            "heldout_acc_ci95": round(acc.half_width, 2) if not math.isnan(acc.half_width) else "",
            "per_seed": " ".join(f"{s}:{accuracy[s]:.1f}" for s in sorted(accuracy)),
            f"reward_last{last_k}_mean": round(reward.mean, 3) if reward else "",
            f"reward_last{last_k}_ci95": (
                round(reward.half_width, 3) if reward and not math.isnan(reward.half_width) else ""
            ),
            "diff_vs_none": "",
            "diff_ci95": "",
            "paired_t": "",
            "p_value": "",
            "p_holm": "",
            "detectable_diff_80": "",
            "train_s_mean": round(statistics.fmean(r["train_seconds"] for r in by_seed.values()), 1),
            "eval_s_mean": round(statistics.fmean(r["eval_seconds"] for r in by_seed.values()), 1),
        }
        if arm != BASELINE and control and set(control) & set(by_seed):
            diff = paired_difference(accuracy, control)
            row["diff_vs_none"] = round(diff.interval.mean, 2)
            row["diff_ci95"] = "" if math.isnan(diff.interval.half_width) else round(diff.interval.half_width, 2)
            row["paired_t"] = "" if math.isnan(diff.t) else round(diff.t, 2)
            row["p_value"] = "" if math.isnan(diff.p_value) else round(diff.p_value, 3)
            raw_p[len(rows)] = diff.p_value
            detectable = detectable_difference(diff.interval.sd, diff.interval.n)
            row["detectable_diff_80"] = "" if math.isnan(detectable) else round(detectable, 1)
        rows.append(row)
    for index, adjusted in zip(raw_p, holm(list(raw_p.values())), strict=True):
        rows[index]["p_holm"] = "" if math.isnan(adjusted) else round(adjusted, 3)
    return rows


def record_command(out: Path, command: str) -> None:
    """Append ``command`` to ``<out>/command.txt`` unless it is there already: a design resumed or finished with other
    arguments (other seeds, another precision) lists every command that wrote runs into it, in order."""
    path = out / "command.txt"
    commands = path.read_text().splitlines() if path.is_file() else []
    if command not in commands:
        path.write_text("\n".join([*commands, command]) + "\n")


def write_report(out: Path) -> list[dict[str, Any]]:
    """``results.csv``, ``results.md`` and ``ablation.png`` from the results present under ``out``, quoting the
    commands in ``<out>/command.txt``."""
    path = out / "command.txt"
    commands = [line for line in path.read_text().splitlines() if line] if path.is_file() else []
    runs, base = load_results(out)
    lengths = heldout_lengths(runs)
    tables = {length: summary_rows(runs, length) for length in lengths}
    rows = [row for length in lengths for row in tables[length]]
    if rows:
        with (out / "results.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    lines = ["# LongAct ablation: results", ""]
    if commands:
        lines += ["Command:" if len(commands) == 1 else "Commands, in the order they were run:", ""]
        lines += [*(f"    {command}" for command in commands), ""]
    any_run = next((r for by_seed in runs.values() for r in by_seed.values()), None)
    differing = differing_settings(runs, base)
    if any_run:
        s = {**any_run["settings"], **dict.fromkeys(differing, "(differs, see below)")}
        lines += [
            f"Training: `{s['config']}` with {s['steps']} steps, lr {s['lr']}, RULER `{s['task']}` at "
            f"{s['target_length']} tokens, {s['prompts_per_step']} prompts x {s['group_size']} samples per step, "
            f"{s['max_new_tokens']} new "
            f"tokens, dynamic sampling off, precision {s.get('precision', '32-true')}. Held-out: "
            f"{s['heldout_samples']} records (seed {s['heldout_seed']}) at "
            f"{' and '.join(map(str, lengths))} tokens, greedy, {s['eval_max_tokens']} new tokens, engine "
            f"`{s['engine']}`.",
            "",
        ]
    if base:
        scored = ", ".join(f"{acc:.1f} % at {length}" for length, acc in sorted(heldout_accuracy(base).items()))
        lines += [f"Base model (untrained) held-out accuracy: **{scored}** tokens.", ""]
    lines += ["Machines:", "", *(f"- {machine}: {which}" for machine, which in machines(runs, base).items()), ""]
    for key, by_value in differing.items():
        lines += [f"Runs by `{key}` (not the same in all runs; the tables pool them):", ""]
        lines += [*(f"- `{value}`: {which}" for value, which in by_value.items()), ""]
    for length in lengths:
        lines += [f"## Held-out at {length} tokens", "", *_table(tables[length]), ""]
    lines += [
        "CI: two-sided 95 % Student-t interval over seeds (n − 1 dof). Paired diff: per-seed accuracy(arm) −"
        " accuracy(none) with the same seed (same prompts, sampling seed and held-out set), then the t-interval and"
        " a paired t-test of those differences. p (Holm): the p-values of one length's arms adjusted together for"
        " the several comparisons (Holm step-down), the ones to hold against 0.05. Detectable diff: the smallest"
        " true paired difference a two-sided paired t-test at alpha 0.05 on this many seeds detects with 80 % power,"
        " given the measured standard deviation of the differences (noncentral t); a non-significant result rules"
        " out only differences larger than it.",
        "",
        "![ablation](ablation.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    if runs:
        plot(runs, base, lengths, out / "ablation.png")
    return rows


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of one held-out length's :func:`summary_rows`."""
    lines = [
        "| arm | seeds | held-out acc % (mean ± 95 % CI) | per seed | paired diff vs none (± 95 % CI) |"
        " paired t | p | p (Holm) | detectable diff (80 % power) | final train reward (last 3 steps) |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
            f"{r['p_holm'] if r['p_holm'] != '' else '—'} | "
            f"{r['detectable_diff_80'] if r['detectable_diff_80'] != '' else '—'} | {reward} |"
        )
    return lines


def plot(
    runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
    base: Mapping[str, Any] | None,
    lengths: list[int],
    path: Path,
) -> None:
    """Left: ``train/reward_mean`` per step, mean over seeds with a 95 % t-band. Then one panel per held-out length:
    accuracy per arm, mean ± 95 % CI with the seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in runs]
    colors = {"high": "tab:red", "none": "tab:gray", "random": "tab:blue", "low": "tab:green"}
    fig, (left, *panels) = plt.subplots(1, 1 + len(lengths), figsize=(6 * (1 + len(lengths)), 4.5))
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
    for right, held_out in zip(panels, lengths):
        for i, arm in enumerate(arms):
            values = [a[held_out] for a in map(heldout_accuracy, runs[arm].values()) if held_out in a]
            if not values:
                continue
            ci = mean_ci(values)
            right.scatter([i + 0.12] * len(values), values, color=colors.get(arm), alpha=0.6, s=18)
            err = 0.0 if math.isnan(ci.half_width) else ci.half_width
            right.errorbar([i], [ci.mean], yerr=[err], fmt="o", color=colors.get(arm), capsize=6, markersize=8)
        base_accuracy = heldout_accuracy(base).get(held_out) if base else None
        if base_accuracy is not None:
            label = f"base model {base_accuracy:.1f} %"
            right.axhline(base_accuracy, color="black", linestyle="--", linewidth=1, label=label)
            right.legend(loc="lower right")
        right.set_xticks(range(len(arms)), arms)
        right.set_xlim(-0.5, len(arms) - 0.5)
        right.set_ylim(0, 100)  # the same scale in every panel (the base line and legend stay clear of the data)
        right.set_ylabel("held-out accuracy (%)")
        right.set_title(f"Held-out at {held_out} tokens: mean ± 95 % CI (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
