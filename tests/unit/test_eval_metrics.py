"""Hand-computed cases for the profile's sparsity/stability metrics and the eval's official score summaries."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from longact_lightning.data.records import PromptRecord
from longact_lightning.data.scoring import RecordResult, evaluate_records, generation_budget
from longact_lightning.eval.collect import left_pad, merge_stats
from longact_lightning.eval.evaluate import score_rows, summarize
from longact_lightning.eval.metrics import (
    chance_jaccard,
    gini,
    mask_jaccards,
    max_over_median,
    sparsity_metrics,
    top_share,
)
from longact_lightning.eval.profile import POOLED, comparisons, stability_rows, summarize_stability
from longact_lightning.eval.prompts import truncate_middle_ids
from longact_lightning.rollout.base import Rollout
from longact_lightning.saliency.stats import ChannelStats

# --- sparsity metrics ---------------------------------------------------------------------------------------------


def test_max_over_median_odd_and_even_counts():
    assert max_over_median(torch.tensor([1.0, 2.0, 10.0])) == 5.0  # median 2
    assert max_over_median(torch.tensor([1.0, 2.0, 4.0, 12.0])) == 4.0  # median (2 + 4) / 2 = 3


def test_max_over_median_degenerate():
    assert math.isinf(max_over_median(torch.tensor([0.0, 0.0, 0.0, 5.0])))
    assert math.isnan(max_over_median(torch.zeros(4)))


def test_top_share_uses_the_selection_count():
    # 10 channels, 30 % -> the top 3: (10 + 5 + 4) / (10 + 5 + 4 + 7 * 1) = 19 / 26
    scores = torch.tensor([1.0, 10.0, 1.0, 5.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0])
    assert top_share(scores, 0.3) == pytest.approx(19 / 26)
    assert top_share(torch.ones(10), 0.3) == pytest.approx(0.3)  # flat: exactly the ratio


def test_gini_hand_cases():
    assert gini(torch.ones(8)) == pytest.approx(0.0)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(3 / 4)  # one channel holds all: (n-1)/n
    # [1, 2, 3, 4]: sum (2i - 5) x_i = -3 - 2 + 3 + 12 = 10; / (4 * 10) = 0.25
    assert gini(torch.tensor([4.0, 1.0, 3.0, 2.0])) == pytest.approx(0.25)


def test_sparsity_metrics_row_and_validation():
    row = sparsity_metrics(torch.tensor([1.0, 2.0, 10.0]), 0.3)
    expected = {"max": 10.0, "median": 2.0, "max_over_median": 5.0, "top_share": 10 / 13, "gini": 18 / 39}
    assert row == pytest.approx(expected)
    with pytest.raises(ValueError, match="non-negative"):
        gini(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="1-D"):
        top_share(torch.ones(2, 2))


def test_chance_jaccard_exact_and_simulated():
    # n=4, k=2: overlap 0 (p=1/6, J=0), 1 (p=4/6, J=1/3), 2 (p=1/6, J=1) -> 4/18 + 1/6 = 7/18
    assert chance_jaccard(4, 2) == pytest.approx(7 / 18)
    assert chance_jaccard(5, 5) == 1.0
    g = torch.Generator().manual_seed(0)
    sims = []
    for _ in range(4000):
        a, b = torch.zeros(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)
        a[torch.randperm(40, generator=g)[:12]] = True
        b[torch.randperm(40, generator=g)[:12]] = True
        sims.append(int((a & b).sum()) / int((a | b).sum()))
    assert chance_jaccard(40, 12) == pytest.approx(sum(sims) / len(sims), abs=0.01)


# --- stability tables ---------------------------------------------------------------------------------------------


def _proj(layer: int, kind: str) -> SimpleNamespace:
    """The projection fields the stability table reads (a QKProjection stand-in with 4 channels)."""
    key = f"model.layers.{layer}.self_attn.{kind}_proj.weight:{kind}"
    return SimpleNamespace(layer=layer, kind=kind, key=key, channels=4)


def _mask(*on: int) -> torch.Tensor:
    mask = torch.zeros(4, dtype=torch.bool)
    mask[list(on)] = True
    return mask


def test_mask_jaccards_per_projection():
    a = {"x": _mask(0, 1), "y": _mask(2)}
    b = {"x": _mask(1, 2), "y": _mask(2)}
    assert mask_jaccards(a, b) == {"x": 1 / 3, "y": 1.0}
    with pytest.raises(ValueError, match="different projections"):
        mask_jaccards(a, {"x": _mask(0)})


def test_comparisons_cover_tasks_lengths_and_checkpoints():
    conditions = [(c, t, x) for c in ("policy", "compare") for t in ("t1", "t2", POOLED) for x in ("long", "short")]
    pairs = comparisons(conditions, ["t1", "t2"])
    kinds = [kind for kind, _, _ in pairs]
    assert kinds.count("task") == 4  # 2 checkpoints x 2 contexts x 1 task pair
    assert kinds.count("length") == 6  # 2 checkpoints x 3 tasks (pooled included)
    assert kinds.count("checkpoint") == 6  # 3 tasks x 2 contexts
    assert ("task", ("policy", "t1", "long"), ("policy", "t2", "long")) in pairs
    assert ("length", ("compare", POOLED, "long"), ("compare", POOLED, "short")) in pairs


def test_four_lengths_are_compared_pairwise():
    contexts = ("8128", "4096", "2048", "1024")
    conditions = [("policy", t, x) for t in ("t1", POOLED) for x in contexts]
    pairs = comparisons(conditions, ["t1"])
    assert [kind for kind, _, _ in pairs] == ["length"] * 12  # 2 tasks (pooled included) x 6 pairs of lengths
    assert ("length", ("policy", POOLED, "8128"), ("policy", POOLED, "1024")) in pairs


def test_stability_table_by_hand():
    projs = [_proj(0, "q"), _proj(0, "k"), _proj(1, "q"), _proj(1, "k")]
    base = {p.key: _mask(0, 1) for p in projs}
    masks = {
        ("policy", "t1", "long"): base,
        ("policy", "t1", "short"): {**base, projs[0].key: _mask(1, 2), projs[2].key: _mask(2, 3)},
        ("policy", "t2", "long"): base,
        ("policy", "t2", "short"): base,
        ("policy", POOLED, "long"): base,
        ("policy", POOLED, "short"): base,
    }
    rows = stability_rows(masks, projs, ["t1", "t2"])
    t1_len = {
        (r["layer"], r["kind"]): r["jaccard"]
        for r in rows
        if r["comparison"] == "length" and r["a"] == "policy/t1/long"
    }
    assert t1_len == {(0, "q"): 1 / 3, (0, "k"): 1.0, (1, "q"): 0.0, (1, "k"): 1.0}
    summary = summarize_stability(rows, projs, top_ratio=0.5)
    q_row = next(r for r in summary if r["comparison"] == "length" and r["a"] == "policy/t1/long" and r["kind"] == "q")
    assert q_row["jaccard_mean"] == pytest.approx(1 / 6) and q_row["jaccard_min"] == 0.0
    assert q_row["chance"] == pytest.approx(7 / 18)  # 2 of 4 channels


# --- collection helpers ----------------------------------------------------------------------------------------------


def test_left_pad_and_merge_stats():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    a, b, both = ChannelStats(2), ChannelStats(2), ChannelStats(2)
    x, y = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.5], [-1.0, 1.0]])
    a.update(x), b.update(y), both.update(torch.cat([x, y]))
    merged = merge_stats([a, b])
    for statistic in ("mean_abs", "rms", "max_abs"):
        assert torch.equal(merged.value(statistic), both.value(statistic))


def test_truncate_middle_ids_keeps_head_and_tail():
    assert truncate_middle_ids(list(range(10)), 5) == [0, 1, 7, 8, 9]  # floor(5/2) head, ceil(5/2) tail
    assert truncate_middle_ids([1, 2], 5) == [1, 2]


# --- eval summaries ---------------------------------------------------------------------------------------------------


def _ruler(task: str, score: float, length: int = 1024, prediction: str = "x") -> RecordResult:
    return RecordResult(task, "string_match_all", score, prediction, ("a",), 10, 3, False,
                        {"target_length": length, "official": True})  # fmt: skip


def _longbench(judge: bool, difficulty: str, length: str, pred: str | None = "A") -> RecordResult:
    return RecordResult("longbench_v2", "longbench_v2_match", float(judge), "", ("A",), 10, 3, False,
                        {"difficulty": difficulty, "length": length, "pred": pred})  # fmt: skip


def test_summarize_ruler_per_task_length_and_mean():
    results = [
        _ruler("niah_single_1", 1.0), _ruler("niah_single_1", 0.0, prediction="  "), _ruler("niah_single_1", 1.0),
        _ruler("niah_single_1", 1.0),
        _ruler("vt", 0.4), _ruler("vt", 0.6),
        _ruler("vt", 1.0, length=2048),
    ]  # fmt: skip
    summary = summarize(results)
    by_key = {(r["task"], r["target_length"]): r for r in summary["ruler"]}
    assert by_key[("niah_single_1", 1024)]["score"] == 75.0  # 3/4 x 100
    assert by_key[("niah_single_1", 1024)]["nulls"] == 1  # the whitespace-only prediction
    assert by_key[("vt", 1024)]["score"] == 50.0
    assert by_key[("vt", 2048)]["score"] == 100.0
    assert summary["ruler_mean"] == [
        {"target_length": 1024, "score": 62.5, "tasks": 2},  # (75 + 50) / 2
        {"target_length": 2048, "score": 100.0, "tasks": 1},
    ]
    assert summary["longbench_v2"] is None


def test_summarize_longbench_breakdown():
    results = [
        _longbench(True, "easy", "short"),
        _longbench(False, "hard", "short"),
        _longbench(True, "hard", "medium"),
        _longbench(False, "hard", "long", pred=None),
    ]
    lb = summarize(results)["longbench_v2"]
    expected = {"overall": 50.0, "easy": 100.0, "hard": 33.3, "short": 50.0, "medium": 100.0, "long": 0.0}
    assert lb == {**expected, "samples": 4}
    rows = score_rows(summarize(results))
    assert [(r["task"], r["score"]) for r in rows] == [
        ("overall", 50.0), ("easy", 100.0), ("hard", 33.3), ("short", 50.0), ("medium", 100.0), ("long", 0.0)
    ]  # fmt: skip


class _ScriptedEngine:
    """Returns fixed completions per prompt (by call order) and records the sampling configs it was asked for."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, list(texts), []

    def generate(self, prompts, sampling, should_stop=None):
        self.calls.append(sampling)
        out = []
        for prompt in prompts:
            ids = tuple(self.tokenizer.encode(self.texts.pop(0)))
            out.append([Rollout(tuple(prompt), ids, None, "stop")])
        return out


class _CharTokenizer:
    """One token per character; no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_evaluate_records_scores_with_official_metrics_and_budgets():
    records = [
        PromptRecord("p1", ("1234",), "niah_single_1", " The number is", {"target_length": 1024}),
        PromptRecord("p2", ("AAA", "BBB"), "vt", " they are: ", {"target_length": 1024}),
        PromptRecord("p3", ("B",), "longbench_v2", "", {"difficulty": "easy", "length": "short"}),
    ]
    tokenizer = _CharTokenizer()
    engine = _ScriptedEngine(tokenizer, [" 1234.", "The correct answer is (B)", "AAA and ccc"])
    results = evaluate_records(engine, tokenizer, records)
    # niah (128 tokens) and vt (30) and LongBench (128) budgets: two generate calls, greedy
    assert sorted(c.max_tokens for c in engine.calls) == [30, 128]
    assert all(c.temperature == 0.0 and c.n == 1 for c in engine.calls)
    assert [r.score for r in results] == [1.0, 0.5, 1.0]
    assert results[0].prompt_tokens == len("p1 The number is")
    assert results[2].metadata["pred"] == "B"
    assert [r.metric for r in results] == ["string_match_all", "string_match_all", "longbench_v2_match"]


def test_generation_budget_needs_max_tokens_for_user_tasks():
    assert generation_budget(PromptRecord("p", ("a",), "fwe")) == 50
    assert generation_budget(PromptRecord("p", ("a",), "fwe"), max_tokens=16) == 16
    with pytest.raises(ValueError, match="max_tokens"):
        generation_budget(PromptRecord("p", ("a",), "jsonl"))
