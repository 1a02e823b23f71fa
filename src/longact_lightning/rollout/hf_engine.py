"""transformers ``generate`` as a rollout engine: the fallback when vLLM is absent, and the reference in tests.

It returns the same typed rollouts as the vLLM engine, with the same log-prob convention, so the DataModule and the
trainer cannot tell the two apart (apart from speed: vLLM's paged KV cache and continuous batching are several times
faster, see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from longact_lightning.models import EMBEDDED_MODEL, load_causal_lm
from longact_lightning.rollout.base import GenerationInterrupted, Rollout, SamplingConfig, StopFn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class HFEngine:
    """Sampling with ``model.generate`` on left-padded prompt batches.

    The engine either owns a copy of the model (built from a name or path; weights arrive through
    :meth:`load_weights`) or is handed the training policy module itself. Sharing costs no memory and no sync: the
    engine then generates with the very tensors the optimizer updates, and :meth:`load_weights` skips tensors that
    already are the engine's own. A copy lets the engine run in another dtype or on another device than the trainer.

    Log-probs follow :class:`~longact_lightning.rollout.vllm_engine.VLLMEngine`: ``"processed"`` takes them from the
    scores ``generate`` sampled from (after temperature and top-p), ``"raw"`` from the unprocessed logits. They are
    collected per step (``output_scores`` / ``output_logits``), which holds ``[sequences, new_tokens, vocab]`` floats
    per ``generate`` call; ``max_batch_sequences`` bounds that.

    Args:
        model: HF model directory, hub id, ``"smollm2-135m-instruct"``, or a loaded HF model to share.
        dtype: dtype a model loaded by name is built in (ignored for a shared module).
        device: where a model loaded by name lives; ``None`` = CUDA when available, else CPU.
        logprobs_mode: ``"processed"`` or ``"raw"``.
        max_batch_sequences: upper bound on ``prompts x n`` sequences per ``generate`` call (whole prompts only).
        pad_token_id: padding id for the prompt batch; ``None`` = the model's ``pad_token_id``, else its EOS id.
        rope_scaling: as ``RLPolicyModule(rope_scaling=)``; must match the trainer's.
    """

    def __init__(
        self,
        model: str | PreTrainedModel = EMBEDDED_MODEL,
        dtype: str = "bfloat16",
        device: str | None = None,
        logprobs_mode: Literal["processed", "raw"] = "processed",
        max_batch_sequences: int = 64,
        pad_token_id: int | None = None,
        rope_scaling: dict | None = None,
    ) -> None:
        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode={logprobs_mode!r} is not supported; use 'processed' or 'raw'.")
        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences={max_batch_sequences} must be >= 1.")
        if isinstance(model, nn.Module):
            self.model = model
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded = load_causal_lm(model, dtype=dtype, rope_scaling=rope_scaling)
            self.model = loaded.to(device).eval().requires_grad_(False)
        generation_config = self.model.generation_config
        eos = generation_config.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        if not self.eos_token_ids:
            raise ValueError("The model's generation_config has no eos_token_id; set it so generation can stop.")
        if pad_token_id is None:
            pad_token_id = generation_config.pad_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else min(self.eos_token_ids)
        self.logprobs_mode = logprobs_mode
        self.max_batch_sequences = max_batch_sequences
        self._calls = 0

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, should_stop: StopFn | None = None
    ) -> list[list[Rollout]]:
        """Sample ``sampling.n`` completions per prompt, in chunks of whole prompts; ``should_stop`` is polled after
        every generated token."""
        per_call = max(1, self.max_batch_sequences // sampling.n)
        seed = None
        if sampling.seed is not None:
            seed = int(np.random.SeedSequence([sampling.seed, self._calls]).generate_state(1)[0])
        self._calls += 1
        was_training = self.model.training
        self.model.eval()
        try:
            # Sampling draws from the global RNG; fork it so the trainer's random stream does not depend on rollouts.
            with torch.random.fork_rng(devices=_cuda_devices(self.model), enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                groups: list[list[Rollout]] = []
                for start in range(0, len(prompts), per_call):
                    groups.extend(self._generate_chunk(prompts[start : start + per_call], sampling, should_stop))
        finally:
            self.model.train(was_training)
        return groups

    @property
    def model_config(self) -> Any:
        """The HF config of the served model (what the trainer's must agree with)."""
        return self.model.config

    @property
    def max_model_len(self) -> int | None:
        """The model's context in tokens (``max_position_embeddings``): beyond it generate runs, on positions the
        model never saw. ``None`` if the config does not say."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each tensor into the parameter of the same name, in place; a tensor that *is* that parameter is
        skipped (shared policy). Unknown names raise, since silently serving stale weights breaks on-policy RL."""
        for name, tensor in named_tensors:
            try:
                target = self.model.get_parameter(name)
            except AttributeError as error:
                raise KeyError(
                    f"load_weights got {name!r}, which the HF engine's model does not have; pass the policy's own "
                    "named_parameters() (HF names, no wrapper prefixes)."
                ) from error
            if target.data_ptr() != tensor.data_ptr():
                target.copy_(tensor.detach())

    def _generate_chunk(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, should_stop: StopFn | None
    ) -> list[list[Rollout]]:
        from transformers import GenerationConfig, StoppingCriteriaList

        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=0,  # vLLM does not truncate to a top-k either
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            use_cache=True,  # a training policy may have it switched off
            return_dict_in_generate=True,
            output_scores=self.logprobs_mode == "processed",
            output_logits=self.logprobs_mode == "raw",
        )
        criteria = StoppingCriteriaList([_StopWhen(should_stop)] if should_stop is not None else [])
        # `generate` is GenerationMixin's, which causal LMs mix in and PreTrainedModel does not declare
        output = self.model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
            stopping_criteria=criteria,
        )  # fmt: skip
        if should_stop is not None and should_stop():
            raise GenerationInterrupted(f"HF generate stopped after {output.sequences.shape[1] - width} tokens.")
        steps = output.scores if self.logprobs_mode == "processed" else output.logits
        new_tokens = output.sequences[:, width:]  # [prompts x n, T]
        per_step = [torch.log_softmax(s.float(), -1).gather(-1, new_tokens[:, t, None]) for t, s in enumerate(steps)]
        logprobs = torch.cat(per_step, dim=1).cpu()  # [prompts x n, T]
        new_tokens = new_tokens.cpu()
        groups = []
        for row, prompt in enumerate(prompts):
            group = []
            for sample in range(row * sampling.n, (row + 1) * sampling.n):
                group.append(self._rollout(tuple(prompt), new_tokens[sample].tolist(), logprobs[sample].tolist()))
            groups.append(group)
        return groups

    def _rollout(self, prompt_ids: tuple[int, ...], tokens: list[int], logprobs: list[float]) -> Rollout:
        """Cut after the first EOS (``generate`` pads finished rows); no EOS means the length limit was hit."""
        stop = next((i + 1 for i, token in enumerate(tokens) if token in self.eos_token_ids), None)
        length = len(tokens) if stop is None else stop
        return Rollout(
            prompt_ids=prompt_ids,
            completion_ids=tuple(tokens[:length]),
            logprobs=tuple(logprobs[:length]),
            finish_reason="length" if stop is None else "stop",
        )


class _StopWhen:
    """A ``generate`` stopping criterion that ends every sequence once ``should_stop`` says so."""

    def __init__(self, should_stop: StopFn) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
