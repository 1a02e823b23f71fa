"""The ablation driver end to end at toy scale: 2 arms x 1 seed x 1 step on the embedded SmolLM2-135M, each run a
real ``longact fit`` subprocess that then scores its exported policy on a held-out set; then the report, and a rerun
that skips both runs.

Uses the transformers engine (``--engine hf``) and tiny sizes: about 2-3 minutes on 2 idle cores (7 minutes measured
while two other training jobs shared them). The vLLM path is what ``docs/ablation`` was produced with.
"""

from __future__ import annotations

import csv
import json
import time

import pytest

from experiments.ablation.__main__ import main

pytestmark = pytest.mark.integration

ARGS = [
    "--arms", "high", "none",
    "--seeds", "0",
    "--steps", "1",
    "--task", "niah_single_1",
    "--target-length", "448",
    "--prompts-per-step", "2",
    "--group-size", "2",
    "--max-new-tokens", "8",
    "--heldout-samples", "2",
    "--eval-max-tokens", "8",
    "--engine", "hf",
    "--no-base",
]  # fmt: skip


@pytest.mark.timeout(600)
def test_ablation_runs_reports_and_resumes(tmp_path):
    out = tmp_path / "ablation"
    main([*ARGS, "--out", str(out)])

    for arm in ("high", "none"):
        result = json.loads((out / f"{arm}_seed0" / "result.json").read_text())
        assert result["arm"] == arm and result["seed"] == 0
        assert result["heldout_records"] == 2 and len(result["heldout_scores"]) == 2
        assert 0.0 <= result["accuracy"] <= 100.0
        assert len(result["reward_curve"]) == 1  # one optimizer step logged train/reward_mean
        assert f"--longact.mode {arm}" in result["train_command"]
        assert not (out / f"{arm}_seed0" / "hf").exists()  # weights dropped after evaluation
    with (out / "results.csv").open() as handle:
        rows = {r["arm"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"high", "none"} and rows["high"]["seeds"] == "1"
    assert rows["high"]["diff_vs_none"] != ""  # one shared seed: a difference, no interval
    assert "| high | 1 |" in (out / "results.md").read_text()
    assert (out / "ablation.png").stat().st_size > 10_000

    # Rerunning the same command skips finished runs (their result.json is kept as is).
    stamp = (out / "high_seed0" / "result.json").stat().st_mtime_ns
    started = time.perf_counter()
    main([*ARGS, "--out", str(out)])
    assert time.perf_counter() - started < 30
    assert (out / "high_seed0" / "result.json").stat().st_mtime_ns == stamp
