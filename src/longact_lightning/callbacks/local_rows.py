"""Map a global row selection onto the rows a rank actually stores.

Under DDP every rank holds whole tensors; under FSDP2 (``ModelParallelStrategy``) parameters, gradients and optimizer
moments are DTensors sharded by rows (``Shard(0)``), so rank ``r`` stores a contiguous block of rows starting at a
global offset. A mask must land on exactly those local rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LocalRows:
    """Indices along dimension 0 of a tensor's local storage.

    Attributes:
        index: ``[n]`` local row indices (on the tensor's device).
    """

    index: torch.Tensor

    @staticmethod
    def local_data(tensor: torch.Tensor) -> torch.Tensor:
        """The storage this rank owns (a view: writes go to the parameter)."""
        data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        return data._local_tensor if _is_dtensor(data) else data

    @staticmethod
    def local_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
        grad = param.grad
        if grad is None:
            return None
        return grad._local_tensor if _is_dtensor(grad) else grad


def local_rows(param: torch.Tensor, selected: torch.Tensor) -> LocalRows:
    """The local indices of the globally ``selected`` rows (``[rows]`` bool) of ``param``."""
    offset, count = _local_row_range(param)
    local = selected[offset : offset + count]
    device = LocalRows.local_data(param).device
    return LocalRows(index=local.nonzero().flatten().to(device))


def _local_row_range(param: torch.Tensor) -> tuple[int, int]:
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if not _is_dtensor(data):
        return 0, data.shape[0]
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in data.placements:
        if not isinstance(placement, Shard | Replicate) or (isinstance(placement, Shard) and placement.dim != 0):
            raise ValueError(
                f"Row masks support DTensors sharded on dim 0 or replicated; got placements {data.placements}. "
                "Use FSDP2's default fully_shard (Shard(0))."
            )
    local_shape, global_offset = compute_local_shape_and_global_offset(data.shape, data.device_mesh, data.placements)
    return int(global_offset[0]), int(local_shape[0])


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)
