"""Full policy weights out of any training layout, a bounded piece at a time: what a weight sync and an export read.

The policy's parameters are full tensors on one device or under DDP, row-sharded ``DTensor`` s under FSDP2
(``fully_shard``), and 1-D views of this rank's shard of a ``FlatParameter`` under FSDP1 (``use_orig_params=True``).
:func:`full_named_parameters` yields every parameter under its HF name as a full tensor in every layout, gathering as
little at a time as the layout allows, so that neither a sync nor an export ever materialises a second full model:

* FSDP2: ``full_tensor()`` per parameter (one all-gather each);
* FSDP1: one FSDP unit at a time (``summon_full_params(unit, recurse=False)``; with one unit per decoder layer that is
  one layer), each yielding the parameters it owns itself, as TRL does; the yielded tensors are copies, since the
  unit's full storage is freed when the next unit is gathered;
* otherwise: the parameters themselves.

Gathering is a collective under FSDP: every rank must run the generator to the end, in the same order, even a rank
that throws the tensors away (not rank 0 of an export, say). It must run outside any FSDP forward (FSDP1 refuses to
unshard inside one), which is why the RL module syncs in ``on_train_batch_start``, before the step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from longact_lightning.saliency.projections import clean_name
from longact_lightning.sharding import fsdp1_root


def full_named_parameters(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every parameter of ``policy`` (tied ones once), detached; names are relative to
    the HF model, wrapper segments removed. ``policy`` may be the HF model itself, FSDP2-sharded, or wrapped in FSDP1
    (``RLPolicyModule.policy`` under ``FSDPStrategy``)."""
    root = fsdp1_root(policy)
    if root is not None:
        yield from _fsdp1_units(policy, root)
        return
    for name, param in policy.named_parameters():
        data = param.detach()
        if hasattr(data, "full_tensor"):
            data = data.full_tensor()
        yield clean_name(name), data


def _fsdp1_units(policy: nn.Module, root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    names = {id(param): clean_name(name) for name, param in policy.named_parameters()}
    if any(isinstance(param, _flat_parameter_type()) for param in policy.parameters()):
        raise ValueError(
            "Gathering the policy under FSDP1 needs FSDPStrategy(..., use_orig_params=True): without it the policy's "
            "parameters are FlatParameters, which carry no HF names."
        )
    units = [m for m in root.modules() if isinstance(m, FullyShardedDataParallel)]
    seen: set[int] = set()
    for unit in units:  # outermost first: gathering the root initialises FSDP if no forward has run yet
        nested = {id(p) for inner in unit.modules() if inner is not unit and inner in units for p in inner.parameters()}
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for param in unit.parameters():
                key = id(param)
                if key in seen or key in nested or key not in names:
                    continue
                seen.add(key)
                yield names[key], param.detach().clone()


def _flat_parameter_type() -> type:
    from torch.distributed.fsdp._flat_param import FlatParameter

    return FlatParameter


# Config fields that decide where a token's query and key point: trainer and engine must agree on every one.
_POSITION_FIELDS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")


def check_same_positions(trainer_config: Any, engine_config: Any) -> None:
    """Refuse an engine whose positional encoding differs from the trainer's model.

    RoPE scaling (YaRN for contexts beyond the pretrained one) is a config change, not a weight: a weight sync does
    not carry it, so an engine built without the trainer's ``rope_scaling`` would sample from another model than the
    one trained, silently, at every position. ``None`` on either side (a model or engine without an HF config) passes.
    """
    if trainer_config is None or engine_config is None:
        return
    for field in _POSITION_FIELDS:
        ours, theirs = getattr(trainer_config, field, None), getattr(engine_config, field, None)
        if _comparable(ours) != _comparable(theirs):
            raise ValueError(
                f"The trainer's model has {field}={ours!r} but the rollout engine's has {theirs!r}: rollouts would be "
                f"sampled at other positions than they are trained at. Give the engine the same: "
                f"data.engine_options.hf_overrides={{{field!r}: {ours!r}}} for vLLM, or set model.rope_scaling and "
                "data.engine_options.rope_scaling alike for the hf engine."
            )


def _comparable(value: Any) -> Any:
    """Numbers as floats (``2`` == ``2.0``), mappings and sequences recursively; other values as they are."""
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_comparable(item) for item in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
