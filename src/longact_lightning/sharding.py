"""Sharding a HF causal LM for training, and the numerics that sharding changes.

* FSDP2 (``ModelParallelStrategy``): :func:`fully_shard_decoder_layers` makes one ``fully_shard`` unit of every
  decoder layer (the classes HF lists in ``_no_split_modules``) and one of the root, so a forward gathers one layer
  at a time. :func:`data_parallel_mesh` is the mesh it shards over: all ranks, or HSDP replicas of shard groups.
* FSDP1 (``FSDPStrategy``): :func:`fsdp1_wrap` wraps the HF model itself, with the strategy's settings, so that it
  is the FSDP root. Left to Lightning, the root would be the LightningModule, and ``training_step`` would run inside
  its forward: a module that calls ``backward`` there (manual optimisation) gets "Expects BACKWARD_PRE or
  BACKWARD_POST state", and the root's end-of-backward callback never runs. Lightning's ``bf16-mixed`` policy also
  casts *buffers* to bf16, which turns RoPE's ``inv_freq`` into bf16 (angle errors of radians at 16k positions,
  against vLLM's fp32 RoPE), and reduces gradients in bf16; the wrap keeps both in fp32.
* Clipping: :func:`clip_grad_norm` clips by the norm of the *whole* gradient, not of this rank's shard.
* Shared-prompt scoring: :func:`unshard_when_cache_gets_gradient` lets a pass read an FSDP2 layer's K/V from a
  previous pass's KV cache and still back-propagate into that layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FullyShardedDataParallel


def data_parallel_mesh(device_type: str, world_size: int, replicas: int = 1) -> Any:
    """A 1-D mesh over all ranks, or with ``replicas > 1`` a 2-D ``(replicate, shard)`` mesh for HSDP: ``replicas``
    groups of ``world_size / replicas`` consecutive ranks (one group per node when ``replicas`` = nodes)."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % replicas:
        raise ValueError(
            f"hybrid_shard_replicas={replicas} does not divide the world size {world_size}; use a divisor, usually "
            "the number of nodes."
        )
    if replicas == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))


def fully_shard_decoder_layers(model: nn.Module, mesh: Any) -> None:
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, ``lm_head``). Parameters and the
    gradient reduction stay in their dtype (fp32 master weights); mixed precision is Lightning's autocast."""
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class in `_no_split_modules`, so FSDP2 would gather the "
            "whole model in every forward; use a transformers model that does, or FSDPStrategy with an "
            "auto_wrap_policy."
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unshard_when_cache_gets_gradient(model: nn.Module, cache: Any) -> None:
    """Under FSDP2, gather each decoder layer's weights again when the K/V it wrote into ``cache`` receive their
    gradient.

    FSDP2 gathers a layer for backward when the layer's *output* receives its gradient, and frees it again once the
    gradient of the layer's input is done. A pass that reads a previous pass's K/V from the cache (the completion
    pass of :func:`~longact_lightning.rl.logprobs.grouped_completion_logprobs`) sends gradient into that previous
    pass through the cache instead, which FSDP2 does not see: the backward through ``k_proj`` / ``v_proj`` would run
    on freed weights. A hook on each cached tensor gathers the layer first (``FSDPModule.unshard``, a no-op while it
    is gathered). Autograd runs the same graph in the same order on every rank, so the gathers stay collective. With
    no FSDP2 layer this does nothing.
    """
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in _decoder_layers(model) if isinstance(m, FSDPModule)]
    if not layers:
        return
    for layer, cached in zip(layers, cache.layers, strict=True):
        for tensor in (cached.keys, cached.values):
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(_unshard_hook(layer))


def _unshard_hook(layer: Any) -> Any:
    def hook(grad: torch.Tensor) -> None:
        layer.unshard()

    return hook


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in order: the modules of the classes HF lists in ``_no_split_modules`` (or of a subclass:
    ``fully_shard`` turns a layer's class into one)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if any(c.__name__ in layer_classes for c in type(m).__mro__)]


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied already (``configure_model`` may run more than once per module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp1_wrap(model: nn.Module, strategy: Any) -> nn.Module:
    """``model`` as the root FSDP1 unit, configured like Lightning's ``FSDPStrategy`` would configure it (auto-wrap
    policy, sharding strategy, CPU offload, process groups), on the strategy's device, with buffers and gradient
    reduction kept in fp32 unless ``FSDPStrategy(mixed_precision=...)`` says otherwise, and one unit per decoder layer
    unless the strategy names an ``auto_wrap_policy`` (so ``--trainer.strategy fsdp`` shards layer by layer too).
    Lightning then finds the model wrapped and leaves it as it is."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    mixed_precision = strategy.mixed_precision_config
    if strategy.mixed_precision is None and mixed_precision is not None:
        mixed_precision = dataclasses.replace(mixed_precision, buffer_dtype=torch.float32, reduce_dtype=torch.float32)
    kwargs = dict(strategy.kwargs)
    kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy({type(layer) for layer in _decoder_layers(model)}))
    strategy.kwargs.pop("auto_wrap_policy", None)  # applied here; Lightning would warn that it goes unused
    return FullyShardedDataParallel(
        model,
        cpu_offload=strategy.cpu_offload,
        mixed_precision=mixed_precision,
        sharding_strategy=strategy.sharding_strategy,
        device_id=strategy.root_device,
        **kwargs,
    )


def fsdp1_root(model: nn.Module) -> FullyShardedDataParallel | None:
    """The outermost FSDP1 ``FullyShardedDataParallel`` unit in ``model`` (``model`` itself when it is one), else
    ``None``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return None
    return next((m for m in model.modules() if isinstance(m, FullyShardedDataParallel)), None)


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip ``model``'s gradients to a global norm of ``max_norm``; returns the norm before clipping (a plain tensor,
    equal on every rank; every rank must call it). ``None`` only measures the norm and leaves the gradients alone.

    Full gradients (one device, DDP) and FSDP2 ``DTensor`` gradients go through ``torch.nn.utils.clip_grad_norm_``
    (DTensor reduces the shards' norms). FSDP1's gradients are 1-D pieces of flat parameters, which that function
    would take for the whole: the root unit's own ``clip_grad_norm_`` sums their squares over the shard group.
    """
    root = fsdp1_root(model)
    if root is not None:  # FSDP1 has no measure-only call; an infinite bound scales by 1
        return root.clip_grad_norm_(math.inf if max_norm is None else max_norm)
    if max_norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
