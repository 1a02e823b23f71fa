"""Ulysses sequence parallelism for HF decoder models: one sequence split over the ranks of a group.

A sequence longer than one device holds is cut into ``S`` contiguous chunks, one per rank of the sequence-parallel
group; every layer but attention is per token and runs on the rank's chunk as usual. Attention needs every earlier
token, so around it two all-to-alls (DeepSpeed-Ulysses) trade the split: before, each rank sends every other rank
that rank's share of the heads for its own tokens and receives all tokens for its share of the heads; attention then
runs over the whole sequence for ``H / S`` heads; after, the same exchange in reverse gives each rank all heads for
its tokens back. Activation memory per rank is ``1 / S`` of the sequence's, the communication is ``O(tokens x
hidden / S)`` per layer, and the result is the unsplit model's (attention is exact, not approximated).

:func:`ulysses` switches a model's attention to this for the duration of a block; RoPE positions come from the
``position_ids`` each rank passes for its chunk. Chunks are right-padded to equal length, which causal attention
keeps invisible to real tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION = "longact_ulysses"
_GROUP: ContextVar[Any] = ContextVar("sequence_parallel_group", default=None)


class _AllToAll(torch.autograd.Function):
    """Exchange equal chunks ``x[s]`` -> rank ``s`` along dim 0 within ``group``; the backward is the same exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()  # the collective reads and writes flat memory: both sides must be laid out row-major
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def sequence_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[b, H, t, d]`` (all heads, this rank's ``t`` tokens) -> ``[b, H / S, S * t, d]`` (a share of the heads, all
    tokens in rank order)."""
    size = dist.get_world_size(group)
    b, heads, t, d = x.shape
    chunks = x.reshape(b, size, heads // size, t, d).transpose(0, 1)  # [S, b, H/S, t, d] chunk s goes to rank s
    received = _AllToAll.apply(chunks, group)  # [S, b, H/S, t, d] chunk s came from rank s: its tokens
    return received.permute(1, 2, 0, 3, 4).reshape(b, heads // size, size * t, d)


def heads_to_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads`: ``[b, H / S, S * t, d]`` -> ``[b, H, t, d]``."""
    size = dist.get_world_size(group)
    b, share, length, d = x.shape
    chunks = x.reshape(b, share, size, length // size, d).permute(2, 0, 1, 3, 4)  # [S, b, H/S, t, d] rank s's tokens
    received = _AllToAll.apply(chunks, group)  # [S, b, H/S, t, d] chunk s: rank s's heads for this rank's tokens
    return received.transpose(0, 1).reshape(b, size * share, length // size, d)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
    """An HF attention function: SDPA over the whole sequence for this rank's share of the heads.

    ``query`` ``[b, H, t, d]``, ``key`` / ``value`` ``[b, KV, t, d]``; returns ``[b, t, H, d]`` as HF expects. The
    mask HF built for the local chunk is ignored: the gathered sequence is causal and right-padded. When the key/value
    heads do not split evenly over the group they are repeated to the query heads first.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    group = _GROUP.get()
    size = dist.get_world_size(group)
    if key.shape[1] % size:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    q, k, v = (sequence_to_heads(x, group) for x in (query, key, value))
    kwargs.pop("is_causal", None)
    output, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)  # [b, S*t, H/S, d]
    return heads_to_sequence(output.transpose(1, 2), group).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextmanager
def ulysses(model: PreTrainedModel, group: Any = None) -> Iterator[None]:
    """Inside the block, ``model``'s attention runs sequence-parallel over ``group`` (default: the whole world); each
    rank passes its own chunk of the sequence with its global ``position_ids``.

    The switch is read when each layer is called, so a backward that recomputes layers (activation checkpointing)
    must run inside the block too.
    """
    heads = model.config.num_attention_heads
    size = dist.get_world_size(group)
    if heads % size:
        raise ValueError(
            f"sequence parallelism over {size} ranks needs the attention heads ({heads}) to split evenly; use a "
            f"sequence_parallel_size that divides {heads}."
        )
    _register()
    previous = model.config._attn_implementation
    token = _GROUP.set(group)
    model.config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        _GROUP.reset(token)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is also an all-reduce (sum): every rank then holds the whole value and the
    gradient each rank's share receives is the sum of what every rank's (identical) loss sends it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def sum_over_group(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group`` (see :class:`_SumOverGroup`)."""
    return _SumOverGroup.apply(x, group)


def sequence_parallel_group(size: int, world_size: int) -> Any:
    """This rank's group of ``size`` consecutive ranks (``None`` = the whole world, also for ``size`` 1). Every rank
    must call it, in the same order (creating groups is a collective)."""
    if world_size % size:
        raise ValueError(
            f"sequence_parallel_size={size} must divide the number of ranks ({world_size}); each group of that many "
            "consecutive ranks splits one sequence."
        )
    if size in (1, world_size):
        return None
    group, _ = dist.new_subgroups(group_size=size)
    return group
