"""Held-out scores inside the Lightning loop: ``longact fit`` with ``data.val_source`` logs ``val/<task>/score`` at
``trainer.val_check_interval``, and ``longact validate`` gives the same score on one process and on two (DDP).

The real CLI in a subprocess (tiny saved model, HF engine); the held-out metric is
:func:`tests.helpers.cli.index_score`, 1 for every third record, so the expected score is known by hand whatever the
model generates: 3 of the 8 records (indices 0, 3, 6) = 37.5 %. A rank that reported only its own share would log
50 % (rank 0: 0, 2, 4, 6) or 25 % (rank 1: 1, 3, 5, 7).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import make_tiny_model_dir, subprocess_env, write_run_config

pytestmark = pytest.mark.integration

HELD_OUT = {
    "data.val_source": {
        "class_path": "longact_lightning.data.ruler.RulerSource",
        "init_args": {"task": "niah_single_1", "target_length": 512, "num_samples": 8, "seed": 1},
    },
    "data.held_out_metric": "tests.helpers.cli:index_score",
    "data.held_out_max_tokens": 4,
    "data.held_out_batch_size": 3,  # several validation batches per rank
    "trainer.num_sanity_val_steps": 0,
}
EXPECTED = 100 * 3 / 8


def _run(tmp_path: Path, out: Path, subcommand: str, **overrides) -> list[dict[str, str]]:
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    config = write_run_config(tmp_path / f"{out.name}.yaml", model_dir, out, **{**HELD_OUT, **overrides})
    cmd = [sys.executable, "-m", "longact_lightning.cli", subcommand, "--config", str(config)]
    out.mkdir(parents=True, exist_ok=True)
    env = {**subprocess_env(out), "PYTHONWARNINGS": "default"}  # Lightning's warnings are part of what is checked
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # the scores are logged as already synchronised over ranks: no Lightning warning asking for sync_dist
    assert "sync_dist=True" not in proc.stderr, proc.stderr[-6000:]
    with (out / "logs" / "metrics.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("val/niah_single_1/score")]


def test_fit_logs_the_held_out_score_at_the_configured_interval(tmp_path):
    rows = _run(tmp_path, tmp_path / "fit", "fit", **{"trainer.max_steps": 4, "trainer.val_check_interval": 2})
    # after the 2nd and 4th training batches, logged at their step (Lightning counts logged steps from 0)
    assert [int(row["step"]) for row in rows] == [1, 3]
    assert all(float(row["val/niah_single_1/score"]) == pytest.approx(EXPECTED) for row in rows)
    assert all(float(row["val/score"]) == pytest.approx(EXPECTED) for row in rows)  # the mean over its one task


@pytest.mark.parametrize("devices", [1, 2])
def test_validate_scores_every_record_once_on_any_number_of_ranks(tmp_path, devices):
    overrides = {"trainer.devices": devices, "trainer.strategy": "ddp" if devices > 1 else "auto"}
    rows = _run(tmp_path, tmp_path / f"validate{devices}", "validate", **overrides)
    assert len(rows) == 1
    assert float(rows[0]["val/niah_single_1/score"]) == pytest.approx(EXPECTED)
