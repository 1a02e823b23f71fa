"""The ablation's statistics: mean ± 95 % CI over seeds, the paired comparison vs ``none``, the detectable
difference (checked by simulation), and the summary table built from run results."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from experiments.ablation.report import differing_settings, heldout_accuracy, machines, summary_rows
from experiments.ablation.stats import detectable_difference, holm, mean_ci, paired_difference

# Two-sided 95 % critical values t_{0.975, dof} from standard tables.
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 9: 2.262157, 11: 2.200985, 30: 2.042272}


def test_mean_ci_by_hand():
    values = [50.0, 56.25, 62.5]  # mean 56.25, sd 6.25
    ci = mean_ci(values)
    assert ci.n == 3 and ci.mean == pytest.approx(56.25)
    assert ci.sd == pytest.approx(6.25)
    assert ci.half_width == pytest.approx(T975[2] * 6.25 / math.sqrt(3), abs=1e-4)  # 15.5256
    assert (ci.low, ci.high) == pytest.approx((56.25 - ci.half_width, 56.25 + ci.half_width))


def test_mean_ci_degenerate_cases():
    one = mean_ci([70.0])
    assert one.mean == 70.0 and math.isnan(one.half_width)
    same = mean_ci([40.0, 40.0, 40.0])
    assert same.half_width == 0.0
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_difference_uses_shared_seeds_only():
    treatment = {0: 60.0, 1: 65.0, 2: 70.0, 3: 99.0}
    control = {0: 55.0, 1: 62.0, 2: 64.0}  # seed 3 has no control: left out
    diff = paired_difference(treatment, control)
    assert diff.keys == (0, 1, 2)
    assert diff.differences == (5.0, 3.0, 6.0)
    mean, sd = 14.0 / 3, math.sqrt(((5 - 14 / 3) ** 2 + (3 - 14 / 3) ** 2 + (6 - 14 / 3) ** 2) / 2)
    assert diff.interval.mean == pytest.approx(mean)
    assert diff.interval.half_width == pytest.approx(T975[2] * sd / math.sqrt(3), abs=1e-4)
    t = mean / (sd / math.sqrt(3))
    assert diff.t == pytest.approx(t)
    # two-sided p from the dof-2 closed form
    assert diff.p_value == pytest.approx(2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t)))), abs=1e-9)


def test_paired_difference_is_more_sensitive_than_unpaired_when_seeds_shift_both_arms():
    # A seed effect common to both arms (+-10) hides a constant +2 gain in the unpaired intervals, not in the paired
    # one.
    control = {0: 40.0, 1: 50.0, 2: 60.0}
    treatment = {s: v + 2.0 for s, v in control.items()}
    assert mean_ci(list(treatment.values())).low < mean_ci(list(control.values())).high  # unpaired CIs overlap
    diff = paired_difference(treatment, control)
    assert diff.interval.mean == 2.0 and diff.interval.half_width == 0.0
    assert diff.p_value == 0.0 and diff.t == math.inf


def test_paired_difference_needs_a_shared_seed():
    with pytest.raises(ValueError):
        paired_difference({0: 1.0}, {1: 1.0})


@pytest.mark.parametrize("n", [3, 6, 12])
def test_detectable_difference_has_the_stated_power(n):
    """Simulated paired experiments with the returned true difference reject at alpha 0.05 in 80 % of the cases."""
    sd = 7.5
    delta = detectable_difference(sd, n)
    rng = np.random.default_rng(0)
    diffs = rng.normal(delta, sd, size=(40_000, n))
    t = diffs.mean(axis=1) / (diffs.std(axis=1, ddof=1) / math.sqrt(n))
    assert float((np.abs(t) > T975[n - 1]).mean()) == pytest.approx(0.8, abs=0.01)
    # Large samples: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n) from below.
    assert delta > (1.959964 + 0.841621) * sd / math.sqrt(n)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04): returned in the input order
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # NaN (an arm with one seed) is neither adjusted nor counted: m = 2; adjusted values are capped at 1
    adjusted = holm([0.2, math.nan, 0.6])
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([]) == []


def test_detectable_difference_with_two_pairs():
    # 2 seeds (1 dof), the spread of a partial ablation: the bracket passes tails where scipy's nct.cdf gave NaN
    delta = detectable_difference(4.419417382415921, 2)
    assert 35.4 < delta < 200.0 and math.isfinite(delta)


def test_detectable_difference_is_undefined_without_spread_or_pairs():
    assert math.isnan(detectable_difference(0.0, 6)) and math.isnan(detectable_difference(5.0, 1))


def _run(arm, seed, acc, curve, acc_2x=None):
    heldout = {"512": {"accuracy": acc}} | ({"1024": {"accuracy": acc_2x}} if acc_2x is not None else {})
    return {"arm": arm, "seed": seed, "accuracy": acc, "heldout": heldout, "reward_curve": curve,
            "train_seconds": 10.0, "eval_seconds": 5.0, "settings": {"target_length": 512}}  # fmt: skip


def test_summary_rows():
    runs = {
        "none": {s: _run("none", s, a, [0.5, 0.6, 0.7]) for s, a in zip((0, 1, 2), (50.0, 52.0, 54.0))},
        "high": {s: _run("high", s, a, [0.5, 0.6, 0.8]) for s, a in zip((0, 1, 2), (51.0, 55.0, 54.0))},
        "low": {s: _run("low", s, a, [0.5, 0.5, 0.5]) for s, a in zip((0, 1, 2), (49.0, 50.0, 53.0))},
    }
    rows = {r["arm"]: r for r in summary_rows(runs, 512)}
    assert list(rows) == ["high", "none", "low"]  # ARMS order
    assert rows["none"]["heldout_acc_mean"] == 52.0
    assert rows["none"]["heldout_acc_ci95"] == pytest.approx(round(T975[2] * 2.0 / math.sqrt(3), 2))
    assert rows["none"]["diff_vs_none"] == ""
    assert rows["high"]["diff_vs_none"] == pytest.approx(round((1 + 3 + 0) / 3, 2))
    assert rows["high"]["reward_last3_mean"] == pytest.approx(round((0.5 + 0.6 + 0.8) / 3, 3))
    assert rows["high"]["per_seed"] == "0:51.0 1:55.0 2:54.0"
    assert rows["high"]["detectable_diff_80"] == round(detectable_difference(statistics.stdev([1.0, 3.0, 0.0]), 3), 1)
    assert rows["none"]["detectable_diff_80"] == ""
    # the two comparisons against none are adjusted together
    raw = [paired_difference(a, {0: 50.0, 1: 52.0, 2: 54.0}).p_value for a in ({0: 51.0, 1: 55.0, 2: 54.0},
                                                                            {0: 49.0, 1: 50.0, 2: 53.0})]  # fmt: skip
    assert [rows["high"]["p_value"], rows["low"]["p_value"]] == [round(p, 3) for p in raw]
    assert [rows["high"]["p_holm"], rows["low"]["p_holm"]] == [round(p, 3) for p in holm(raw)]
    assert rows["none"]["p_holm"] == ""


def test_summary_rows_at_a_second_length_pair_only_the_seeds_scored_there():
    runs = {
        "none": {0: _run("none", 0, 50.0, [0.5], acc_2x=20.0), 1: _run("none", 1, 52.0, [0.5], acc_2x=30.0)},
        "high": {0: _run("high", 0, 60.0, [0.5], acc_2x=26.0), 1: _run("high", 1, 61.0, [0.5])},
    }
    rows = {r["arm"]: r for r in summary_rows(runs, 1024)}
    assert rows["none"]["heldout_acc_mean"] == 25.0 and rows["none"]["seeds"] == 2
    assert rows["high"]["seeds"] == 1 and rows["high"]["per_seed"] == "0:26.0"
    assert rows["high"]["diff_vs_none"] == 6.0 and rows["high"]["heldout_length"] == 1024
    assert {r["arm"]: r["heldout_acc_mean"] for r in summary_rows(runs, 512)} == {"high": 60.5, "none": 51.0}


def test_heldout_accuracy_of_a_result_scored_at_the_training_length_only():
    # results written before --heldout-lengths existed carry only "accuracy" at settings.target_length
    assert heldout_accuracy({"accuracy": 45.8, "settings": {"target_length": 512}}) == {512: 45.8}
    assert heldout_accuracy(_run("high", 0, 60.0, [], acc_2x=26.0)) == {512: 60.0, 1024: 26.0}


def test_machines_lists_which_runs_ran_where():
    xeon, epyc = "2 cores (Xeon, amx_bf16)", "2 cores (EPYC, no bf16 instructions)"
    runs = {
        "high": {0: {**_run("high", 0, 60.0, []), "machine": xeon}, 1: {**_run("high", 1, 61.0, []), "machine": xeon}},
        "low": {0: _run("low", 0, 50.0, []), 1: {**_run("low", 1, 52.0, []), "machine": epyc}},
    }
    assert machines(runs, {"arm": "base", "machine": xeon}) == {
        xeon: "high: seeds 0 1; base",
        "not recorded": "low: seeds 0",
        epyc: "low: seeds 1",
    }
    assert machines({}, None) == {}


def test_differing_settings_names_each_value_and_its_runs():
    def with_precision(arm, seed, precision):
        run = _run(arm, seed, 50.0, [])
        return {**run, "settings": {**run["settings"], "precision": precision}}

    runs = {
        "high": {0: with_precision("high", 0, "bf16-mixed"), 1: with_precision("high", 1, "32-true")},
        "low": {1: with_precision("low", 1, "32-true")},
    }
    base = {"arm": "base", "settings": {"target_length": 512, "precision": "bf16-mixed"}}
    # target_length is shared by all, so only precision is listed; values as JSON
    assert differing_settings(runs, base) == {
        "precision": {'"bf16-mixed"': "high: seeds 0; base", '"32-true"': "high: seeds 1; low: seeds 1"}
    }
    # a key that only some results carry differs too (null where it is missing)
    runs["low"][1]["settings"].pop("precision")
    assert differing_settings(runs, None)["precision"] == {
        '"bf16-mixed"': "high: seeds 0",
        '"32-true"': "high: seeds 1",
        "null": "low: seeds 1",
    }
    same = {"high": {0: with_precision("high", 0, "32-true")}, "none": {0: with_precision("none", 0, "32-true")}}
    assert differing_settings(same, None) == {}
