"""A KV cache that carries a shared prompt into the completion pass and survives activation checkpointing.

:func:`~longact_lightning.rl.logprobs.grouped_completion_logprobs` encodes each group's prompt once and lets the
packed completions attend to its K/V through the cache, with gradients flowing back into the prompt pass. Under
activation checkpointing every decoder layer runs its forward a second time in backward, with the same arguments
(the same cache object included), to rebuild the activations it did not keep. A plain ``DynamicCache`` is not safe
for that: the replay would append the layer's K/V a second time. HF therefore drops the cache under checkpointing,
which is why prompt sharing used to be switched off exactly when memory is short.

This cache makes each pass's ``update`` a pure function of its arguments, so a replay computes what the forward did:

- the **prompt pass** records each layer's K/V the first time (they stay in the autograd graph: the completion pass
  reads them and sends its gradient back through them); a replay in backward gets its own freshly computed K/V back
  and records nothing;
- the **completion pass** goes through a :meth:`~SharedPromptCache.reader`, which returns the recorded prompt K/V
  followed by the pass's own and stores nothing.

Memory is that of checkpointing (each layer's input, plus the prompt K/V, which the completion pass needs anyway)
and compute is that of prompt sharing plus one recomputed forward.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin


class SharedPromptCache(DynamicCache):
    """The prompt pass's cache; :meth:`reader` is the completion pass's view of it."""

    _reading = False

    def reader(self) -> SharedPromptCache:
        """A view for the completion pass: the recorded prompt K/V, then the pass's own, nothing stored."""
        view = copy.copy(self)  # shares ``layers`` (the recorded K/V) with the prompt pass's cache
        view._reading = True
        return view

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        recorded = self._recorded(layer_idx)
        if self._reading:
            if recorded is None:  # a one-token prompt leaves nothing to share
                return key_states, value_states
            keys, values = recorded
            return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
        if recorded is not None:  # the prompt pass replayed in backward: the recorded K/V are the ones in the graph
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _recorded(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The K/V the prompt pass recorded for ``layer_idx``, if any. ``update`` is only called by attention layers,
        so their cache layer holds K/V (never a linear-attention state)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not isinstance(layer, CacheLayerMixin) or not layer.is_initialized:
            return None
        assert layer.keys is not None and layer.values is not None  # set together when the layer is initialised
        return layer.keys, layer.values


@contextmanager
def checkpointing_keeps_cache(model: nn.Module) -> Iterator[None]:
    """Inside the block, HF's checkpointed decoder layers keep the cache they are given instead of dropping it.

    Only safe with a cache whose updates are replay-safe, i.e. :class:`SharedPromptCache`. The flag is read when a
    layer is called, not when it is replayed, so leaving the block before backward is fine.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's False
