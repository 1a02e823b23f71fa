"""Log-probabilities and entropies of completion tokens, computed only where they are needed.

Long-context RL means a prompt of many thousand tokens followed by a short answer. A plain forward pass returns
``[B, P + C, vocab]`` logits — at 32k tokens and a 150k vocabulary that is ~19 GB per sequence in fp32, almost all of
it for prompt positions whose logits nobody reads. HF causal LMs accept ``logits_to_keep=k``, which applies ``lm_head``
to the last ``k`` hidden states only; ``k = C + 1`` covers every position that predicts a completion token.
"""

from __future__ import annotations

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 on each row's first real token.  # [B, T]

    Prompts are left-padded; without explicit positions the model numbers pad tokens too, so the real tokens would get
    shifted RoPE positions and log-probs that differ from the ones the rollout engine (which never sees the padding)
    computed. Pad positions get 0; attention ignores them anyway.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each completion token under ``model`` and the entropy of the distribution it was drawn from.

    Column ``j`` of the completion (sequence position ``P + j``) is predicted by the hidden state at ``P + j - 1``, so
    the last ``C + 1`` positions yield ``C + 1`` logits of which the first ``C`` are used. Logits are divided by the
    sampling temperature so the log-probs are those of the distribution the engine actually sampled from.

    Args:
        model: a HF causal LM whose ``forward`` accepts ``logits_to_keep``.
        input_ids: ``[B, P + C]`` left-padded prompt then right-padded completion.
        attention_mask: ``[B, P + C]`` 1 on real tokens.
        completion_length: ``C``, the number of completion columns at the end of ``input_ids``.
        temperature: sampling temperature (> 0).
        with_entropy: also return the per-token entropy (costs one more ``[B, C, vocab]`` product).

    Returns:
        ``[B, C]`` float32 log-probs and ``[B, C]`` float32 entropies (``None`` without ``with_entropy``); values on
        padding columns are meaningless and must be masked by the caller.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 to score tokens; greedy rollouts score at 1.0.")
    if not 0 < completion_length < input_ids.shape[1]:
        raise ValueError(
            f"completion_length={completion_length} must be in (0, {input_ids.shape[1]}): the sequence must hold "
            "at least one prompt token before the completion."
        )
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=completion_length + 1,
        use_cache=False,
    )
    return _token_logprobs(output.logits[:, :-1, :], input_ids[:, -completion_length:], temperature, with_entropy)


def grouped_completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    group_ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`completion_logprobs`, running each group's shared prompt through the model once instead of G times.

    The G completions of a prompt share it token for token, so the prompt is encoded once per group (keeping its KV
    cache in the autograd graph), the cache is indexed out to the group's G rows, and only the completions run per
    row. For a P-token prompt and C-token completions that is ``P + G*C`` instead of ``G*(P + C)`` tokens forward and
    backward — about G times less work when P >> C, which is the long-context RL regime. Gradients flow through the
    indexed cache into the prompt pass, so they equal the plain computation's. Needs the KV cache, so it cannot run
    under HF gradient checkpointing (which drops it).

    Args:
        group_ids: ``[B]`` rows with equal ids must have identical prompt columns.
        Others: as :func:`completion_logprobs`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 to score tokens; greedy rollouts score at 1.0.")
    from transformers import DynamicCache

    prompt_length = input_ids.shape[1] - completion_length
    groups, row_group = torch.unique(group_ids, return_inverse=True)  # [g], [B]
    rows = torch.arange(len(group_ids), device=group_ids.device)
    first_row = torch.full((len(groups),), len(group_ids), device=group_ids.device).scatter_reduce(
        0, row_group, rows, reduce="amin"
    )  # [g] one representative row per group
    prompt_ids = input_ids[first_row, :prompt_length]  # [g, P]
    if not torch.equal(prompt_ids[row_group], input_ids[:, :prompt_length]):
        raise ValueError("Rows with the same group id have different prompts; group_ids must identify the prompt.")
    positions = position_ids_from_mask(attention_mask)  # [B, P + C]
    cache = DynamicCache(config=model.config)
    prompt_out = model(
        input_ids=prompt_ids,
        attention_mask=attention_mask[first_row, :prompt_length],
        position_ids=positions[first_row, :prompt_length],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.reorder_cache(row_group)  # [g, ...] -> [B, ...], differentiable
    completion_out = model(
        input_ids=input_ids[:, prompt_length:],
        attention_mask=attention_mask,
        position_ids=positions[:, prompt_length:],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=completion_length,
    )
    logits = torch.cat([prompt_out.logits[row_group], completion_out.logits[:, :-1]], dim=1)  # [B, C, V]
    return _token_logprobs(logits, input_ids[:, prompt_length:], temperature, with_entropy)


def _token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` ``[B, C]`` under ``logits`` ``[B, C, V]`` / temperature, and the entropy."""
    log_softmax = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, C, V]
    logprobs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, C]
    if not with_entropy:
        return logprobs, None
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)  # [B, C]
    return logprobs, entropy
