"""Streaming per-channel activation statistics over real (non-padding) tokens.

Memory is O(channels): each batch contributes sums and a running max, never a per-token buffer. Sums are kept in
float64 so the result does not depend on how tokens were split into batches or padded.
"""

from __future__ import annotations

from typing import Literal

import torch

Statistic = Literal["mean_abs", "rms", "max_abs"]
STATISTICS: tuple[str, ...] = ("mean_abs", "rms", "max_abs")


class ChannelStats:
    """Accumulates ``sum |x|``, ``sum x^2``, ``max |x|`` and the token count per channel.

    Args:
        channels: number of channels (last dimension of the activations).
    """

    def __init__(self, channels: int) -> None:
        self.sum_abs = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)
        self.max_abs = torch.zeros(channels, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, activations: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add one batch.

        Args:
            activations: ``[..., T, channels]`` projection outputs.
            token_mask: ``[..., T]`` 1 on real tokens, 0 on padding; ``None`` counts every token.
        """
        x = activations.detach()
        x = x.reshape(-1, x.shape[-1]) if token_mask is None else x[token_mask.to(torch.bool)]  # [N, channels]
        if x.shape[0] == 0:
            return
        x = x.to(torch.float64)
        self._move_to(x.device)  # accumulate where the activations live: no host sync per forward
        abs_x = x.abs()
        self.sum_abs += abs_x.sum(0)
        self.sum_sq += x.square().sum(0)
        self.max_abs = torch.maximum(self.max_abs, abs_x.amax(0))
        self.count += x.shape[0]

    def value(self, statistic: Statistic = "mean_abs") -> torch.Tensor:
        """``[channels]`` the chosen statistic (float32); zeros before any token was seen."""
        if statistic not in STATISTICS:
            raise ValueError(f"statistic={statistic!r} is not one of {STATISTICS}.")
        count = self.count.clamp_min(1.0)
        if statistic == "mean_abs":
            result = self.sum_abs / count
        elif statistic == "rms":
            result = (self.sum_sq / count).sqrt()
        else:
            result = self.max_abs
        return result.to(torch.float32)

    def all_reduce(self, device: torch.device | None = None) -> None:
        """Combine the statistics of all ranks in place (no-op outside torch.distributed).

        Args:
            device: where the collective runs: the strategy's root device (a rank's own GPU under NCCL; the CPU
                under gloo). ``None`` = where the statistics are.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if device is not None:
            self._move_to(device)
        sums = torch.cat([self.sum_abs, self.sum_sq, self.count.reshape(1)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.max_abs, op=dist.ReduceOp.MAX)
        n = self.sum_abs.numel()
        self.sum_abs, self.sum_sq, self.count = sums[:n], sums[n : 2 * n], sums[2 * n]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).cpu() for name in ("sum_abs", "sum_sq", "max_abs", "count")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("sum_abs", "sum_sq", "max_abs", "count"):
            setattr(self, name, state[name].to(torch.float64).clone())

    def _move_to(self, device: torch.device) -> None:
        if self.sum_abs.device != device:
            for name in ("sum_abs", "sum_sq", "max_abs", "count"):
                setattr(self, name, getattr(self, name).to(device))
