"""The engine must run the trainer's model: a positional-encoding mismatch (RoPE scaling) is refused at the first
sync."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longact_lightning.models import load_causal_lm
from longact_lightning.rollout.hf_engine import HFEngine
from longact_lightning.rollout.weight_sync import check_same_positions

YARN = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64}


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64, rope_theta=500.0, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    return str(tmp_path)


def test_rope_scaling_is_merged_into_the_models_rope_parameters(model_dir):
    """The model's rope_theta survives; the positions really change (other log-probs at the same weights)."""
    plain = load_causal_lm(model_dir).eval()
    scaled = load_causal_lm(model_dir, rope_scaling=YARN).eval()
    assert scaled.config.rope_parameters == {"rope_theta": 500.0, **YARN}
    ids = torch.randint(2, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(ids).logits - scaled(ids).logits).abs().max() > 1e-4  # random weights: small logits


def test_same_positions_pass_and_numbers_compare_by_value(model_dir):
    scaled = load_causal_lm(model_dir, rope_scaling=YARN).config
    engine = load_causal_lm(model_dir, rope_scaling={**YARN, "factor": 4.0}).config
    check_same_positions(scaled, engine)
    check_same_positions(scaled, None)  # an engine that does not expose its config


def test_a_mismatch_names_the_field_and_the_override_that_fixes_it(model_dir):
    scaled = load_causal_lm(model_dir, rope_scaling=YARN).config
    plain = load_causal_lm(model_dir).config
    with pytest.raises(ValueError, match=r"rope_parameters=.*yarn.*hf_overrides=\{'rope_parameters': "):
        check_same_positions(scaled, plain)


def test_the_hf_engine_takes_the_same_rope_scaling(model_dir):
    engine = HFEngine(model_dir, dtype="float32", device="cpu", rope_scaling=YARN)
    check_same_positions(load_causal_lm(model_dir, rope_scaling=YARN).config, engine.model_config)
