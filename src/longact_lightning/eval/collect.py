"""One no-grad pass of a HF causal LM over token prompts, recording per-channel |q| / |k| statistics with hooks.

Prompts are batched with left padding; padding is excluded from the statistics (its activations are not text) and
``position_ids`` are derived from the attention mask, so a padded prompt produces the same activations as the prompt
alone. Only the last position's logits are computed (``logits_to_keep=1``): a ``[batch, seq, vocab]`` tensor over a
long prompt would dominate memory and time for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from longact_lightning.saliency.projections import QKProjection, clean_name
from longact_lightning.saliency.stats import ChannelStats


@torch.no_grad()
def collect_channel_stats(
    model: nn.Module,
    projections: Sequence[QKProjection],
    prompts: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 4,
) -> dict[str, ChannelStats]:
    """Run ``model`` over ``prompts`` and return ``{projection.key: ChannelStats}`` over their real tokens.

    Args:
        model: the HF causal LM the projections were found in (names relative to it).
        projections: from :func:`~longact_lightning.saliency.find_qk_projections`.
        prompts: token-id lists (chat template applied).
        pad_token_id: id used for left padding (never counted).
        batch_size: prompts per forward; prompts are sorted by length first so batches pad little.
    """
    if not prompts:
        raise ValueError("collect_channel_stats() got no prompts: pass at least one token-id list.")
    stats = {proj.key: ChannelStats(proj.channels) for proj in projections}
    by_module: dict[str, list[QKProjection]] = {}
    for proj in projections:
        by_module.setdefault(proj.module_name, []).append(proj)
    modules = {clean_name(name): module for name, module in model.named_modules()}
    token_mask: list[torch.Tensor] = []  # the current batch's [B, T] mask, read by the hooks

    def make_hook(projs: list[QKProjection]):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            for proj in projs:
                rows = proj.rows.to(output.device)
                stats[proj.key].update(output.index_select(-1, rows), token_mask[0])  # [B, T, C], [B, T]

        return hook

    handles = [modules[name].register_forward_hook(make_hook(projs)) for name, projs in by_module.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        ordered = sorted(prompts, key=len)
        for start in range(0, len(ordered), batch_size):
            input_ids, attention_mask = left_pad(ordered[start : start + batch_size], pad_token_id)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            token_mask[:] = [attention_mask]
            position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # [B, T]
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T] input_ids, [B, T] attention_mask)`` with each prompt right-aligned (left padding)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def merge_stats(parts: Sequence[ChannelStats]) -> ChannelStats:
    """The statistics of the union of the token sets behind ``parts`` (sums and counts add, maxima take the max)."""
    if not parts:
        raise ValueError("merge_stats() got nothing to merge.")
    merged = ChannelStats(parts[0].sum_abs.numel())
    for part in parts:
        merged.sum_abs = merged.sum_abs + part.sum_abs.cpu()
        merged.sum_sq = merged.sum_sq + part.sum_sq.cpu()
        merged.max_abs = torch.maximum(merged.max_abs, part.max_abs.cpu())
        merged.count = merged.count + part.count.cpu()
    return merged
