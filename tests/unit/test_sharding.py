"""Sharding helpers on one process (a world of one, gloo): what they configure, and the errors they name."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import MixedPrecision

from longact_lightning.sharding import (
    clip_grad_norm,
    data_parallel_mesh,
    fsdp1_root,
    fsdp1_wrap,
    fully_shard_decoder_layers,
)
from tests.helpers.models import tiny_model


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _strategy(**kwargs) -> FSDPStrategy:
    return FSDPStrategy(parallel_devices=[torch.device("cpu")], precision_plugin=FSDPPrecision("bf16-mixed"), **kwargs)


def test_fsdp1_wrap_keeps_rope_buffers_and_gradient_reduction_in_fp32(world_of_one):
    """Lightning's bf16-mixed policy would cast buffers (RoPE inv_freq) and reductions to bf16."""
    assert _strategy().mixed_precision_config.buffer_dtype == torch.bfloat16  # what Lightning alone would do
    model = tiny_model("qwen3")
    wrapped = fsdp1_wrap(model, _strategy())
    assert fsdp1_root(wrapped) is wrapped
    policy = wrapped.mixed_precision
    assert (policy.param_dtype, policy.buffer_dtype, policy.reduce_dtype) == (
        torch.bfloat16, torch.float32, torch.float32
    )  # fmt: skip
    wrapped(input_ids=torch.tensor([[3, 4, 5]]))
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_fsdp1_wrap_keeps_an_explicit_mixed_precision(world_of_one):
    explicit = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    wrapped = fsdp1_wrap(tiny_model("qwen3"), _strategy(mixed_precision=explicit))
    assert wrapped.mixed_precision == explicit


def test_hybrid_replicas_must_divide_the_world():
    with pytest.raises(ValueError, match="hybrid_shard_replicas=3 does not divide the world size 8"):
        data_parallel_mesh("cpu", 8, 3)


def test_fsdp2_needs_the_decoder_layer_classes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="names no decoder layer class in `_no_split_modules`"):
        fully_shard_decoder_layers(model, mesh=None)


def test_clip_grad_norm_measures_without_clipping_when_unbounded():
    model = torch.nn.Linear(2, 2, bias=False)
    model.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    before = model.weight.grad.clone()
    assert clip_grad_norm(model, None).item() == 5.0
    assert torch.equal(model.weight.grad, before)  # measured only
    assert clip_grad_norm(model, 1.0).item() == 5.0
    torch.testing.assert_close(model.weight.grad, before / 5.0, rtol=1e-5, atol=0)
