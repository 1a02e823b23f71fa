"""VLLMEngine rejects bad arguments before vLLM starts (these tests never build an engine)."""

from __future__ import annotations

import pytest

from longact_lightning.rollout.vllm_engine import VLLMEngine


@pytest.mark.parametrize("kv_cache_gib", [0, -0.5])
def test_non_positive_kv_cache_is_rejected_with_the_fix(kv_cache_gib):
    with pytest.raises(ValueError, match=rf"kv_cache_gib={kv_cache_gib} must be > 0, or None"):
        VLLMEngine(kv_cache_gib=kv_cache_gib)


def test_unknown_logprobs_mode_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="use 'processed' or 'raw'"):
        VLLMEngine(logprobs_mode="sampled")
