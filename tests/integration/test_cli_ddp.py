"""``longact fit ... --trainer.strategy ddp --trainer.devices 2`` on CPU (gloo): a real, shortened RL run through the
CLI, with the frozen-row invariant, the masks and the prompt sharding checked on every rank.

The run is the real product path (LightningCLI, RolloutDataModule with RULER prompts and the HF engine, the RL
module, LongAct, checkpoints) on a tiny saved model so that it finishes in well under a minute. Lightning's ``ddp``
launcher re-executes the command for rank 1, so the CLI runs as a subprocess (``python -m longact_lightning.cli``);
:class:`tests.integration._cli_helpers.RunRecorder` (added to ``trainer.callbacks`` in the run config) writes each
rank's verdict to the output directory, and :func:`tests.integration._cli_helpers.logged_reward` logs which prompt
each rank scored. A second run resumes the first with ``--ckpt_path last`` on two ranks and checks that each rank
continues its own share of the prompt stream.

FSDP is not run here: Lightning 2.6 refuses ``FSDPStrategy`` on CPU (see ``test_distributed.py``), and FSDP2
(``ModelParallelStrategy``) needs a ``configure_model`` that ``RLPolicyModule`` does not have.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration._cli_helpers import make_tiny_model_dir, read_jsonl, subprocess_env, write_run_config

pytestmark = pytest.mark.integration

WORLD = 2
STEPS = 3
PROMPTS_PER_STEP = 2


def _run(config: Path, out: Path, cwd: Path, *args: str) -> float:
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "longact_lightning.cli", "fit", "--config", str(config),
           "--trainer.strategy", "ddp", "--trainer.devices", str(WORLD), *args]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(out), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"exit {proc.returncode} after {seconds:.0f}s\n{proc.stderr[-6000:]}"
    return seconds


def test_cli_ddp_two_ranks_keep_frozen_rows_and_share_prompts(tmp_path):
    out = tmp_path / "out"
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    config = write_run_config(tmp_path / "run.yaml", model_dir, out, **{"trainer.max_steps": STEPS})
    seconds = _run(config, out, tmp_path)

    verdicts = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, verdict in enumerate(verdicts):
        assert verdict["rank"] == rank and verdict["world_size"] == WORLD
        assert verdict["strategy"] == "DDPStrategy"
        assert verdict["global_step"] == STEPS and verdict["steps"] == list(range(1, STEPS + 1))
        # frozen Q/K rows bit-identical to train start and to the model on disk; selected rows and V moved
        assert verdict["ok"], f"rank {rank}: {verdict['failures']}"
        assert verdict["masked_params"] == 4  # 2 layers x (q_proj, k_proj)
        assert verdict["selected_rows"] == 2 * (19 + 10)  # per layer round(0.3 * 64) q rows + round(0.3 * 32) k rows
        assert verdict["datamodule_rank"] == [rank, WORLD]

    # Same masks on every rank (saliency statistics are all-reduced), and DDP kept the replicas identical.
    saved = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    assert saved[0]["end_masks"].keys() == saved[1]["end_masks"].keys()
    for name, mask in saved[0]["end_masks"].items():
        assert torch.equal(mask, saved[1]["end_masks"][name]), f"{name}: masks differ between ranks"
    assert saved[0]["digest"] == saved[1]["digest"]

    # Each rank sampled with its own seed and streamed its own share of the prompts: rank r took records r, r+W, ...
    assert verdicts[0]["sampling_seed"] != verdicts[1]["sampling_seed"]
    scored = {r: sorted({row["index"] for row in read_jsonl(out / f"prompts_rank{r}.jsonl")}) for r in range(WORLD)}
    for rank in range(WORLD):
        assert scored[rank] == list(range(rank, WORLD * STEPS * PROMPTS_PER_STEP, WORLD)), scored
    # ... and the checkpointed stream position knows both ranks' positions.
    state = verdicts[0]["datamodule_state"]
    assert state["world_size"] == WORLD
    assert state["rank_positions"] == [[0, 11], [0, 12]]  # rank 0 last took record 10, rank 1 record 11
    assert state["prompts_consumed"] == WORLD * STEPS * PROMPTS_PER_STEP
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == STEPS
    assert last["RolloutDataModule"]["rank_positions"] == [[0, 11], [0, 12]]
    print(f"2-rank DDP run of {STEPS} steps: {seconds:.0f}s")

    # Resumed on two ranks, each rank continues from its own saved position: no record replayed, none skipped.
    resumed = tmp_path / "resumed"
    _run(config, resumed, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 2))
    for rank in range(WORLD):
        verdict = json.loads((resumed / f"rank{rank}.json").read_text())
        assert verdict["start_step"] == STEPS and verdict["global_step"] == STEPS + 2 and verdict["ok"]
        taken = sorted({row["index"] for row in read_jsonl(resumed / f"prompts_rank{rank}.jsonl")})
        first = WORLD * STEPS * PROMPTS_PER_STEP
        assert taken == list(range(first + rank, first + WORLD * 2 * PROMPTS_PER_STEP, WORLD)), taken

