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

    The G completions of a prompt share it token for token, so per group the prompt is encoded once (its KV cache
    stays in the autograd graph), and then the group's completions run *packed* into one row behind that cache: a
    block-diagonal causal mask lets each completion see the prompt and its own earlier tokens only, and each restarts
    its positions where the prompt ends. For a P-token prompt and C-token completions that is ``P + G*C`` instead of
    ``G*(P + C)`` tokens forward and backward — about G times less work when P >> C, the long-context RL regime — and
    the gradients equal the plain computation's.

    Packing also drops padding: only real prompt tokens and real completion tokens run, and the cache is never copied
    per row. The packed row starts with the prompt's last token, whose logit predicts the first completion token, and
    leaves out each completion's last token, whose prediction nobody scores, so every packed position yields exactly
    one scored logit; the prompt pass never back-propagates through ``lm_head``, and both passes share one embedding
    lookup (the ``[vocab, hidden]`` gradient buffers these cost are as large as the prompt's attention work on a small
    model).

    Needs the KV cache (so not under HF gradient checkpointing, which drops it) and an attention implementation that
    takes a 4D mask (``sdpa``, ``eager``); with any other the plain computation runs instead.

    Args:
        group_ids: ``[B]`` rows with equal ids must have identical prompt columns.
        Others: as :func:`completion_logprobs`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 to score tokens; greedy rollouts score at 1.0.")
    if model.config._attn_implementation not in _MASKABLE_ATTENTION:
        return completion_logprobs(model, input_ids, attention_mask, completion_length, temperature, with_entropy)
    prompt_length = input_ids.shape[1] - completion_length
    groups, row_group = torch.unique(group_ids, return_inverse=True)  # [g], [B]
    first_row = torch.full((len(groups),), len(group_ids), device=group_ids.device).scatter_reduce(
        0, row_group, torch.arange(len(group_ids), device=group_ids.device), reduce="amin"
    )  # [g] one representative row per group
    if not torch.equal(input_ids[first_row, :prompt_length][row_group], input_ids[:, :prompt_length]):
        raise ValueError("Rows with the same group id have different prompts; group_ids must identify the prompt.")
    logprobs = input_ids.new_zeros(input_ids.shape[0], completion_length, dtype=torch.float32)  # [B, C]
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    for group, first in enumerate(first_row.tolist()):
        rows = (row_group == group).nonzero().squeeze(1)  # [G]
        prompt = input_ids[first, :prompt_length][attention_mask[first, :prompt_length].bool()]  # [L]
        lengths = attention_mask[rows, prompt_length:].sum(-1)  # [G] real completion tokens, right-padded
        if not lengths.any():
            continue
        scored = torch.arange(completion_length, device=input_ids.device) < lengths[:, None]  # [G, C]
        completions = input_ids[rows, prompt_length:]  # [G, C]
        values = _packed_group_logprobs(model, prompt, completions, lengths, scored, temperature, with_entropy)
        logprobs[rows] = logprobs[rows].masked_scatter(scored, values[0])
        if entropy is not None:
            entropy[rows] = entropy[rows].masked_scatter(scored, values[1])
    return logprobs, entropy


def _packed_group_logprobs(
    model: nn.Module,
    prompt: torch.Tensor,
    completions: torch.Tensor,
    lengths: torch.Tensor,
    scored: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of one group's real completion tokens, in row-major order.  # [T], [T]

    ``prompt`` ``[L]`` holds the real prompt tokens, ``completions`` ``[G, C]`` the right-padded completions with
    ``lengths`` ``[G]`` real tokens each (``scored`` ``[G, C]`` marks them); ``T = lengths.sum()``.
    """
    from transformers import DynamicCache

    shared = prompt.shape[0] - 1  # prompt tokens encoded once; the last one leads each completion
    inputs = torch.cat([prompt[-1:].expand(len(completions), 1), completions[:, :-1]], dim=1)[scored]  # [T]
    starts = lengths.cumsum(0) - lengths  # [G] where each completion starts in the packed row
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)  # [T]
    offset = torch.arange(len(segment), device=segment.device) - starts[segment]  # [T] index within its completion
    embeds = model.get_input_embeddings()(torch.cat([prompt[:-1], inputs]))[None]  # [1, L - 1 + T, H]
    cache = DynamicCache(config=model.config)
    if shared > 0:
        model(inputs_embeds=embeds[:, :shared], past_key_values=cache, use_cache=True, logits_to_keep=1)
    # [T, L - 1 + T]: every completion token sees the whole prompt and the earlier tokens of its own completion
    visible = (segment[:, None] == segment[None, :]) & (offset[:, None] >= offset[None, :])
    visible = torch.cat([visible.new_ones(len(segment), shared), visible], dim=1)
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores; SDPA takes it as booleans,
        mask = torch.zeros(visible.shape, dtype=embeds.dtype, device=embeds.device)  # 4x smaller at long context
        visible = mask.masked_fill_(~visible, torch.finfo(embeds.dtype).min)
    output = model(
        inputs_embeds=embeds[:, shared:],
        attention_mask=visible[None, None],
        position_ids=(shared + offset)[None],
        past_key_values=cache,
        use_cache=True,
    )
    logprobs, entropy = _token_logprobs(output.logits, completions[scored][None], temperature, with_entropy)
    return logprobs[0], entropy[0] if entropy is not None else None


_MASKABLE_ATTENTION = ("sdpa", "eager")


def _token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` ``[B, C]`` under ``logits`` ``[B, C, V]`` / temperature, and the entropy."""
    logits = logits.float()
    if temperature != 1.0:  # skips a [B, C, vocab] copy and its backward in the common case
        logits = logits / temperature
    log_softmax = torch.log_softmax(logits, dim=-1)  # [B, C, V]
    logprobs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, C]
    if not with_entropy:
        return logprobs, None
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)  # [B, C]
    return logprobs, entropy
