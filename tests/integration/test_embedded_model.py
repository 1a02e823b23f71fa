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


def test_conversion_on_a_non_zero_rank_writes_a_complete_model(tmp_path, monkeypatch):
    """Any rank may be the first to need the embedded model. transformers' save_pretrained writes nothing on a rank
    other than 0 of an initialized process group, so the conversion must not rely on it: the directory it leaves has
    the weights (tied ones under the embedding's name), and a config that names the architecture."""
    import json

    import torch.distributed as dist
    from safetensors import safe_open

    from longact_lightning.models import CACHE_ENV, resolve_model

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    directory = resolve_model(EMBEDDED_MODEL)
    monkeypatch.undo()
    assert json.loads((tmp_path / "models" / EMBEDDED_MODEL / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    with safe_open(f"{directory}/model.safetensors", "pt") as weights:
        names = set(weights.keys())  # safe_open is not a mapping: no `in`
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = load_causal_lm(directory)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.model.embed_tokens.weight.abs().sum() > 0
