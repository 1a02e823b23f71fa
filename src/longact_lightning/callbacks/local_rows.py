"""Map a global row selection onto the elements a rank actually stores.

A row mask is global (``[rows]`` bool over dimension 0 of the full parameter), but what a rank can write to depends on
the strategy's storage, so there is one small mapping per storage kind:

* **full tensors** (single device, DDP): local index = global row;
* **FSDP2 DTensors** (``ModelParallelStrategy``, ``fully_shard``): parameters, gradients and optimizer moments are
  sharded by rows (``Shard(0)``); rank ``r`` stores a contiguous block of rows starting at a global row offset, so
  local index = global row - offset for the rows inside the block;
* **FSDP1 flat shards** (``FSDPStrategy(use_orig_params=True)``): outside forward/backward each original parameter is
  a *1-D* view into this rank's shard of a ``FlatParameter`` (the concatenation of several flattened parameters, cut
  into equal pieces regardless of row boundaries), and so are its gradient and its AdamW moments. A rank may hold a
  partial first and last row, or nothing (a size-0 view). Row ``i`` of the full parameter is the flattened elements
  ``[i * row_numel, (i + 1) * row_numel)``; this rank holds flattened elements ``[start, start + numel)``; so the local
  indices of the selected rows are the element positions ``e - start`` whose row ``e // row_numel`` is selected.
  Nothing public in torch exposes ``start``; it is ``FlatParameter._shard_param_infos[i].intra_param_start_idx``, read
  once by :func:`fsdp1_flat_shards` (torch >= 2.1 layout, checked on 2.13).

In every case the result is a set of indices along dimension 0 of the *local* tensor, so one ``index_fill_`` /
``index_select`` / ``index_copy_`` call works for all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeIs  # needs 4.10+, and typing_extensions is no declared dependency


@dataclass(frozen=True)
class LocalRows:
    """Indices along dimension 0 of a tensor's local storage.

    Attributes:
        index: ``[n]`` local indices (on the tensor's device): rows of a full or row-sharded tensor, elements of an
            FSDP1 flat 1-D view.
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


@dataclass(frozen=True)
class FlatShard:
    """Where this rank's slice of an FSDP1 ``use_orig_params`` parameter sits in the flattened full parameter.

    Attributes:
        shape: the full (unsharded) parameter shape.
        start: flattened index of the first element this rank holds.
        numel: number of elements this rank holds (0 when the parameter lies entirely on other ranks).
    """

    shape: torch.Size
    start: int
    numel: int


def local_rows(param: torch.Tensor, selected: torch.Tensor, flat_shard: FlatShard | None = None) -> LocalRows:
    """The local indices of the globally ``selected`` rows (``[rows]`` bool) of ``param``.

    Args:
        param: the parameter as this rank sees it (full tensor, DTensor or FSDP1 flat view).
        selected: ``[global rows]`` bool.
        flat_shard: the parameter's entry from :func:`fsdp1_flat_shards` when it is FSDP1-managed.
    """
    device = LocalRows.local_data(param).device
    if flat_shard is not None and tuple(LocalRows.local_data(param).shape) != tuple(flat_shard.shape):
        return LocalRows(index=_flat_shard_elements(flat_shard, selected).to(device))
    # Full tensors, FSDP2 row shards, and FSDP1 parameters that are currently unsharded (NO_SHARD, world size 1).
    offset, count = _local_row_range(param)
    local = selected[offset : offset + count]
    return LocalRows(index=local.nonzero().flatten().to(device))


def global_rows(param: torch.Tensor, flat_shard: FlatShard | None = None) -> int:
    """Rows of the full parameter: what a global row mask must cover (a DTensor's ``shape`` is already global)."""
    return int(flat_shard.shape[0]) if flat_shard is not None else int(param.shape[0])


def fsdp1_flat_shards(root: nn.Module) -> dict[int, FlatShard]:
    """``{id(original parameter): FlatShard}`` for every FSDP1-managed parameter under ``root`` (empty without FSDP1).

    ``root`` must include the outermost ``FullyShardedDataParallel`` wrapper (Lightning: ``trainer.strategy.model``),
    since the LightningModule itself is wrapped and does not contain it.

    Raises:
        ValueError: an FSDP1 unit does not use ``use_orig_params=True``: its parameters are then only reachable as
            ``FlatParameter``s, which carry no row structure to mask.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return {}
    shards: dict[int, FlatShard] = {}
    for module in root.modules():
        if not isinstance(module, FullyShardedDataParallel):
            continue
        flat_param = module._flat_param
        if flat_param is None:  # a unit that manages no parameters
            continue
        if flat_param._params is None:
            raise ValueError(
                "Row masks under FSDP1 need FSDPStrategy(..., use_orig_params=True): without it the original "
                "parameters are only reachable through FlatParameters, which have no rows to mask."
            )
        for param, shape, info in zip(flat_param._params, flat_param._shapes, flat_param._shard_param_infos):
            start = info.intra_param_start_idx if info.in_shard else 0
            numel = info.numel_in_shard if info.in_shard else 0
            shards[id(param)] = FlatShard(shape=torch.Size(shape), start=int(start or 0), numel=int(numel or 0))
    return shards


def _flat_shard_elements(shard: FlatShard, selected: torch.Tensor) -> torch.Tensor:
    """Local element indices of the selected rows in an FSDP1 1-D shard view (see the module docstring)."""
    if selected.shape[0] != shard.shape[0]:
        raise ValueError(f"mask covers {selected.shape[0]} rows, the parameter has {shard.shape[0]}")
    row_numel = math.prod(shard.shape[1:])
    if shard.numel == 0 or row_numel == 0:
        return torch.zeros(0, dtype=torch.long)
    rows = torch.arange(shard.start, shard.start + shard.numel) // row_numel
    return selected.cpu()[rows].nonzero().flatten()


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


def _is_dtensor(tensor: torch.Tensor) -> TypeIs[DTensor]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)
