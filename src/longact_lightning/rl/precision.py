"""Mixed precision: cast each weight once per optimizer step instead of once per forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def autocast_weights_once(device_type: str) -> Iterator[None]:
    """Under autocast, cast each weight to the low-precision dtype once for every forward pass inside the block.

    Lightning's mixed precision runs autocast with ``cache_enabled=False``, because a cached cast would go stale once
    an optimizer step updates the weight inside the same autocast region. So every forward pass re-casts every weight,
    and every backward casts every weight gradient back: on a 135M model with G forward passes per step that copying
    costs as much as the attention. Inside this block the casts are cached (a cast has no saved tensors, so one cast
    serves any number of forward and backward passes); wrap the micro-batches of one optimizer step and the cache is
    cleared on the way out, before ``optimizer.step()``. Without autocast, or with its cache already on, it does
    nothing.
    """
    if not torch.is_autocast_enabled(device_type) or torch.is_autocast_cache_enabled():
        yield
        return
    with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=True):
        try:
            yield
        finally:
            torch.clear_autocast_cache()
