"""The ablation driver end to end at toy scale: 2 arms x 1 seed x 1 step on the embedded SmolLM2-135M, each run a
real ``longact fit`` subprocess that then scores its exported policy on a held-out set at two lengths; then the
report, a rerun that skips both runs, and the command log of a design continued with other arguments. And the
task screen (base model per task and length).

Uses the transformers engine (``--engine hf``) and tiny sizes: about 2-3 minutes on 2 idle cores (7 minutes measured
while two other training jobs shared them). The vLLM path is what ``docs/ablation`` was produced with.
"""

from __future__ import annotations

import csv
import json
import shlex
import time

import pytest

from benchmarks._machine import machine_line
from experiments.ablation.__main__ import main
from experiments.ablation.screen import main as screen_main

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
    "--heldout-lengths", "448", "896",
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
        assert list(result["heldout"]) == ["448", "896"]  # the training length, then 2x
        for evaluation in result["heldout"].values():
            assert evaluation["records"] == 2 and len(evaluation["scores"]) == 2
            assert evaluation["accuracy"] == 100.0 * sum(evaluation["scores"]) / 2
        assert result["accuracy"] == result["heldout"]["448"]["accuracy"]
        assert len(result["reward_curve"]) == 1  # one optimizer step logged train/reward_mean
        assert f"--longact.mode {arm}" in result["train_command"]
        assert not (out / f"{arm}_seed0" / "hf").exists()  # weights dropped after evaluation
        assert result["machine"] == machine_line()
    with (out / "results.csv").open() as handle:
        rows = {(r["arm"], r["heldout_length"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {("high", "448"), ("none", "448"), ("high", "896"), ("none", "896")}
    assert rows["high", "896"]["seeds"] == "1"
    assert rows["high", "896"]["diff_vs_none"] != ""  # one shared seed: a difference, no interval
    report = (out / "results.md").read_text()
    assert "## Held-out at 896 tokens" in report and report.count("| high | 1 |") == 2
    assert f"- {machine_line()}: high: seeds 0; none: seeds 0" in report
    assert (out / "ablation.png").stat().st_size > 10_000

    # Rerunning the same command skips finished runs (their result.json is kept as is).
    stamp = (out / "high_seed0" / "result.json").stat().st_mtime_ns
    started = time.perf_counter()
    main([*ARGS, "--out", str(out)])
    assert time.perf_counter() - started < 30
    assert (out / "high_seed0" / "result.json").stat().st_mtime_ns == stamp
    # The same command is recorded once; a design continued with other arguments lists both, in order.
    command = "python -m experiments.ablation " + shlex.join([*ARGS, "--out", str(out)])
    assert (out / "command.txt").read_text() == command + "\n"
    main([*ARGS, "--arms", "high", "--out", str(out)])
    report = (out / "results.md").read_text()
    assert (out / "command.txt").read_text().splitlines() == [command, command.replace(" --out", " --arms high --out")]
    assert f"Commands, in the order they were run:\n\n    {command}\n    " in report


@pytest.mark.timeout(300)
def test_task_screen_scores_the_base_model_per_task_and_length(tmp_path):
    out = tmp_path / "screen.csv"
    rows = screen_main(["--tasks", "niah_single_1", "niah_multivalue_noise", "--lengths", "448", "--samples", "2",
                        "--max-tokens", "8", "--engine", "hf", "--dtype", "float32", "--out", str(out)])  # fmt: skip
    with out.open() as handle:
        written = list(csv.DictReader(handle))
    expected = [("niah_single_1", "448", "2"), ("niah_multivalue_noise", "448", "2")]
    assert [(r["task"], r["length"], r["records"]) for r in written] == expected
    assert [float(r["base_accuracy"]) for r in written] == [r["base_accuracy"] for r in rows]
    assert rows[0]["base_accuracy"] in (0.0, 50.0, 100.0)  # one needle: each of the 2 records scores 0 or 1
    assert 0.0 <= rows[1]["base_accuracy"] <= 100.0  # four values: partial credit
