"""The real embedded model: it loads through the resolver and its Q/K channels show the outliers LongAct relies on."""

from __future__ import annotations

import pytest
import torch

from longact_lightning.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer
from longact_lightning.saliency import ChannelStats, find_qk_projections

pytestmark = pytest.mark.integration

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture(scope="module")
def embedded():
    return load_causal_lm(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL)


def test_embedded_model_qk_channels_have_outliers(embedded):
    model, tokenizer = embedded
    text = NOISE * 40 + "One of the special magic numbers for long-context is: 4817263. " + NOISE * 20
    batch = tokenizer([text], return_tensors="pt")
    assert batch["input_ids"].shape[1] > 1000
    projections = find_qk_projections(model)
    assert len(projections) == 2 * model.config.num_hidden_layers
    modules = dict(model.named_modules())
    stats = {p.key: ChannelStats(p.channels) for p in projections}
    handles = [
        modules[p.module_name].register_forward_hook(
            lambda m, a, out, p=p: stats[p.key].update(out[..., p.rows], batch["attention_mask"])
        )
        for p in projections
    ]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    ratios = {}
    for key, s in stats.items():
        value = s.value("mean_abs")
        ratios[key] = float(value.max() / value.median())
    with_outliers = [k for k, r in ratios.items() if r > 5]
    assert len(with_outliers) >= 0.6 * len(ratios), sorted(ratios.items(), key=lambda kv: kv[1])[:10]
