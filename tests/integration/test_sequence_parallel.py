"""Sequence parallelism (Ulysses) over 2 gloo processes gives one process's log-probs, entropies, loss, gradients and
query/key statistics on the same batch — with and without activation checkpointing."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import make_tiny_model_dir, run_worker_ranks

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_two_ranks_split_each_sequence_and_match_one_process(tmp_path, checkpointing):
    model = make_tiny_model_dir(tmp_path / "tiny")
    flag = "1" if checkpointing else "0"
    run_worker_ranks("tests.integration._sequence_parallel_worker", [str(model), flag, str(tmp_path)], tmp_path)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["logprob_diff"] < 1e-5 and seen["entropy_diff"] < 1e-5, seen
        assert seen["loss"][0] == pytest.approx(seen["loss"][1], rel=1e-6)
        assert seen["grad_rel"] < 1e-5 and seen["grad_norm"] > 0, seen
        assert seen["stat_diff"] < 1e-6 and seen["counts"][0] == seen["counts"][1] == [23.0 + 17.0 + 9.0], seen
