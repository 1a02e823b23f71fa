"""The training batch: whole groups of rollouts as padded tensors (the DataModule -> RL module contract)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from longact_lightning.rollout.base import Rollout


@dataclass
class RolloutBatch:
    """``B = prompts x G`` sequences; each group's ``G`` sequences are contiguous and share a ``group_ids`` value.

    Prompts are left-padded to the longest prompt ``P`` and completions right-padded to the longest completion ``C``,
    so every completion starts at column ``P`` and ``logits_to_keep = C + 1`` covers all of them.

    Attributes:
        input_ids: ``[B, P + C]`` prompt then completion tokens.
        attention_mask: ``[B, P + C]`` 1 on real tokens.
        completion_mask: ``[B, C]`` 1 on completion tokens that enter the loss (0 on padding and, when truncated
            completions are masked, on every token of a truncated one).
        rewards: ``[B]`` scalar reward per sequence.
        group_ids: ``[B]`` index of the prompt each sequence belongs to.
        truncated: ``[B]`` True where the engine hit ``max_tokens``.
        engine_logprobs: ``[B, C]`` log-probs reported by the rollout engine (0 on padding), or ``None``.
        correct: ``[B]`` True where the task metric counts the answer right (for accuracy logging), or ``None``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    truncated: torch.Tensor
    engine_logprobs: torch.Tensor | None = None
    correct: torch.Tensor | None = None

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    @property
    def completion_ids(self) -> torch.Tensor:
        """``[B, C]``"""
        return self.input_ids[:, self.prompt_length :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})

    def select(self, index: torch.Tensor | slice) -> RolloutBatch:
        """Rows ``index`` of every tensor (a micro-batch); padding columns are kept so positions stay aligned."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v[index] for k, v in values.items() if isinstance(v, torch.Tensor)})

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """All rows of ``batches`` in order, re-padded to the longest prompt and completion; group ids renumbered
        ``0..`` so groups of different batches stay apart. Optional fields survive only if every batch has them."""
        P = max(b.prompt_length for b in batches)
        C = max(b.completion_mask.shape[1] for b in batches)

        def sequences(b: RolloutBatch, t: torch.Tensor) -> torch.Tensor:  # [b, p + c] -> [b, P + C]
            return F.pad(t, (P - b.prompt_length, C - b.completion_mask.shape[1]))

        def completions(b: RolloutBatch, t: torch.Tensor) -> torch.Tensor:  # [b, c] -> [b, C]
            return F.pad(t, (0, C - t.shape[1]))

        group_ids, offset = [], 0
        for b in batches:
            ids = torch.unique(b.group_ids, return_inverse=True)[1]  # [b] 0.. in order of id
            group_ids.append(ids + offset)
            offset += int(ids.max()) + 1 if len(ids) else 0
        engine = [b.engine_logprobs for b in batches if b.engine_logprobs is not None]
        correct = [b.correct for b in batches if b.correct is not None]
        return cls(
            input_ids=torch.cat([sequences(b, b.input_ids) for b in batches]),
            attention_mask=torch.cat([sequences(b, b.attention_mask) for b in batches]),
            completion_mask=torch.cat([completions(b, b.completion_mask) for b in batches]),
            rewards=torch.cat([b.rewards for b in batches]),
            group_ids=torch.cat(group_ids),
            truncated=torch.cat([b.truncated for b in batches]),
            engine_logprobs=None
            if len(engine) < len(batches)
            else torch.cat([completions(b, e) for b, e in zip(batches, engine)]),
            correct=None if len(correct) < len(batches) else torch.cat(correct),
        )

    @classmethod
    def from_groups(
        cls,
        groups: Sequence[Sequence[Rollout]],
        rewards: Sequence[Sequence[float]],
        pad_token_id: int,
        correct: Sequence[Sequence[bool]] | None = None,
        mask_truncated: bool = False,
    ) -> RolloutBatch:
        """Pad and stack ``groups[i][j]`` (prompt ``i``, sample ``j``) with their ``rewards[i][j]``."""
        rollouts = [r for group in groups for r in group]
        if not rollouts:
            raise ValueError("RolloutBatch.from_groups got no rollouts; every group was empty.")
        group_ids = [i for i, group in enumerate(groups) for _ in group]
        flat_rewards = [float(x) for group in rewards for x in group]
        if len(flat_rewards) != len(rollouts):
            raise ValueError(f"{len(flat_rewards)} rewards for {len(rollouts)} rollouts; give one reward per rollout.")
        prompt_len = max(len(r.prompt_ids) for r in rollouts)
        completion_len = max(max(len(r.completion_ids) for r in rollouts), 1)
        batch = len(rollouts)

        input_ids = torch.full((batch, prompt_len + completion_len), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, prompt_len + completion_len), dtype=torch.long)
        completion_mask = torch.zeros((batch, completion_len), dtype=torch.float32)
        engine_logprobs = torch.zeros((batch, completion_len), dtype=torch.float32)
        has_logprobs = all(r.logprobs is not None for r in rollouts)
        for row, r in enumerate(rollouts):
            p, c = len(r.prompt_ids), len(r.completion_ids)
            input_ids[row, prompt_len - p : prompt_len] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attention_mask[row, prompt_len - p : prompt_len + c] = 1
            if c:
                input_ids[row, prompt_len : prompt_len + c] = torch.tensor(r.completion_ids, dtype=torch.long)
                completion_mask[row, :c] = 0.0 if (mask_truncated and r.truncated) else 1.0
                if has_logprobs:
                    engine_logprobs[row, :c] = torch.tensor(r.logprobs, dtype=torch.float32)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            rewards=torch.tensor(flat_rewards, dtype=torch.float32),
            group_ids=torch.tensor(group_ids, dtype=torch.long),
            truncated=torch.tensor([r.truncated for r in rollouts], dtype=torch.bool),
            engine_logprobs=engine_logprobs if has_logprobs else None,
            correct=None if correct is None else torch.tensor([bool(x) for g in correct for x in g]),
        )
