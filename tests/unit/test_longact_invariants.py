"""The frozen-row invariant on every supported layout: unselected Q/K rows never move, all else trains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from longact_lightning.callbacks import LongAct
from longact_lightning.saliency import find_qk_projections
from tests.helpers.models import TINY_CONFIGS, LMModule, random_lm_batches, tiny_model
from tests.helpers.trainer import cpu_trainer


def _fit(module, callbacks, steps=20, **trainer_kwargs):
    trainer = cpu_trainer(steps, callbacks, **trainer_kwargs)
    trainer.fit(module, DataLoader(random_lm_batches(steps), batch_size=None))
    return trainer


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_unselected_rows_bit_identical_selected_rows_and_others_move(arch):
    # no weight decay: a row that moves was moved by its gradient (decay alone would move every trainable row)
    module = LMModule(tiny_model(arch), weight_decay=0.0)
    initial = copy.deepcopy(module.state_dict())
    longact = LongAct(top_ratio=0.3)
    _fit(module, [longact])

    masks = longact.row_mask.masks
    projections = find_qk_projections(module.model)
    assert masks, "LongAct selected nothing to freeze"
    qk_rows: dict[str, torch.Tensor] = {}
    for proj in projections:
        name = f"model.{proj.weight_name}"
        channel_mask = longact.channel_masks[f"{name}:{proj.kind}"]
        assert int(channel_mask.sum()) == round(0.3 * proj.channels) or int(channel_mask.sum()) == int(
            0.3 * proj.channels + 0.5
        )
        rows = qk_rows.setdefault(name, torch.zeros(module.state_dict()[name].shape[0], dtype=torch.bool))
        rows[proj.rows] = True
        after, before = module.state_dict()[name], initial[name]
        frozen = proj.rows[~channel_mask]
        selected = proj.rows[channel_mask]
        assert torch.equal(after[frozen], before[frozen]), f"{name}: a frozen {proj.kind} row moved"
        assert (after[selected] != before[selected]).any(dim=1).all(), (
            f"{name}: a selected {proj.kind} row did not move"
        )
        if proj.bias_name:
            bias = f"model.{proj.bias_name}"
            assert torch.equal(module.state_dict()[bias][frozen], initial[bias][frozen])

    for name, value in module.state_dict().items():
        if name in qk_rows:
            others = ~qk_rows[name]  # e.g. the value rows of a fused qkv matrix
            if others.any():
                assert (value[others] != initial[name][others]).any(dim=-1).all(), f"{name}: a non-Q/K row did not move"
        elif name.endswith(".bias") and name.removesuffix(".bias") + ".weight" in qk_rows:
            continue
        elif value.dtype.is_floating_point and not name.endswith("inv_freq"):
            assert not torch.equal(value, initial[name]), f"{name} did not train"


def test_selected_count_is_round_half_up_of_ratio():
    module = LMModule(tiny_model("llama_gqa"))
    longact = LongAct(top_ratio=0.3)
    _fit(module, [longact], steps=1)
    for key, mask in longact.channel_masks.items():
        channels = mask.numel()  # q: 64 -> 19 (19.2), k: 32 -> 10 (9.6)
        assert int(mask.sum()) == {64: 19, 32: 10}[channels], key
