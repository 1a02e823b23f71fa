"""Sequence parallelism (Ulysses) over 2 gloo processes gives one process's log-probs, entropies, loss, gradients and
query/key statistics on the same batch — with and without activation checkpointing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration._cli_helpers import make_tiny_model_dir, subprocess_env
from tests.integration.test_vllm_tensor_parallel import _free_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_two_ranks_split_each_sequence_and_match_one_process(tmp_path, checkpointing):
    model = make_tiny_model_dir(tmp_path / "tiny")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration._sequence_parallel_worker", str(rank), port, str(model),
             "1" if checkpointing else "0", str(tmp_path)],
            cwd=Path(__file__).resolve().parents[2], env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n----\n".join(e[-3000:] for e in errors)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["logprob_diff"] < 1e-5 and seen["entropy_diff"] < 1e-5, seen
        assert seen["loss"][0] == pytest.approx(seen["loss"][1], rel=1e-6)
        assert seen["grad_rel"] < 1e-5 and seen["grad_norm"] > 0, seen
        assert seen["stat_diff"] < 1e-6 and seen["counts"][0] == seen["counts"][1] == [23.0 + 17.0 + 9.0], seen
