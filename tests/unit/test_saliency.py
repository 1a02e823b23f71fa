"""Saliency statistics: padding excluded, each real token counted once, refresh and resume behave."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import DynamicCache

from longact_lightning.callbacks import ActivationSaliency, GradientRowMask, LongAct
from longact_lightning.rl.logprobs import grouped_completion_logprobs
from longact_lightning.saliency import ChannelStats, find_qk_projections
from tests.helpers.models import LMModule, random_lm_batches, tiny_model
from tests.helpers.trainer import cpu_trainer


def _trainer(steps, callbacks, **kwargs):
    return cpu_trainer(steps, callbacks, **kwargs)


def test_channel_stats_exclude_padding_bit_exactly():
    torch.manual_seed(0)
    seq = torch.randn(1, 5, 6)
    stats = {}
    for layout in ("none", "left", "right"):
        s = ChannelStats(6)
        if layout == "none":
            s.update(seq, torch.ones(1, 5))
        else:
            pad = torch.full((1, 3, 6), 1e6)  # huge values: any leak would dominate
            x = torch.cat([pad, seq], 1) if layout == "left" else torch.cat([seq, pad], 1)
            m = (
                torch.cat([torch.zeros(1, 3), torch.ones(1, 5)], 1)
                if layout == "left"
                else torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], 1)
            )
            s.update(x, m)
        stats[layout] = s
    for statistic in ("mean_abs", "rms", "max_abs"):
        ref = stats["none"].value(statistic)
        assert torch.equal(stats["left"].value(statistic), ref) and torch.equal(stats["right"].value(statistic), ref)
    torch.testing.assert_close(stats["none"].value("mean_abs"), seq.abs().mean((0, 1)))
    torch.testing.assert_close(stats["none"].value("rms"), seq.square().mean((0, 1)).sqrt())


def _calibration_stats(model, batch):
    saliency = ActivationSaliency(calibration_data=[batch], collect_steps=0)
    module = LMModule(model)
    _trainer(0, [saliency]).fit(module, DataLoader(random_lm_batches(1), batch_size=None))
    return {k: s.value() for k, s in saliency.stats.items()}, {k: float(s.count) for k, s in saliency.stats.items()}


def test_model_statistics_identical_for_unpadded_left_and_right_padded():
    model = tiny_model("llama_gqa")
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(1, 4, dtype=torch.long)
    ones, zeros = torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    batches = {
        "none": {"input_ids": ids, "attention_mask": ones},
        "left": {"input_ids": torch.cat([pad, ids], 1), "attention_mask": torch.cat([zeros, ones], 1)},
        "right": {"input_ids": torch.cat([ids, pad], 1), "attention_mask": torch.cat([ones, zeros], 1)},
    }
    results = {name: _calibration_stats(copy.deepcopy(model), b) for name, b in batches.items()}
    ref_values, ref_counts = results["none"]
    for name in ("left", "right"):
        values, counts = results[name]
        assert counts == ref_counts and set(counts.values()) == {9.0}  # each real token once, padding never
        for key, value in values.items():
            if ".layers.0." in key:  # layer 0 sees embeddings: bit-identical
                assert torch.equal(value, ref_values[key]), (name, key)
            else:  # deeper layers: the same math, float reassociation only
                torch.testing.assert_close(value, ref_values[key], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_does_not_count_tokens_twice():
    model = tiny_model("llama_gqa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    saliency = ActivationSaliency(collect_steps=1, row_mask=None)
    _trainer(1, [saliency]).fit(LMModule(model), DataLoader(random_lm_batches(1), batch_size=None))
    expected = float(random_lm_batches(1)[0]["attention_mask"].sum())
    assert {float(s.count) for s in saliency.stats.values()} == {expected}


class _CachedScoringModule(LMModule):
    """Scores completions behind a cached prompt: packed (as the RL module does) or with a plain 2D-mask cache."""

    def __init__(self, model, packed):
        super().__init__(model)
        self.packed = packed

    def training_step(self, batch, batch_idx):
        ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_length"]
        if self.packed:
            logprobs, _ = grouped_completion_logprobs(self.model, ids, mask, completion, batch["group_ids"])
            return -(logprobs * mask[:, -completion:]).sum()
        prompt = ids.shape[1] - completion
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, use_cache=True)
        return self.model(input_ids=ids[:, prompt:], attention_mask=mask, past_key_values=cache).logits.sum()


@pytest.mark.parametrize("packed", [True, False])
def test_cached_forwards_count_only_real_tokens(packed):
    g = torch.Generator().manual_seed(0)
    P, C = 6, 5
    ids = torch.randint(3, 90, (4, P + C), generator=g)
    ids[1, :P] = ids[0, :P]
    ids[3, :P] = ids[2, :P]
    mask = torch.ones_like(ids)
    mask[2:, :2] = 0  # second group's prompt is left-padded
    mask[0, P + 2 :], mask[3, P + 4 :] = 0, 0  # right-padded completions: their columns must not be counted
    batch = {"input_ids": ids, "attention_mask": mask, "completion_length": C, "group_ids": torch.tensor([0, 0, 1, 1])}
    saliency = ActivationSaliency(collect_steps=1, row_mask=None)
    model = _CachedScoringModule(tiny_model("llama_gqa"), packed)
    _trainer(1, [saliency]).fit(model, DataLoader([batch], batch_size=None))
    if packed:  # each group's prompt once minus its last token, which leads each completion's real tokens
        expected = float(mask[[0, 2], :P].sum() - 2 + mask[:, P:].sum())
    else:  # every row's prompt and completion; with a cache, the mask's last columns belong to the new tokens
        expected = float(mask.sum())
    assert {float(s.count) for s in saliency.stats.values()} == {expected}


class _RecordQK(Callback):
    """Q/K weights before and after every optimizer step, and the masks in force for that step."""

    def __init__(self, longact):
        self.longact, self.steps = longact, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs after LongAct's (list order)
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if "_proj" in k}
        self.steps.append({"before": weights, "masks": self.longact.row_mask.masks})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["after"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if "_proj" in k}


def test_rows_leaving_the_selection_on_refresh_stop_moving_at_once():
    torch.manual_seed(0)
    longact = LongAct(top_ratio=0.3, mode="random", refresh_every_n_steps=4, seed=1)
    recorder = _RecordQK(longact)
    _trainer(13, [longact, recorder]).fit(
        LMModule(tiny_model("llama_gqa")), DataLoader(random_lm_batches(13), batch_size=None)
    )
    assert longact.selections == 4  # steps 0, 4, 8, 12
    left_selection = 0
    for i, step in enumerate(recorder.steps):
        for name, mask in step["masks"].items():
            frozen = ~mask
            assert torch.equal(step["after"][name][frozen], step["before"][name][frozen]), (
                f"step {i}: frozen row of {name} moved"
            )
            if i > 0 and name in recorder.steps[i - 1]["masks"]:
                left_selection += int((recorder.steps[i - 1]["masks"][name] & frozen).sum())
    assert left_selection > 0, "the refresh never froze a previously trainable row: the test proves nothing"


def test_a_refresh_measures_its_own_window_and_blends_scores_by_ema():
    longact = LongAct(top_ratio=0.3, refresh_every_n_steps=2, ema=0.25)
    seen = []
    select = longact._select

    def recording_select():
        fresh = {k: (stats.count.item(), stats.value(longact.statistic).clone()) for k, stats in longact.stats.items()}
        select()
        seen.append((fresh, {k: v.clone() for k, v in longact.scores.items()}))

    longact._select = recording_select
    _trainer(4, [longact]).fit(LMModule(tiny_model("llama_gqa")), DataLoader(random_lm_batches(4), batch_size=None))
    (first_fresh, first_scores), (second_fresh, second_scores) = seen  # selections at steps 0 and 2
    real_tokens = 3 * 24 + 12  # one batch of random_lm_batches: 4 rows of 24, one half padding
    for key, (count, fresh) in second_fresh.items():
        assert count == first_fresh[key][0] == real_tokens  # step 2's tokens only: the window was reset
        torch.testing.assert_close(second_scores[key], 0.25 * first_scores[key] + 0.75 * fresh)


def test_refresh_clears_optimizer_moments_of_newly_frozen_rows():
    longact = LongAct(top_ratio=0.3, mode="random", refresh_every_n_steps=3, seed=2)
    module = LMModule(tiny_model("llama_gqa"))
    trainer = _trainer(4, [longact])
    trainer.fit(module, DataLoader(random_lm_batches(4), batch_size=None))
    optimizer = trainer.optimizers[0]
    params = dict(module.named_parameters())
    for name, mask in longact.row_mask.masks.items():
        state = optimizer.state[params[name]]
        assert torch.equal(state["exp_avg"][~mask], torch.zeros_like(state["exp_avg"][~mask]))


def test_resume_restores_masks_and_statistics_and_keeps_rows_frozen(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("qwen3")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    first = LongAct(top_ratio=0.3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    batches = random_lm_batches(12)
    _trainer(5, [first, ckpt], enable_checkpointing=True).fit(LMModule(model), DataLoader(batches[:5], batch_size=None))

    resumed = LongAct(top_ratio=0.3)
    restored = {}

    class Capture(Callback):
        def on_fit_start(self, trainer, pl_module):
            restored["masks"] = resumed.row_mask.masks
            restored["stats"] = {k: s.state_dict() for k, s in resumed.stats.items()}

    module = LMModule(tiny_model("qwen3", seed=5))  # different init: everything must come from the checkpoint
    trainer = _trainer(10, [resumed, Capture()])
    trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=str(tmp_path / "last.ckpt"))

    assert restored["masks"].keys() == first.row_mask.masks.keys()
    for name, mask in first.row_mask.masks.items():
        assert torch.equal(restored["masks"][name], mask)
    for key, stats in first.stats.items():
        for field, value in stats.state_dict().items():
            assert torch.equal(restored["stats"][key][field], value)
    assert resumed.selections == first.selections == 1  # no re-selection after resuming
    for proj in find_qk_projections(module.model):
        name = f"model.{proj.weight_name}"
        frozen = proj.rows[~resumed.channel_masks[f"{name}:{proj.kind}"]]
        assert torch.equal(module.state_dict()[name][frozen], initial[proj.weight_name][frozen]), name


def test_resuming_with_another_ratio_or_mode_selects_again_and_says_so(tmp_path):
    batches = random_lm_batches(4)
    first = LongAct(top_ratio=0.3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(2, [first, ckpt], enable_checkpointing=True).fit(
        LMModule(tiny_model("qwen3")), DataLoader(batches[:2], batch_size=None)
    )
    for ratio, mode, kept in [(0.5, "high", 0.5), (0.3, "none", 1.0)]:
        resumed = LongAct(top_ratio=ratio, mode=mode)
        with pytest.warns(UserWarning, match="selection settings than the checkpoint's"):
            _trainer(3, [resumed]).fit(
                LMModule(tiny_model("qwen3")), DataLoader(batches, batch_size=None), ckpt_path=tmp_path / "last.ckpt"
            )
        for key, mask in resumed.channel_masks.items():
            assert mask.float().mean().item() == pytest.approx(kept, abs=0.05), key  # the new setting, not the old
            torch.testing.assert_close(resumed.scores[key], first.scores[key])  # from the checkpoint's statistics


def test_standalone_row_mask_resumes_its_masks_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = LMModule(tiny_model("llama_gqa"), weight_decay=0.0)
    name = next(n for n, _ in module.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))
    trainable = torch.arange(64) < 16
    batches = random_lm_batches(4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(2, [GradientRowMask({name: trainable}), ckpt], enable_checkpointing=True).fit(
        module, DataLoader(batches[:2], batch_size=None)
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"][name]

    resumed = LMModule(tiny_model("llama_gqa", seed=5), weight_decay=0.0)
    _trainer(4, [GradientRowMask()]).fit(
        resumed, DataLoader(batches, batch_size=None), ckpt_path=tmp_path / "last.ckpt"
    )
    after = dict(resumed.named_parameters())[name].detach()
    assert torch.equal(after[~trainable], saved[~trainable])  # the mask came back with the checkpoint
    assert not torch.equal(after[trainable], saved[trainable])


def test_standalone_callbacks_must_be_ordered():
    mask = GradientRowMask()
    saliency = ActivationSaliency(row_mask=mask)
    with pytest.raises(ValueError, match="must come before its GradientRowMask"):
        _trainer(1, [mask, saliency]).fit(
            LMModule(tiny_model("llama_gqa")), DataLoader(random_lm_batches(1), batch_size=None)
        )


def test_mask_for_unknown_parameter_is_a_clear_error():
    mask = GradientRowMask({"model.nope.weight": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(KeyError, match="model.nope.weight"):
        _trainer(1, [mask]).fit(LMModule(tiny_model("llama_gqa")), DataLoader(random_lm_batches(1), batch_size=None))
