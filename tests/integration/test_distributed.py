"""LongAct under multi-process CPU training (2 processes, gloo): the frozen-row invariant on every rank.

Each case launches ``tests/integration/_distributed_worker.py`` as ``python -m`` (Lightning's ``ddp`` launcher
re-executes that module for rank 1). Every rank gathers the full weights after 12 AdamW(lr=1e-2, weight_decay=0.1)
steps and checks the invariant itself; the test reads both ranks' verdicts and compares their masks.

What runs where (Lightning 2.6.6, torch 2.13 CPU):

* ``strategy="ddp"``: supported on CPU; full tensors.
* ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``): supported on CPU/gloo, row-sharded
  DTensors.
* ``FSDPStrategy`` (FSDP1): **refused on CPU by Lightning** (see :func:`test_lightning_fsdp_strategy_refuses_cpu`),
  and torch's FSDP1 needs ``device_id=torch.device("cpu")``, which Lightning never passes on CPU. The worker uses
  :class:`tests.helpers.cli.CPUFSDPStrategy`, a test-only subclass that wraps with that ``device_id``,
  to exercise the FSDP1 ``use_orig_params`` flat-shard storage GPU users get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longact_lightning.callbacks.local_rows import FlatShard, _flat_shard_elements

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 12
QK_PROJECTIONS = 4  # tiny Llama-GQA: 2 layers x (q, k)


def _launch(strategy: str, out: Path, callback: str = "longact") -> tuple[list[dict], list[str], float]:
    """Run the worker on ``WORLD`` CPU processes; return each rank's verdict, each rank's error text, seconds."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "tests.integration._distributed_worker",
        "--strategy",
        strategy,
        "--callback",
        callback,
        "--out",
        str(out),
        "--steps",
        str(STEPS),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    errors = [(out / f"rank{r}.error.txt").read_text() for r in range(WORLD) if (out / f"rank{r}.error.txt").exists()]
    verdicts = [
        json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD) if (out / f"rank{r}.json").exists()
    ]
    if proc.returncode != 0 and not errors:
        errors.append(f"exit code {proc.returncode}\n{proc.stderr[-4000:]}")
    return verdicts, errors, seconds


def _assert_all_ranks_ok(verdicts: list[dict], errors: list[str], seconds: float) -> None:
    assert not errors, "a rank crashed:\n" + "\n----\n".join(errors)
    assert len(verdicts) == WORLD, f"{len(verdicts)} of {WORLD} ranks reported"
    assert sorted(v["rank"] for v in verdicts) == list(range(WORLD))
    for verdict in verdicts:
        assert verdict["world_size"] == WORLD
        assert verdict["global_step"] == STEPS
        assert verdict["ok"], f"rank {verdict['rank']} ({verdict['strategy']}, {seconds:.0f}s): {verdict['failures']}"


def _assert_same_masks_on_all_ranks(out: Path, key: str, expected: int) -> None:
    per_rank = [torch.load(out / f"rank{r}.pt")[key] for r in range(WORLD)]
    assert len(per_rank[0]) == expected, sorted(per_rank[0])
    for other in per_rank[1:]:
        assert other.keys() == per_rank[0].keys()
        for name, mask in per_rank[0].items():
            assert torch.equal(other[name], mask), f"{name}: masks differ between ranks"


def _assert_longact_run(verdicts: list[dict], out: Path) -> None:
    for verdict in verdicts:
        # The saliency hooks fired on both ranks and gloo's all_reduce summed their token counts.
        assert verdict["stats_count"] == [verdict["expected_tokens"]]
        assert verdict["selected_rows_total"] == 2 * (19 + 10)  # per layer: round(0.3*64) q + round(0.3*32) k
    _assert_same_masks_on_all_ranks(out, "channel_masks", QK_PROJECTIONS)
    _assert_same_masks_on_all_ranks(out, "row_masks", QK_PROJECTIONS)


def test_longact_ddp(tmp_path):
    verdicts, errors, seconds = _launch("ddp", tmp_path)
    _assert_all_ranks_ok(verdicts, errors, seconds)
    assert {v["strategy"] for v in verdicts} == {"DDPStrategy"}
    assert all(v["q0_local_shape"] == v["q0_param_shape"] == [32, 64] for v in verdicts)  # full tensors
    _assert_longact_run(verdicts, tmp_path)


def test_longact_fsdp2_model_parallel(tmp_path):
    verdicts, errors, seconds = _launch("fsdp2", tmp_path)
    _assert_all_ranks_ok(verdicts, errors, seconds)
    assert {v["strategy"] for v in verdicts} == {"ModelParallelStrategy"}
    # Row-sharded DTensors: global [32, 64], each rank stores 16 rows.
    assert all(v["q0_param_type"] == "DTensor" and v["q0_local_shape"] == [16, 64] for v in verdicts)
    _assert_longact_run(verdicts, tmp_path)


def test_gradient_row_mask_fsdp1_flat_shards(tmp_path):
    """Explicit global masks on every parameter, FSDP1 ``use_orig_params`` flat 1-D shards (incl. one split)."""
    verdicts, errors, seconds = _launch("fsdp1", tmp_path, callback="rowmask")
    _assert_all_ranks_ok(verdicts, errors, seconds)
    shapes = {v["rank"]: v for v in verdicts}
    # k_proj of layer 0 [32, 64] lies wholly in rank 0's half of the layer's FlatParameter, as a flat 1-D view;
    # the final norm [64] is split between the ranks.
    assert shapes[0]["q0_local_shape"] == [2048] and shapes[1]["q0_local_shape"] == [0]
    assert shapes[0]["final_norm_local_shape"] == shapes[1]["final_norm_local_shape"] == [32]
    _assert_same_masks_on_all_ranks(tmp_path, "row_masks", 3 + 2 * 9)  # embed, final norm, lm_head + 9 per layer


def test_longact_fsdp1(tmp_path):
    verdicts, errors, seconds = _launch("fsdp1", tmp_path)
    _assert_all_ranks_ok(verdicts, errors, seconds)
    _assert_longact_run(verdicts, tmp_path)


def test_lightning_fsdp_strategy_refuses_cpu():
    """Why FSDP1 needs the test-only subclass: Lightning 2.6.6 refuses ``FSDPStrategy`` with a CPU accelerator."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(strategy=FSDPStrategy(use_orig_params=True), accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(strategy="fsdp", accelerator="cpu", devices=2, logger=False)


@pytest.mark.parametrize(("start", "numel"), [(0, 35), (10, 13), (7, 0), (28, 7), (3, 1)])
def test_flat_shard_elements_match_flattened_row_mask(start, numel):
    """FSDP1 mapping, pure: local element indices = positions of frozen rows in the flattened slice (partial rows
    too)."""
    shape = torch.Size([5, 7])
    selected = torch.tensor([True, False, True, True, False])
    index = _flat_shard_elements(FlatShard(shape=shape, start=start, numel=numel), selected)
    reference = selected.repeat_interleave(7)[start : start + numel].nonzero().flatten()
    assert torch.equal(index, reference)
