"""The RL module on the embedded SmolLM2-135M: long-prompt log-probs never build prompt x vocab logits, and the
exported checkpoint loads and generates in transformers and (when installed) vLLM."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader

from longact_lightning.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer
from longact_lightning.rl.logprobs import completion_logprobs
from longact_lightning.rl.losses import LossConfig
from longact_lightning.rl.module import RLPolicyModule
from longact_lightning.rollout.base import Rollout
from longact_lightning.rollout.batch import RolloutBatch

pytestmark = pytest.mark.integration

PROMPT, COMPLETION = 4096, 32


class _Batches(LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def _trainer(max_steps: int) -> Trainer:
    return Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def _long_batch(vocab: int, group_size: int = 2) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    prompt = tuple(torch.randint(100, vocab, (PROMPT,), generator=g).tolist())
    group = [
        Rollout(prompt, tuple(torch.randint(100, vocab, (COMPLETION - j,), generator=g).tolist()), None, "stop")
        for j in range(group_size)
    ]
    return RolloutBatch.from_groups([group], [[1.0, 0.0][:group_size]], pad_token_id=0)


def _watch_lm_head(model: torch.nn.Module, seen: list[int]):
    def hook(module, args):
        seen.append(args[0].shape[1])
        assert args[0].shape[1] <= COMPLETION + 1, f"lm_head got {args[0].shape[1]} positions"

    return model.get_output_embeddings().register_forward_pre_hook(hook)


def test_long_prompt_logprobs_only_reach_lm_head_at_completion_positions():
    torch.set_num_threads(2)
    model = load_causal_lm(EMBEDDED_MODEL)
    batch = _long_batch(model.config.vocab_size, group_size=1)
    seen: list[int] = []
    handle = _watch_lm_head(model, seen)
    with torch.no_grad():
        logprobs, entropy = completion_logprobs(model, batch.input_ids, batch.attention_mask, COMPLETION)
    handle.remove()
    assert seen == [COMPLETION + 1]
    assert logprobs.shape == entropy.shape == (1, COMPLETION)
    assert torch.isfinite(logprobs).all() and (logprobs <= 0).all() and (entropy >= 0).all()


def test_exported_checkpoint_loads_and_generates_in_transformers_and_vllm(tmp_path):
    torch.set_num_threads(2)
    export_dir = tmp_path / "export"
    module = RLPolicyModule(
        model=EMBEDDED_MODEL, loss=LossConfig(loss_type="dapo"), micro_batch_size=4, lr=1e-4,
        export_dir=str(export_dir), export_every_n_steps=1,
    )  # fmt: skip
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    prompt = tuple(tokenizer("The capital of France is")["input_ids"])
    group = [Rollout(prompt, tuple(tokenizer(t)["input_ids"]), None, "stop") for t in (" Paris.", " Lyon, I think.")]
    _trainer(1).fit(module, datamodule=_Batches([RolloutBatch.from_groups([group], [[1.0, 0.0]], pad_token_id=0)]))
    assert (export_dir / "step_000001" / "config.json").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(export_dir)
    for name, param in module.policy.named_parameters():
        torch.testing.assert_close(loaded.get_parameter(name), param.detach(), rtol=0, atol=0, msg=name)
    original = load_causal_lm(EMBEDDED_MODEL)
    assert not torch.equal(original.model.layers[0].mlp.up_proj.weight, loaded.model.layers[0].mlp.up_proj.weight)
    exported_tokenizer = AutoTokenizer.from_pretrained(export_dir)
    inputs = exported_tokenizer("The capital of France is", return_tensors="pt")
    out = loaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed; transformers loading was checked")
    script = textwrap.dedent(
        f"""
        from vllm import LLM, SamplingParams
        llm = LLM(model={str(export_dir)!r}, dtype="float32", enforce_eager=True, max_model_len=256)
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=5, temperature=0.0))
        print("VLLM_TOKENS", len(out[0].outputs[0].token_ids))
        """
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "VLLM_TOKENS 5" in result.stdout, result.stderr[-3000:]
