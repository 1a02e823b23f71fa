"""Log-probabilities and entropies of completion tokens, computed only where they are needed.

Long-context RL means a prompt of many thousand tokens followed by a short answer. A plain forward pass returns
``[B, P + C, vocab]`` logits — at 32k tokens and a 150k vocabulary that is ~19 GB per sequence in fp32, almost all of
it for prompt positions whose logits nobody reads. HF causal LMs accept ``logits_to_keep=k``, which applies ``lm_head``
to the last ``k`` hidden states only; ``k = C + 1`` covers every position that predicts a completion token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longact_lightning.rl.prompt_cache import SharedPromptCache, checkpointing_keeps_cache
from longact_lightning.saliency.real_tokens import declare_real_tokens
from longact_lightning.sequence_parallel import sum_over_group, ulysses
from longact_lightning.sharding import unshard_when_cache_gets_gradient

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 on each row's first real token.  # [B, T]

    Prompts are left-padded; without explicit positions the model numbers pad tokens too, so the real tokens would get
    shifted RoPE positions and log-probs that differ from the ones the rollout engine (which never sees the padding)
    computed. Pad positions get 0; attention ignores them anyway.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
    pad_to_multiple_of: int = 1,
    chunk_tokens: int | None = None,
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
        pad_to_multiple_of: left-pad the sequence length up to a multiple of this (masked, so no value changes);
            see :func:`grouped_completion_logprobs` for why.
        chunk_tokens: score the vocabulary this many tokens at a time (see :func:`token_logprobs`); ``None`` = at once.

    Returns:
        ``[B, C]`` float32 log-probs and ``[B, C]`` float32 entropies (``None`` without ``with_entropy``); values on
        padding columns are meaningless and must be masked by the caller.
    """
    _check_scoring_args(temperature, pad_to_multiple_of, chunk_tokens)
    if not 0 < completion_length < input_ids.shape[1]:
        raise ValueError(
            f"completion_length={completion_length} must be in (0, {input_ids.shape[1]}): the sequence must hold "
            "at least one prompt token before the completion."
        )
    padding = _round_up(input_ids.shape[1], pad_to_multiple_of) - input_ids.shape[1]
    if padding:  # prompts are left-padded already; more of it moves no real token's position
        input_ids = F.pad(input_ids, (padding, 0))
        attention_mask = F.pad(attention_mask, (padding, 0))
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=completion_length + 1,
        use_cache=False,
    )
    targets = input_ids[:, -completion_length:]
    return token_logprobs(output.logits[:, :-1, :], targets, temperature, with_entropy, chunk_tokens)


def grouped_completion_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    group_ids: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    pad_to_multiple_of: int = 1,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`completion_logprobs`, running each group's shared prompt through the model once instead of G times.

    The G completions of a prompt share it token for token, so each group's prompt is encoded once (its KV cache
    stays in the autograd graph), and then the group's completions run *packed* into one row behind that cache: a
    block-diagonal causal mask lets each completion see the prompt and its own earlier tokens only, and each restarts
    its positions where the prompt ends. For a P-token prompt and C-token completions that is ``P + G*C`` instead of
    ``G*(P + C)`` tokens forward and backward — about G times less work when P >> C, the long-context RL regime — and
    the gradients equal the plain computation's.

    All groups of the batch go through the model together: one prompt pass over the ``[groups, prompt]`` batch and one
    completion pass over the ``[groups, packed]`` batch, so the weights' gradients, the ``lm_head`` product and the
    ``[vocab, hidden]`` embedding gradient are formed once per pass rather than once per group. Both passes go through
    the model's own ``forward`` (token ids in, no embedding looked up outside it), which is what FSDP2's hooks on the
    root module need to gather the embedding. Packing also drops padding within a group: only real tokens are packed,
    the cache is never copied per row, the packed row starts with the prompt's last token (whose logit predicts the
    first completion token) and leaves out each completion's last token (whose prediction nobody scores). What padding
    remains is between groups (rows are as long as the longest).

    Works under HF gradient checkpointing: the passes share the prompt through a replay-safe
    :class:`~longact_lightning.rl.prompt_cache.SharedPromptCache`, so each layer is recomputed in backward with the
    prompt's K/V kept in the graph. Needs an attention implementation that takes a 4D mask (``sdpa``, ``eager``); with
    any other the plain computation runs instead.

    CPU kernels keep native memory for every input shape they meet (about 4 MB per sequence length for bf16
    attention, ~1.8 MB per row count for a bf16 linear layer; ``benchmarks/shape_cache_growth.py``), and RL batches
    bring new lengths every step, so the process's heap grows until every length has been seen.
    ``pad_to_multiple_of`` rounds both passes' lengths up, which bounds the distinct shapes at the price of up to
    ``pad_to_multiple_of - 1`` padding tokens per pass; the values are unchanged (padding is seen by nothing real).

    Args:
        group_ids: ``[B]`` rows with equal ids must have identical prompt columns.
        pad_to_multiple_of: round the shared-prompt and packed-completion lengths up to a multiple of this.
        Others: as :func:`completion_logprobs`.
    """
    _check_scoring_args(temperature, pad_to_multiple_of, chunk_tokens)
    if model.config._attn_implementation not in _MASKABLE_ATTENTION:
        return completion_logprobs(
            model, input_ids, attention_mask, completion_length, temperature, with_entropy, pad_to_multiple_of,
            chunk_tokens,
        )  # fmt: skip
    packed = _PackedGroups.build(input_ids, attention_mask, completion_length, group_ids, pad_to_multiple_of)
    logprobs = input_ids.new_zeros(input_ids.shape[0], completion_length, dtype=torch.float32)  # [B, C]
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    if not packed.real.any():
        return logprobs, entropy
    cache = SharedPromptCache(config=model.config)
    shared = packed.prompts.shape[1]
    visible = packed.visible()  # [g, T, S + T]
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores; SDPA takes it as booleans,
        mask = torch.zeros(visible.shape, dtype=model.dtype, device=visible.device)  # 4x smaller at long context
        visible = mask.masked_fill_(~visible, torch.finfo(model.dtype).min)
    real = packed.real  # [g, T]
    # use_cache=False: the cache is passed in and used, the model need not return it (HF would warn under checkpointing)
    with checkpointing_keeps_cache(model):
        # Neither pass has a 2D attention mask, so both declare their real tokens (saliency counts only those).
        if shared > 0:  # right padding needs no mask here: causal attention never lets a real token see a later one
            with declare_real_tokens(packed.real_prompt):
                model(input_ids=packed.prompts, past_key_values=cache, use_cache=False, logits_to_keep=1)
            unshard_when_cache_gets_gradient(model, cache)  # FSDP2: the backward reaches the prompt pass via the cache
        with declare_real_tokens(real):
            output = model(
                input_ids=packed.inputs,
                attention_mask=visible[:, None],
                position_ids=packed.shared[:, None] + packed.offset,
                past_key_values=cache.reader(),
                use_cache=False,
            )
    values, entropies = token_logprobs(
        output.logits[real][None], packed.targets[real][None], temperature, with_entropy, chunk_tokens
    )  # [1, N] each
    rows, columns = packed.row[real], packed.offset[real]  # [N], [N] where each packed token came from
    logprobs = logprobs.index_put((rows, columns), values[0])
    if entropy is not None:
        assert entropies is not None  # both exist exactly when with_entropy
        entropy = entropy.index_put((rows, columns), entropies[0])
    return logprobs, entropy


def sequence_parallel_completion_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_tokens: int | None = None,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`completion_logprobs` with each sequence split over the ranks of ``group`` (Ulysses; see
    :mod:`longact_lightning.sequence_parallel`), for sequences too long for one device.

    Every rank of the group passes the same batch. Each runs its contiguous chunk of a sequence (real tokens only,
    right-padded to a multiple of the group size), scores the completion tokens its chunk predicts, and the group sums
    the pieces: every rank returns the whole ``[B, C]`` result, and a loss computed from it identically on every rank
    sends each rank's chunk ``S`` times its gradient (the sum's backward), which data-parallel averaging over the
    group's ``S`` ranks turns back into the exact gradient. Sequences run one at a time.
    """
    _check_scoring_args(temperature, 1, chunk_tokens)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    prompt_length = input_ids.shape[1] - completion_length
    logprobs = input_ids.new_zeros(input_ids.shape[0], completion_length, dtype=torch.float32)  # [B, C]
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    with ulysses(model, group):
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool()
            ids = input_ids[row][real]  # [n] prompt then completion
            prompt, n = int(attention_mask[row, :prompt_length].sum()), len(ids)
            width = -(-n // size)
            start = rank * width
            positions = torch.arange(start, start + width, device=ids.device)  # [t] this rank's chunk
            local = F.pad(ids, (0, width * size - n))[start : start + width]
            # the chunk's positions that predict a completion token: p - 1 .. n - 2
            keep = positions[(positions >= prompt - 1) & (positions < n - 1)] - start  # [k]
            with declare_real_tokens((positions < n)[None]):
                output = model(
                    input_ids=local[None], position_ids=positions[None], use_cache=False,
                    logits_to_keep=keep if len(keep) else torch.tensor([width - 1], device=ids.device),
                )  # fmt: skip
            if not len(keep):  # nothing to score here; a zero keeps this rank's backward (and its collectives) going
                logprobs = logprobs + output.logits.sum() * 0.0
                continue
            targets = ids[keep + start + 1]  # [k]
            values, entropies = token_logprobs(output.logits, targets[None], temperature, with_entropy, chunk_tokens)
            columns = keep + start + 1 - prompt  # [k]
            logprobs = logprobs.index_put((torch.full_like(columns, row), columns), values[0])
            if entropy is not None:
                assert entropies is not None  # both exist exactly when with_entropy
                entropy = entropy.index_put((torch.full_like(columns, row), columns), entropies[0])
    return sum_over_group(logprobs, group), None if entropy is None else sum_over_group(entropy, group)


@dataclass(frozen=True)
class _PackedGroups:
    """A batch of groups laid out for :func:`grouped_completion_logprobs`: one row per group, ``g`` rows.

    ``prompts`` ``[g, S]`` holds each group's shared prompt tokens (all real prompt tokens but the last) left-aligned,
    ``shared`` ``[g]`` how many of them are real (``S = shared.max()``). ``inputs`` / ``targets`` ``[g, T]`` hold the
    group's packed completion tokens and the tokens they predict; ``row`` ``[g, T]`` names the batch row each packed
    token came from (``-1`` on padding) and ``offset`` ``[g, T]`` its completion column, which is also its position
    after the prompt.
    """

    prompts: torch.Tensor
    shared: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    row: torch.Tensor
    offset: torch.Tensor

    @property
    def real(self) -> torch.Tensor:
        return self.row >= 0  # [g, T]

    @property
    def real_prompt(self) -> torch.Tensor:
        return torch.arange(self.prompts.shape[1], device=self.shared.device) < self.shared[:, None]  # [g, S]

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_length: int,
        group_ids: torch.Tensor,
        pad_to_multiple_of: int = 1,
    ) -> _PackedGroups:
        prompt_length = input_ids.shape[1] - completion_length
        batch = torch.arange(len(group_ids), device=group_ids.device)  # [B]
        groups, row_group = torch.unique(group_ids, return_inverse=True)  # [g], [B]
        first_row = torch.full((len(groups),), len(group_ids), device=group_ids.device).scatter_reduce(
            0, row_group, batch, reduce="amin"
        )  # [g] one representative row per group
        if not torch.equal(input_ids[first_row, :prompt_length][row_group], input_ids[:, :prompt_length]):
            raise ValueError("Rows with the same group id have different prompts; group_ids must identify the prompt.")
        prompt_real = attention_mask[first_row, :prompt_length].bool()  # [g, P]
        prompt_lengths = prompt_real.sum(-1)  # [g]
        if not prompt_lengths.all():
            raise ValueError("A prompt has no real token (its attention_mask is all 0); every prompt needs one.")
        real_first = torch.argsort((~prompt_real).long(), dim=1, stable=True)  # [g, P] real tokens first, in order
        prompts = input_ids[first_row, :prompt_length].gather(1, real_first)  # [g, P]
        shared = prompt_lengths - 1  # [g] the last real prompt token leads the completions instead
        lead = prompts.gather(1, shared[:, None])  # [g, 1]

        completions = input_ids[:, prompt_length:]  # [B, C] right-padded
        lengths = attention_mask[:, prompt_length:].sum(-1)  # [B]
        same_group_before = (row_group[:, None] == row_group[None, :]) & (batch[None, :] < batch[:, None])  # [B, B]
        starts = (same_group_before.long() * lengths[None, :]).sum(-1)  # [B] where each row starts in its group's row
        totals = torch.zeros_like(shared).scatter_add(0, row_group, lengths)  # [g]
        rows, columns = (torch.arange(completion_length, device=lengths.device) < lengths[:, None]).nonzero(
            as_tuple=True
        )  # [N], [N] every real completion token
        where = (row_group[rows], starts[rows] + columns)
        width = _round_up(int(totals.max()), pad_to_multiple_of)

        def packed(values: torch.Tensor, fill: int) -> torch.Tensor:  # [N] -> [g, T]
            return values.new_full((len(groups), width), fill).index_put(where, values)

        inputs = torch.cat([lead[row_group], completions[:, :-1]], dim=1)  # [B, C] token whose logit scores column j
        prompt_width = _round_up(int(shared.max()), pad_to_multiple_of)
        prompts = F.pad(prompts, (0, prompt_width - prompt_length))  # [g, S] cut or padded with 0
        return cls(
            prompts=prompts,
            shared=shared,
            inputs=packed(inputs[rows, columns], 0),
            targets=packed(completions[rows, columns], 0),
            row=packed(rows, -1),
            offset=packed(columns, 0),
        )

    def visible(self) -> torch.Tensor:
        """``[g, T, S + T]`` True where a packed token may attend: its group's real prompt tokens, and the earlier
        tokens of its own completion. Padding sees padding (a row that sees nothing would give NaN in SDPA)."""
        own = (self.row[:, :, None] == self.row[:, None, :]) & (self.offset[:, :, None] >= self.offset[:, None, :])
        return torch.cat([self.real_prompt[:, None, :].expand(-1, self.row.shape[1], -1), own], dim=2)


_MASKABLE_ATTENTION = ("sdpa", "eager")


def _check_scoring_args(temperature: float, pad_to_multiple_of: int, chunk_tokens: int | None) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 to score tokens; greedy rollouts score at 1.0.")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1 (1 = no padding).")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1 (tokens per vocabulary chunk), or None.")


def _round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` ``[B, C]`` under ``logits`` ``[B, C, V]`` / temperature, and the entropy.  # [B, C] x2

    Scoring one token costs several fp32 ``[vocab]`` temporaries (the cast, the log-softmax, its exponential), kept for
    backward: about 4 x 4 x 150k bytes per token for a Qwen vocabulary, 38 GB for 16 completions of 4k tokens. With
    ``chunk_tokens`` the tokens are scored that many at a time and each chunk is recomputed in backward (activation
    checkpointing at the vocabulary), so beyond the logits and their gradient, which the model's ``lm_head`` makes
    and needs anyway, memory is bounded by one chunk. Values and gradients are the unchunked ones.
    """
    B, C, V = logits.shape
    if chunk_tokens is None or chunk_tokens >= B * C:
        return _scores(logits, targets, temperature, with_entropy)
    flat_logits, flat_targets = logits.reshape(B * C, V), targets.reshape(B * C)
    pieces = []
    for start in range(0, B * C, chunk_tokens):
        piece = (flat_logits[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens])
        if torch.is_grad_enabled() and logits.requires_grad:
            pieces.append(checkpoint(_scores, *piece, temperature, with_entropy, use_reentrant=False))
        else:
            pieces.append(_scores(*piece, temperature, with_entropy))
    logprobs = torch.cat([lp for lp, _ in pieces]).reshape(B, C)
    entropy = torch.cat([ent for _, ent in pieces]).reshape(B, C) if with_entropy else None
    return logprobs, entropy


def _scores(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` over any leading shape: ``[..., V]`` logits, ``[...]`` targets."""
    logits = logits.float()
    if temperature != 1.0:  # skips a [..., vocab] copy and its backward in the common case
        logits = logits / temperature
    log_softmax = torch.log_softmax(logits, dim=-1)  # [..., V]
    logprobs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [...]
    if not with_entropy:
        return logprobs, None
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)  # [...]
    return logprobs, entropy
