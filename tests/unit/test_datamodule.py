"""RolloutDataModule with a deterministic fake engine: dynamic sampling, prompt-length filter, on-policy weight sync,
overlong shaping and resumable stream position. The real engines are tested in their own files."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import torch

from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.data.records import PromptRecord
from longact_lightning.models import load_tokenizer
from longact_lightning.rollout import Rollout, RolloutBatch, SamplingConfig

VARIED = (1.0, 0.0)  # per-sample rewards of a group with signal
FLAT = (1.0, 1.0)  # a zero-variance group


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


class FakeEngine:
    """Sample ``j`` of every prompt is the text ``sample j`` (+ EOS), or ``length`` filler tokens if configured."""

    def __init__(self, tokenizer, lengths: dict[int, int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.lengths = lengths or {}
        self.generated: list[list[tuple[int, ...]]] = []
        self.loads: list[list[str]] = []

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, should_stop: Any = None
    ) -> list[list[Rollout]]:
        self.generated.append([tuple(p) for p in prompts])
        groups = []
        for prompt in prompts:
            group = []
            for j in range(sampling.n):
                if j in self.lengths:
                    ids = tuple(self.tokenizer.encode(" a", add_special_tokens=False)) * self.lengths[j]
                else:
                    ids = (*self.tokenizer.encode(f"sample {j}", add_special_tokens=False), self.tokenizer.eos_token_id)
                reason = "length" if len(ids) >= sampling.max_tokens else "stop"
                group.append(Rollout(tuple(prompt), ids, tuple([-0.5] * len(ids)), reason))
            groups.append(group)
        return groups

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.loads.append([name for name, _ in named_tensors])


def reward_from_metadata(completion: str, record: PromptRecord) -> float:
    """Sample ``j`` scores ``record.metadata['rewards'][j]``."""
    return record.metadata["rewards"][int(completion.split()[-1])] if "sample" in completion else 0.0


def records(*kinds: tuple[float, ...], prompt: str = "Where is the needle?") -> list[PromptRecord]:
    return [
        PromptRecord(prompt=f"{prompt} #{i}", answers=("x",), task="test", metadata={"rewards": kind, "index": i})
        for i, kind in enumerate(kinds)
    ]


def make(tokenizer, source, **kwargs) -> tuple[RolloutDataModule, FakeEngine]:
    options = {
        "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 16, "reward": reward_from_metadata, "engine": "hf"
    }  # fmt: skip
    dm = RolloutDataModule(source, **{**options, **kwargs})
    dm._tokenizer = tokenizer
    engine = FakeEngine(tokenizer)
    dm.engine = engine
    return dm, engine


def indices(batch: RolloutBatch, dm: RolloutDataModule, source: list[PromptRecord]) -> list[int]:
    """Which records a batch's groups came from (by their token ids)."""
    by_ids = {tuple(dm.prompt_ids(r)): r.metadata["index"] for r in source}
    found = []
    for group in batch.group_ids.unique().tolist():
        row = int((batch.group_ids == group).nonzero()[0])
        real = batch.attention_mask[row, : batch.prompt_length].bool()
        found.append(by_ids[tuple(batch.input_ids[row, : batch.prompt_length][real].tolist())])
    return found


def test_dynamic_sampling_drops_zero_variance_groups_and_refills(tokenizer, caplog):
    source = records(VARIED, FLAT, FLAT, VARIED, VARIED, VARIED)
    dm, engine = make(tokenizer, source, dynamic_sampling=True, max_generation_rounds=3)
    stream = iter(dm.train_dataloader())
    with caplog.at_level(logging.INFO, logger="longact_lightning.data.datamodule"):
        batch = next(stream)
    assert isinstance(batch, RolloutBatch)
    assert indices(batch, dm, source) == [0, 3]  # 1 and 2 dropped, refilled by 3
    assert [len(round_) for round_ in engine.generated] == [2, 1, 1]  # refills ask only for the missing groups
    assert dm.metrics["rollout/dropped_groups"] == 2
    assert dm.metrics["rollout/generation_rounds"] == 3
    assert dm.totals["dropped_groups"] == 2
    assert "dropped 2 zero-variance groups in 3 generation rounds" in caplog.text
    assert batch.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert batch.correct.tolist() == [True, False, True, False]

    assert indices(next(stream), dm, source) == [4, 5]
    assert dm.metrics["rollout/dropped_groups"] == 0


def test_without_dynamic_sampling_flat_groups_stay(tokenizer):
    source = records(FLAT, VARIED)
    dm, _ = make(tokenizer, source)
    batch = next(iter(dm.train_dataloader()))
    assert indices(batch, dm, source) == [0, 1]


def test_dynamic_sampling_gives_up_with_a_clear_error(tokenizer):
    dm, _ = make(tokenizer, records(*[FLAT] * 8), dynamic_sampling=True, max_generation_rounds=2)
    with pytest.raises(RuntimeError, match="dropped all 4 groups in max_generation_rounds=2"):
        next(iter(dm.train_dataloader()))


def test_over_long_prompts_are_dropped_and_counted(tokenizer, caplog):
    short = records(VARIED, VARIED, VARIED)
    long = records(VARIED, prompt="word " * 200)[0]
    source = [short[0], long, long, short[1], short[2]]
    dm, _ = make(tokenizer, source, max_prompt_tokens=100, prompts_per_step=3)
    with caplog.at_level(logging.WARNING, logger="longact_lightning.data.datamodule"):
        batch = next(iter(dm.train_dataloader()))
    assert indices(batch, dm, short) == [0, 1, 2]
    assert dm.totals["dropped_long_prompts"] == 2
    assert dm.metrics["rollout/dropped_long_prompts_total"] == 2
    assert "> 100 (max_prompt_tokens; 2 dropped so far)" in caplog.text


def test_prompts_beyond_the_engines_context_and_empty_ones_are_dropped(tokenizer, caplog):
    short = records(VARIED, VARIED, VARIED)
    long = records(VARIED, prompt="word " * 200)[0]  # ~210 tokens with the chat template
    empty = PromptRecord(prompt="  ", answers=("x",), task="test", metadata={"rewards": VARIED})
    dm, engine = make(tokenizer, [long, short[0], empty, short[1], short[2]], prompts_per_step=3)
    engine.max_model_len = 216  # 200 tokens of room beside max_new_tokens=16
    with caplog.at_level(logging.WARNING, logger="longact_lightning.data.datamodule"):
        batch = next(iter(dm.train_dataloader()))
    assert indices(batch, dm, short) == [0, 1, 2]
    assert dm.totals["dropped_long_prompts"] == dm.totals["dropped_empty_prompts"] == 1
    assert "Dropped record 0 of the source ('test'): its prompt has" in caplog.text
    assert "> 200 (the engine's 216-token context minus max_new_tokens; 1 dropped so far)" in caplog.text
    assert "Dropped record 2 of the source: its prompt is empty" in caplog.text


def test_no_room_for_a_prompt_beside_max_new_tokens_is_an_error(tokenizer):
    dm, engine = make(tokenizer, records(VARIED))
    engine.max_model_len = 16
    with pytest.raises(ValueError, match="max_new_tokens=16 leaves no room for a prompt in the engine's 16-token"):
        next(iter(dm.train_dataloader()))


def test_weights_sync_when_the_step_advances_and_not_otherwise(tokenizer):
    policy = torch.nn.Linear(2, 2)
    step = {"value": 0}
    dm, engine = make(tokenizer, records(*[VARIED] * 12), prompts_per_step=1, sync_every_n_steps=2)
    dm.connect(policy, lambda: step["value"])
    stream = iter(dm.train_dataloader())

    dm.sync_weights()
    assert engine.loads == [["weight", "bias"]]  # the first sync always pushes: the engine started from `model`
    next(stream)
    dm.sync_weights()
    assert len(engine.loads) == 1  # same step: nothing to push
    step["value"] = 1
    dm.sync_weights()
    assert len(engine.loads) == 1  # one step since the last push < sync_every_n_steps=2
    step["value"] = 2
    dm.sync_weights()
    assert len(engine.loads) == 2
    assert dm.totals["weight_syncs"] == 2


def test_generating_a_batch_never_pushes_weights(tokenizer):
    """Syncing is the module's call, before the step (outside FSDP's forward): the stream itself never gathers, so
    every generation round of a batch, refills included, serves the weights of the last sync."""
    dm, engine = make(tokenizer, records(FLAT, VARIED, VARIED), dynamic_sampling=True)
    dm.connect(torch.nn.Linear(1, 1), lambda: 0)
    next(iter(dm.train_dataloader()))
    assert len(engine.generated) == 2 and engine.loads == []


def test_sleep_level_2_needs_a_sync_before_every_generation(tokenizer):
    with pytest.raises(ValueError, match="sleep_level=2 .* sync_every_n_steps=2"):
        make(tokenizer, records(VARIED), engine_options={"sleep_level": 2}, sync_every_n_steps=2)


def test_a_group_of_one_is_refused_since_it_trains_nothing(tokenizer):
    with pytest.raises(ValueError, match="group_size=1: .* use group_size >= 2"):
        make(tokenizer, records(VARIED), group_size=1)


def test_overlong_soft_punishment_and_truncation_mask(tokenizer):
    # max_new_tokens=16, buffer 8: free up to 8 tokens, then linear to -penalty at 16
    dm, engine = make(tokenizer, records(VARIED), overlong_buffer_tokens=8, overlong_penalty=0.5, mask_truncated=True)
    engine.lengths = {0: 12, 1: 16}
    batch = next(iter(dm.train_dataloader()))
    assert batch.rewards.tolist() == pytest.approx([0.0 - 0.5 * 4 / 8, 0.0 - 0.5])
    assert batch.truncated.tolist() == [False, True]
    assert batch.completion_mask[1].sum() == 0 and batch.completion_mask[0].sum() == 12


def test_resume_skips_consumed_prompts(tokenizer):
    source = records(*[VARIED] * 7)
    dm, _ = make(tokenizer, source)
    stream = iter(dm.train_dataloader())
    next(stream)
    next(stream)
    state = dm.state_dict()
    assert state["prompts_consumed"] == 4 and state["epoch"] == 0

    resumed, _ = make(tokenizer, source)
    resumed.load_state_dict(state)
    batches = list(resumed.train_dataloader())
    assert [indices(b, resumed, source) for b in batches] == [[4, 5], [6]]  # the pass ends with a partial batch
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["prompts_consumed"] == 0


def test_a_checkpoint_taken_before_the_batch_is_trained_resumes_before_its_prompts(tokenizer):
    """SIGTERM or Ctrl-C between handing a batch out and its optimizer step: the saved position is the one before
    the batch, so the resumed run trains those prompts (not: skips them untrained)."""
    source = records(*[VARIED] * 7)
    dm, _ = make(tokenizer, source)
    step = [0]
    dm.connect(torch.nn.Linear(1, 1), lambda: step[0])
    stream = iter(dm.train_dataloader())
    next(stream)
    assert dm.state_dict()["prompts_consumed"] == 0  # handed out, not trained
    step[0] = 1
    assert dm.state_dict()["prompts_consumed"] == 2  # its optimizer step happened
    next(stream)
    assert dm.state_dict()["prompts_consumed"] == 2
    state = dm.state_dict()

    resumed, _ = make(tokenizer, source)
    resumed.connect(torch.nn.Linear(1, 1), lambda: 1)
    resumed.load_state_dict(state)
    stream = iter(resumed.train_dataloader())
    assert indices(next(stream), resumed, source) == [2, 3]
    assert resumed.state_dict()["prompts_consumed"] == 2  # interrupted again right after a resume: still before it


def test_an_interrupted_generation_stops_the_step(tokenizer):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from longact_lightning.rollout.base import GenerationInterrupted

    dm, engine = make(tokenizer, records(VARIED, VARIED))

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise GenerationInterrupted("stopped")

    engine.generate = interrupted
    with pytest.raises(SIGTERMException) as caught:
        next(iter(dm.train_dataloader()))
    assert caught.value.code == 143
    assert dm.state_dict()["prompts_consumed"] == 0


def test_resuming_on_another_source_reads_it_from_the_start_and_says_so(tokenizer, caplog):
    first, other = records(*[VARIED] * 6), records(*[VARIED] * 6, prompt="Where is the other needle?")
    dm, _ = make(tokenizer, first)
    dm.setup("fit")
    stream = iter(dm.train_dataloader())
    next(stream)
    state = dm.state_dict()
    assert state["prompts_consumed"] == 2 and state["source"].startswith("list(test, first record ")

    same, _ = make(tokenizer, first)
    same.setup("fit")
    same.load_state_dict(state)
    assert indices(next(iter(same.train_dataloader())), same, first) == [2, 3]

    changed, _ = make(tokenizer, other)
    changed.setup("fit")
    changed.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(changed.train_dataloader()))
    assert indices(batch, changed, other) == [0, 1]
    assert f"data.source is not the checkpoint's ({state['source']} -> list(test, first record " in caplog.text


def test_held_out_records_are_shared_out_by_rank_scored_and_fitted_to_the_context(tokenizer, caplog):
    source = records(*[VARIED] * 7)
    source[5] = PromptRecord("word " * 400, ("x",), "test", metadata={"index": 5})  # too long for the context below
    by_index = lambda text, record: float(record.metadata["index"])  # noqa: E731
    dm, engine = make(tokenizer, source, val_source=source, held_out_max_tokens=4, held_out_metric=by_index)
    dm.held_out_batch_size = 2
    engine.max_model_len = 64
    dm._rank, dm._world = 1, 2
    with caplog.at_level(logging.WARNING):
        batches = list(dm.val_dataloader())
    assert [[r.score for r in batch] for batch in batches] == [[1.0, 3.0]]  # rank 1 of 2: records 1, 3, (5)
    assert "Held-out record 5 ('test') skipped" in caplog.text
    assert batches[0][0].metric == "<lambda>" and batches[0][0].prediction == "sample 0"


def test_held_out_sources_are_optional_for_validation_and_required_for_test(tokenizer):
    dm, _ = make(tokenizer, records(VARIED))
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="data.test_source, which is not set"):
        dm.test_dataloader()


def test_empty_source_fails_in_setup(tokenizer):
    dm, _ = make(tokenizer, [])
    with pytest.raises(ValueError, match="yielded no record"):
        dm.setup("fit")
