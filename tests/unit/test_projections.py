"""Projection discovery: the rows we call query/key channels are the ones the attention actually consumes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longact_lightning.saliency import find_qk_projections
from tests.helpers.models import TINY_CONFIGS, tiny_model


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_one_q_and_one_k_per_layer_with_gqa_shapes(arch):
    model = tiny_model(arch)
    projections = find_qk_projections(model)
    assert [(p.layer, p.kind) for p in projections] == [(0, "k"), (0, "q"), (1, "k"), (1, "q")]
    q = next(p for p in projections if p.kind == "q")
    k = next(p for p in projections if p.kind == "k")
    assert q.channels == 64
    assert k.channels == (64 if arch == "gpt_neox" else 32)  # GQA: 2 kv heads x 16
    # per-head selection needs each projection's own head count: keys have the KV heads, not the query heads
    assert (q.num_heads, q.head_dim) == (4, 16)
    assert (k.num_heads, k.head_dim) == ((4, 16) if arch == "gpt_neox" else (2, 16))
    if q.module_name == k.module_name:  # fused: query and key rows are disjoint parts of one matrix
        assert len(set(q.rows.tolist()) | set(k.rows.tolist())) == q.channels + k.channels


def _attention_inputs(arch, model, x):
    """Query/key states as the attention module computes them (before RoPE), via the model's own code path."""
    layer = model.model.layers[0].self_attn if arch != "gpt_neox" else model.gpt_neox.layers[0].attention
    if arch == "phi3":
        qkv = layer.qkv_proj(x)
        qpos = layer.config.num_attention_heads * layer.head_dim
        return qkv[..., :qpos], qkv[..., qpos : qpos + layer.num_key_value_heads * layer.head_dim]
    if arch == "gpt_neox":
        qkv = layer.query_key_value(x).view(*x.shape[:-1], -1, 3 * layer.head_size)
        q, k, _ = qkv.chunk(3, dim=-1)
        return q.flatten(-2), k.flatten(-2)
    return layer.q_proj(x), layer.k_proj(x)


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_rows_reproduce_the_models_query_and_key_states(arch):
    model = tiny_model(arch)
    x = torch.randn(2, 5, 64)
    q_ref, k_ref = _attention_inputs(arch, model, x)
    modules = dict(model.named_modules())
    for p in find_qk_projections(model):
        if p.layer != 0:
            continue
        out = modules[p.module_name](x)[..., p.rows]
        torch.testing.assert_close(out, q_ref if p.kind == "q" else k_ref, rtol=0, atol=0)


def test_patterns_override_and_nothing_found_lists_linears():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_attention_heads": 2, "hidden_size": 8})()
            self.blocks = nn.ModuleList([nn.ModuleDict({"wq": nn.Linear(8, 8), "wk": nn.Linear(8, 8)})])

    with pytest.raises(ValueError, match=r"blocks\.0\.wq.*patterns="):
        find_qk_projections(Odd())
    found = find_qk_projections(Odd(), patterns={"q": r"\.wq$", "k": r"\.wk$"})
    assert [(p.module_name, p.kind, p.channels) for p in found] == [("blocks.0.wk", "k", 8), ("blocks.0.wq", "q", 8)]
