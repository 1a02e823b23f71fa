"""Turn whatever the user points at (HF directory, hub id, the embedded model, a Lightning ``.ckpt``) into a policy.

A Lightning checkpoint of :class:`~longact_lightning.rl.module.RLPolicyModule` stores the policy under ``policy.*``
and the base model's name in its hyperparameters; vLLM cannot read it, so evaluation exports it to a HF directory
first (:func:`export_policy`) and serves that.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from longact_lightning.models import load_causal_lm, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_POLICY_PREFIX = "policy."


def is_lightning_checkpoint(path: str | Path) -> bool:
    return str(path).endswith(".ckpt")


def read_policy_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(policy state dict with the 'policy.' prefix removed, hyperparameters)`` of a Lightning ``.ckpt``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist; pass the path of a Lightning .ckpt file.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = {k[len(_POLICY_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_POLICY_PREFIX)}
    if not state:
        raise ValueError(
            f"Checkpoint {str(path)!r} has no 'policy.*' weights; it was not written by RLPolicyModule. Export the "
            "model with save_pretrained and pass that directory instead."
        )
    return state, dict(checkpoint.get("hyper_parameters", {}))


def load_policy(name_or_path: str, base_model: str | None = None, dtype: str = "float32") -> PreTrainedModel:
    """A HF causal LM from a model name / directory, or from a ``.ckpt`` loaded onto its base model.

    Args:
        name_or_path: HF directory, hub id, ``smollm2-135m-instruct``, or a Lightning ``.ckpt``.
        base_model: architecture to load a ``.ckpt`` into; ``None`` = the ``model`` hyperparameter stored in it.
        dtype: weight dtype.
    """
    if not is_lightning_checkpoint(name_or_path):
        return load_causal_lm(name_or_path, dtype=dtype)
    state, hparams = read_policy_checkpoint(name_or_path)
    base = base_model or hparams.get("model")
    if base is None:
        raise ValueError(f"Checkpoint {name_or_path!r} does not name its base model; pass base_model=<HF dir or name>.")
    policy = load_causal_lm(base, dtype=dtype)
    policy.load_state_dict(state, strict=True)
    return policy


def export_policy(policy: PreTrainedModel, tokenizer_name: str, directory: str | Path) -> str:
    """Write ``policy`` and the tokenizer of ``tokenizer_name`` as a HF directory that transformers and vLLM load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(directory)
    load_tokenizer(tokenizer_name).save_pretrained(directory)
    return str(directory)
