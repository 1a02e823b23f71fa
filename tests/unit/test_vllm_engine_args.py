"""VLLMEngine's arguments: bad ones are rejected before vLLM starts, and what each rank of a multi-GPU run passes to
``vllm.LLM`` (these tests never build an engine)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from longact_lightning.rollout.vllm_engine import VLLMEngine


@pytest.mark.parametrize("kv_cache_gib", [0, -0.5])
def test_non_positive_kv_cache_is_rejected_with_the_fix(kv_cache_gib):
    with pytest.raises(ValueError, match=rf"kv_cache_gib={kv_cache_gib} must be > 0, or None"):
        VLLMEngine(kv_cache_gib=kv_cache_gib)


def test_unknown_logprobs_mode_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="use 'processed' or 'raw'"):
        VLLMEngine(logprobs_mode="sampled")


@pytest.mark.parametrize("sleep_level", [0, 3])
def test_unknown_sleep_level_is_rejected(sleep_level):
    with pytest.raises(ValueError, match=rf"sleep_level={sleep_level} is not a vLLM sleep level; use 1 or 2"):
        VLLMEngine(sleep_level=sleep_level)


@pytest.mark.parametrize(("tp", "world"), [(0, 8), (3, 8)])
def test_tensor_parallel_size_must_divide_the_world(tp, world):
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={tp} must be >= 1 and divide the world size {world}"):
        VLLMEngine(tensor_parallel_size=tp, rank=0, world_size=world)


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_the_world_is_rejected(rank, world):
    with pytest.raises(ValueError, match=rf"rank={rank}, local_rank=0, world_size={world} is not a rank of a world"):
        VLLMEngine(rank=rank, world_size=world)


class _RecordingLLM:
    """Stands in for ``vllm.LLM``: records its keyword arguments and the environment it was built in."""

    built: list[dict] = []

    def __init__(self, **kwargs):
        env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        self.built.append({"kwargs": kwargs, "env": env})
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))


@pytest.mark.parametrize(("nodes", "gpus", "tp"), [(1, 8, 1), (2, 4, 1), (1, 8, 2)])
def test_what_each_of_8_gpu_ranks_passes_to_vllm(monkeypatch, nodes, gpus, tp):
    """On a CUDA platform (mocked: no GPU here) every rank builds its own engine in external_launcher mode, on the
    device its LOCAL_RANK names, with the configured share of that device's memory; tensor-parallel blocks of ``tp``
    consecutive ranks share one engine and its seed (the block's first rank's)."""
    import torch.distributed as dist
    import vllm
    from vllm.platforms import current_platform

    monkeypatch.setattr(vllm, "LLM", _RecordingLLM)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    monkeypatch.setattr(os, "environ", environment)  # the engine sets these; keep them out of the test process
    world = nodes * gpus
    blocks: list[list[int]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_subgroups_by_enumeration", lambda ranks: (blocks.extend(ranks) or "block", None))
    _RecordingLLM.built = []
    engines = []
    for rank in range(world):
        seeds = {r: 100 + r for r in range(world)}  # each rank's own sampling seed, as the DataModule derives it
        first = rank - rank % tp
        monkeypatch.setattr(
            dist, "all_gather_object", lambda out, obj, group, s=seeds[first]: out.__setitem__(slice(None), [s] * tp)
        )
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: tp)
        engines.append(VLLMEngine(
            model="/models/qwen3-4b", dtype="bfloat16", gpu_memory_utilization=0.35, seed=seeds[rank],
            tensor_parallel_size=tp, rank=rank, local_rank=rank % gpus, world_size=world,
        ))  # fmt: skip

    assert len(_RecordingLLM.built) == world
    for rank, built in enumerate(_RecordingLLM.built):
        kwargs, env = built["kwargs"], built["env"]
        assert env == {"RANK": str(rank), "LOCAL_RANK": str(rank % gpus), "WORLD_SIZE": str(world)}  # cuda:LOCAL_RANK
        assert kwargs["distributed_executor_backend"] == "external_launcher"
        assert kwargs["tensor_parallel_size"] == tp
        assert kwargs["gpu_memory_utilization"] == 0.35  # of the rank's own GPU
        assert kwargs["seed"] == 100 + rank - rank % tp
        assert kwargs["model"] == "/models/qwen3-4b" and kwargs["dtype"] == "bfloat16"
    if tp > 1:
        assert blocks[: world // tp] == [list(range(s, s + tp)) for s in range(0, world, tp)]
    assert all(engine._per_request_seeds for engine in engines)  # GPU sampling takes per-request seeds


def test_a_single_process_engine_keeps_vllms_own_executor(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "LLM", _RecordingLLM)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "RANK"})
    _RecordingLLM.built = []
    VLLMEngine(model="/models/m")
    assert _RecordingLLM.built[0]["env"]["RANK"] is None
    assert "distributed_executor_backend" not in _RecordingLLM.built[0]["kwargs"]
    assert _RecordingLLM.built[0]["kwargs"]["tensor_parallel_size"] == 1
