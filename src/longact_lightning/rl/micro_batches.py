"""Micro-batches by tokens, and ranks by tokens: which rows of a rollout batch go through the model together, where.

At long context a fixed number of sequences per pass is either too many (a 32k-token prompt) or far too few (a group
of 16 short answers behind a shared prompt, which is only shared if the group runs in one pass). A token budget
fixes both: whole groups are packed into passes whose padded token count stays within ``max_tokens``, a group too
large for one pass is split into row sets that each encode the prompt once, and only a single sequence longer than
the budget runs alone (splitting one sequence is sequence parallelism's job).

A pass's cost is what the model actually processes, padding included: ``units x (longest prompt + longest
completions)``. For prompt sharing that is the ``[groups, shared prompt]`` pass plus the ``[groups, packed
completions]`` pass; without it, every row is a ``[rows, P + C]`` sequence.

Under data parallelism every rank waits for the slowest at each gradient all-reduce, so the step's groups are also
spread over the ranks by tokens (:func:`balanced_partition`) before each rank plans its micro-batches.
"""

from __future__ import annotations

import torch


def plan_micro_batches(
    attention_mask: torch.Tensor,
    prompt_length: int,
    group_ids: torch.Tensor,
    max_tokens: int,
    share_prompt: bool,
) -> list[list[int]]:
    """Row indices of each micro-batch, packed first-fit-decreasing by cost under ``max_tokens``.

    Args:
        attention_mask: ``[B, P + C]`` 1 on real tokens (prompts left-padded to ``prompt_length``).
        group_ids: ``[B]`` rows of one prompt share an id.
        max_tokens: the budget per pass, padding included.
        share_prompt: units are (parts of) groups whose prompt runs once; else single rows of width ``P + C``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch={max_tokens} must be >= 1 (tokens per forward pass).")
    width = attention_mask.shape[1]
    if not share_prompt:  # every row is padded to the batch's full width
        units = [([row], (width, 0)) for row in range(attention_mask.shape[0])]
        return _first_fit_decreasing(units, max_tokens)
    prompts = attention_mask[:, :prompt_length].sum(-1)  # [B] real prompt tokens
    completions = attention_mask[:, prompt_length:].sum(-1)  # [B] real completion tokens
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids.tolist()):
        groups.setdefault(group, []).append(row)
    units = []
    for rows in groups.values():
        prompt = int(prompts[rows[0]])
        part: list[int] = []
        packed = 0
        for row in rows:  # a group over budget is split into parts that each encode the prompt once
            length = int(completions[row])
            if part and prompt + packed + length > max_tokens:
                units.append((part, (prompt, packed)))
                part, packed = [], 0
            part.append(row)
            packed += length
        units.append((part, (prompt, packed)))
    return _first_fit_decreasing(units, max_tokens)


def _first_fit_decreasing(units: list[tuple[list[int], tuple[int, int]]], budget: int) -> list[list[int]]:
    """Pack ``(rows, (prompt, completions))`` units into bins whose cost ``n x (max prompt + max completions)`` stays
    within ``budget`` (a unit over budget gets a bin of its own); bins in batch order of their first row."""
    order = sorted(range(len(units)), key=lambda i: (-sum(units[i][1]), units[i][0][0]))
    bins: list[tuple[list[int], int, int, int]] = []  # (unit ids, count, max prompt, max completions)
    for i in order:
        prompt, completions = units[i][1]
        for k, (members, count, top_prompt, top_completions) in enumerate(bins):
            grown = (count + 1) * (max(top_prompt, prompt) + max(top_completions, completions))
            if grown <= budget:
                bins[k] = (members + [i], count + 1, max(top_prompt, prompt), max(top_completions, completions))
                break
        else:
            bins.append(([i], 1, prompt, completions))
    batches = [sorted(row for i in members for row in units[i][0]) for members, *_ in bins]
    return sorted(batches, key=lambda rows: rows[0])


def group_costs(attention_mask: torch.Tensor, prompt_length: int, group_ids: torch.Tensor, share_prompt: bool):
    """Each group's rows and the tokens its scoring costs: prompt once plus its completions with prompt sharing,
    every row whole without.  -> ``{group id: (rows, tokens)}`` in order of first row"""
    real = attention_mask.sum(-1)  # [B]
    prompts = attention_mask[:, :prompt_length].sum(-1)  # [B]
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids.tolist()):
        groups.setdefault(group, []).append(row)
    costs = {}
    for group, rows in groups.items():
        whole = int(real[rows].sum())
        costs[group] = (rows, whole - (len(rows) - 1) * int(prompts[rows[0]]) if share_prompt else whole)
    return costs


def balanced_partition(costs: list[int], parts: int) -> list[list[int]]:
    """Indices of ``costs`` split into ``parts`` lists of near-equal total: the largest first, each to the lightest
    part so far (LPT; within 4/3 of the optimum). Deterministic, so every rank computes the same split; each part
    gets at least one item when there are as many items as parts."""
    loads = [(0, part) for part in range(parts)]
    assignment: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, part = min(loads)
        assignment[part].append(index)
        loads[part] = (load + costs[index], part)
    return [sorted(items) for items in assignment]
