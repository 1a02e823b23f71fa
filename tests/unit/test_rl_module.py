"""RLPolicyModule on tiny random-init Llama models: gradient of the DAPO path, on-policy batch pulling, clipping order,
argument validation, and a seeded learning test (reward of "emit token X" rises) with LongAct off and on."""

from __future__ import annotations

import dataclasses
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader, IterableDataset
from transformers import LlamaConfig, LlamaForCausalLM

from longact_lightning.rl.losses import LossConfig
from longact_lightning.rl.module import RLPolicyModule
from longact_lightning.rollout.base import Rollout
from longact_lightning.rollout.batch import RolloutBatch

TOKENIZER = "smollm2-135m-instruct"  # only saved next to exports; the tiny models ignore it
DAPO = LossConfig(loss_type="dapo")
VOCAB, TARGET, EOS, PAD = 128, 7, 2, 0


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def _trainer(max_steps: int, callbacks=()) -> Trainer:
    return Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip


class _FixedBatches(LightningDataModule):
    """Serves pre-built batches and records the optimizer step at which each one was pulled."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches
        self.pulled_at_step: list[int] = []
        self.connected = None

    def connect(self, policy, global_step):
        self.connected = policy
        self.global_step = global_step

    def train_dataloader(self):
        datamodule = self

        class Stream(IterableDataset):
            def __iter__(self):
                for batch in datamodule.batches:
                    datamodule.pulled_at_step.append(datamodule.global_step())
                    yield batch

        return DataLoader(Stream(), batch_size=None)


def _random_batch(seed: int, groups: int = 2, group_size: int = 3) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    rollouts, rewards = [], []
    for _ in range(groups):
        prompt_len = int(torch.randint(2, 6, (1,), generator=g))
        prompt = tuple(torch.randint(3, VOCAB, (prompt_len,), generator=g).tolist())
        group = []
        for _ in range(group_size):
            length = int(torch.randint(1, 6, (1,), generator=g))
            group.append(Rollout(prompt, tuple(torch.randint(3, VOCAB, (length,), generator=g).tolist()), None, "stop"))
        rollouts.append(group)
        rewards.append(torch.rand(group_size, generator=g).tolist())
    return RolloutBatch.from_groups(rollouts, rewards, pad_token_id=PAD)


@pytest.mark.parametrize(
    "micro_batching",
    [
        {"micro_batch_size": 2},  # 2 + 2 + 2 rows, groups split
        {"micro_batch_size": 2, "gradient_checkpointing": True},
        {"max_tokens_per_micro_batch": 10, "gradient_checkpointing": True},  # [0, 1] [2] [3, 4] [5]: groups split
        {"max_tokens_per_micro_batch": 24, "share_prompt": False},  # 3 rows of 8 columns
    ],
    ids=["rows", "rows-checkpointed", "tokens-checkpointed", "tokens-unshared"],
)
def test_dapo_gradient_equals_independent_full_logits_formula(tiny_model_dir, micro_batching):
    """One DAPO step, micro-batched, against -(1/N) sum_{i,t} A_i grad log pi(y_it), from full logits."""
    batch = _random_batch(seed=1)
    module = RLPolicyModule(
        model=tiny_model_dir, tokenizer=TOKENIZER, loss=DAPO, max_grad_norm=None, lr=1e-3, **micro_batching
    )
    reference = LlamaForCausalLM.from_pretrained(tiny_model_dir)  # same weights, independent forward

    captured = {}

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            captured.update({n: p.grad.clone() for n, p in pl_module.policy.named_parameters()})

    _trainer(1, [Capture()]).fit(module, datamodule=_FixedBatches([batch]))

    # independent formula: full [B, T, V] logits, no logits_to_keep, no micro-batching, plain advantages
    rewards, groups = batch.rewards, batch.group_ids
    adv = torch.empty_like(rewards)
    for gid in groups.unique():
        r = rewards[groups == gid]
        adv[groups == gid] = (r - r.mean()) / (r.std() + 1e-6)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    P = batch.prompt_length
    logp = torch.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(-1, batch.completion_ids[..., None])[..., 0]
    m = batch.completion_mask
    # at ratio 1 (first and only epoch), grad of -A * r equals grad of -A * log pi
    (-(adv[:, None] * logp * m).sum() / m.sum()).backward()

    assert captured, "the optimizer step never ran"
    for name, param in reference.named_parameters():
        torch.testing.assert_close(captured[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize(("ppo_epochs", "batches"), [(1, 2), (2, 1)])  # two steps of one epoch, two epochs of one step
def test_each_optimizer_step_sees_only_its_own_gradient(tiny_model_dir, ppo_epochs, batches):
    # the same batch twice (or one batch for two PPO epochs), at a learning rate too small to change a float32 weight:
    # both optimizer steps' gradients are equal unless one leaks into the next (zero_grad per step, not per batch)
    module = RLPolicyModule(
        model=tiny_model_dir, tokenizer=TOKENIZER, loss=DAPO, lr=1e-30, micro_batch_size=6, ppo_epochs=ppo_epochs
    )
    grads = []

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(pl_module.policy.model.layers[0].self_attn.q_proj.weight.grad.clone())

    _trainer(2, [Capture()]).fit(module, datamodule=_FixedBatches([_random_batch(seed=1)] * batches))
    assert len(grads) == 2 and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])  # with clipping, and measured only
def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tiny_model_dir, max_grad_norm):
    module = RLPolicyModule(
        model=tiny_model_dir, tokenizer=TOKENIZER, loss=DAPO, lr=1e-2, micro_batch_size=6, max_nonfinite_steps=2,
        max_grad_norm=max_grad_norm,
    )  # fmt: skip
    good = _random_batch(seed=1)
    bad = dataclasses.replace(_random_batch(seed=2), rewards=torch.full((6,), math.nan))  # NaN advantages, loss, grads
    weights = []

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights.append({k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()})

    with pytest.raises(RuntimeError, match="2 steps in a row had a non-finite gradient norm"):
        _trainer(5, [Snapshot()]).fit(module, datamodule=_FixedBatches([good, bad, good, bad, bad]))
    assert len(weights) == 4  # the 5th step stopped the run inside its optimizer step
    for skipped, before in [(1, 0), (3, 2)]:
        assert all(torch.equal(weights[skipped][k], before_v) for k, before_v in weights[before].items())
    assert not torch.equal(weights[2]["lm_head.weight"], weights[1]["lm_head.weight"])  # a finite step trains
    final = module.policy.state_dict()
    assert all(torch.isfinite(v).all() and torch.equal(v, weights[3][k]) for k, v in final.items())
    assert module._skipped_steps == 3


def test_resuming_refuses_another_model_and_names_changed_settings(tiny_model_dir, tmp_path):
    batch = _random_batch(seed=1)
    trainer = _trainer(1)
    trained = RLPolicyModule(model=tiny_model_dir, tokenizer=TOKENIZER, lr=1e-6)
    trainer.fit(trained, datamodule=_FixedBatches([batch]))
    ckpt = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(ckpt)
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")

    two_steps = _FixedBatches([batch] * 2)
    with pytest.raises(ValueError, match="trained from model=.*tiny.*this run asks for model=.*other"):
        _trainer(2).fit(RLPolicyModule(model=str(other), tokenizer=TOKENIZER), two_steps, ckpt_path=ckpt)
    changed = RLPolicyModule(model=tiny_model_dir, tokenizer=TOKENIZER, lr=1e-3, loss=LossConfig(entropy_coef=0.01))
    with pytest.warns(UserWarning, match=r"model.loss.entropy_coef: 0.0 -> 0.01, model.lr: 1e-06 -> 0.001"):
        _trainer(2).fit(changed, _FixedBatches([batch] * 2), ckpt_path=ckpt)
    # the loss settings travel in the checkpoint as plain values (torch.load(weights_only=True) reads them) and
    # rebuild the module's LossConfig
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert saved["loss"] == dataclasses.asdict(LossConfig())
    assert RLPolicyModule(**saved).loss_config == LossConfig()
    # ...and Lightning's own loader rebuilds the trained policy without a Trainer (for inference or export)
    restored = RLPolicyModule.load_from_checkpoint(ckpt, weights_only=True)
    assert restored.loss_config == LossConfig() and restored.lr == 1e-6
    trained_weights = trained.policy.state_dict()
    assert all(torch.equal(v, trained_weights[k]) for k, v in restored.policy.state_dict().items())


def test_batches_are_pulled_only_after_the_previous_optimizer_step(tiny_model_dir):
    """`training_step(dataloader_iter)` => no prefetch: batch k is generated when global_step == k (on-policy)."""
    datamodule = _FixedBatches([_random_batch(seed=s) for s in range(3)])
    module = RLPolicyModule(
        model=tiny_model_dir, tokenizer=TOKENIZER, loss=LossConfig(loss_type="grpo"), micro_batch_size=4, lr=1e-3
    )
    _trainer(3).fit(module, datamodule=datamodule)
    assert datamodule.connected is module.policy
    assert datamodule.pulled_at_step == [0, 1, 2]


def test_ppo_epochs_give_one_optimizer_step_each_and_use_old_logprobs(tiny_model_dir):
    datamodule = _FixedBatches([_random_batch(seed=s) for s in range(2)])
    module = RLPolicyModule(
        model=tiny_model_dir, tokenizer=TOKENIZER, loss=LossConfig(loss_type="dapo", beta=0.05), ppo_epochs=3,
        micro_batch_size=4, lr=1e-2,
    )  # fmt: skip
    trainer = _trainer(6)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 6 and datamodule.pulled_at_step == [0, 3]
    # after the first epoch the policy has moved away from the old one, so ratios differ from 1
    assert trainer.callback_metrics["train/ratio_mean"].item() != pytest.approx(1.0, abs=1e-7)
    assert trainer.callback_metrics["train/kl"].item() > 0
    assert module.reference is not None and "reference" not in dict(module.named_children())
    assert not any(k.startswith("reference") for k in module.state_dict())


def test_gradient_clipping_sees_the_callbacks_masked_gradients(tiny_model_dir):
    """Callbacks' on_before_optimizer_step (the LongAct row mask) runs before the module's clipping."""
    seen = {}

    class ZeroEmbeddings(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pl_module.policy.model.embed_tokens.weight.grad.zero_()  # stands in for the row mask

    class Inspect(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
            seen["norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
            seen["embed"] = pl_module.policy.model.embed_tokens.weight.grad.abs().max().item()

    module = RLPolicyModule(model=tiny_model_dir, tokenizer=TOKENIZER, loss=DAPO, max_grad_norm=1e-4, lr=1e-3)
    trainer = _trainer(1, [ZeroEmbeddings(), Inspect()])
    trainer.fit(module, datamodule=_FixedBatches([_random_batch(seed=3)]))
    assert trainer.callback_metrics["train/grad_norm"].item() > 1e-4  # the pre-clip norm was larger ...
    assert seen["norm"] == pytest.approx(1e-4, rel=1e-3)  # ... and the applied gradient was clipped to 1e-4
    assert seen["embed"] == 0.0  # ... without resurrecting the masked gradient


def test_module_path_applies_lm_head_only_to_completion_positions(tiny_model_dir):
    """Without prompt sharing, reference scoring, old log-probs and the checkpointed training pass all use
    `logits_to_keep = C + 1`."""
    g = torch.Generator().manual_seed(5)
    prompt = tuple(torch.randint(3, VOCAB, (64,), generator=g).tolist())
    group = [Rollout(prompt, tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist()), None, "stop") for n in (3, 4)]
    batch = RolloutBatch.from_groups([group], [[1.0, 0.0]], pad_token_id=PAD)
    module = RLPolicyModule(
        model=tiny_model_dir, tokenizer=TOKENIZER, loss=LossConfig(beta=0.1), ppo_epochs=2, micro_batch_size=1,
        gradient_checkpointing=True, share_prompt=False,
    )  # fmt: skip
    seen: list[int] = []
    for model in (module.policy, module.reference):
        model.get_output_embeddings().register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    _trainer(2).fit(module, datamodule=_FixedBatches([batch]))
    assert len(seen) >= 2 * 4 and set(seen) == {4 + 1}  # 2 sequences x (reference, old, 2 epochs), C = 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ppo_epochs": 0}, "ppo_epochs=0 must be >= 1"),
        ({"micro_batch_size": 0}, "micro_batch_size=0 must be >= 1"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of=0 must be >= 1"),
        ({"hybrid_shard_replicas": 0}, "hybrid_shard_replicas=0 must be >= 1"),
        ({"export_every_n_steps": 5}, "needs export_dir"),
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"model": "/nonexistent/model"}, "does not exist"),
    ],
)
def test_bad_arguments_fail_early_with_the_value_and_the_fix(tiny_model_dir, kwargs, message):
    args = {"model": tiny_model_dir, "tokenizer": TOKENIZER, **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        RLPolicyModule(**args)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_dr_grpo_advantages_are_centred_rewards_without_std_scaling(tiny_model_dir, loss_type):
    loss = LossConfig(loss_type=loss_type, max_completion_length=8)
    module = RLPolicyModule(model=tiny_model_dir, tokenizer=TOKENIZER, loss=loss)
    module.trainer = SimpleNamespace(world_size=1)
    batch = _random_batch(0)
    _, advantages = module._share_of_step(batch)
    rewards = batch.rewards.view(2, 3)  # [groups, G]
    centred = rewards - rewards.mean(-1, keepdim=True)
    scale = rewards.std(-1, keepdim=True) + module.hparams.advantage_eps if loss_type == "grpo" else 1.0
    torch.testing.assert_close(advantages, (centred / scale).flatten())


def test_reference_model_is_built_only_when_beta_is_positive(tiny_model_dir):
    assert RLPolicyModule(model=tiny_model_dir, tokenizer=TOKENIZER, loss=LossConfig(beta=0.0)).reference is None
    module = RLPolicyModule(model=tiny_model_dir, tokenizer=TOKENIZER, loss=LossConfig(beta=0.1))
    assert not any(p.requires_grad for p in module.reference.parameters())
    assert module.reference.training is False


# ----------------------------------------------------------------------------------------------------------------
# Learning test: the rule reward "fraction of completion tokens equal to TARGET" must rise, LongAct off and on.


class _GenerateOnDemand(LightningDataModule):
    """A minimal data side: samples G completions per prompt from the *current* policy with `generate`."""

    def __init__(self, steps: int, prompts: int = 4, group_size: int = 8, max_tokens: int = 6):
        super().__init__()
        self.steps, self.prompts, self.group_size, self.max_tokens = steps, prompts, group_size, max_tokens
        self.rewards: list[float] = []

    def connect(self, policy, global_step):
        self.policy = policy

    def _rollout_batch(self, generator: torch.Generator) -> RolloutBatch:
        prompts = torch.randint(3, VOCAB, (self.prompts, 4), generator=generator)
        inputs = prompts.repeat_interleave(self.group_size, 0)
        with torch.no_grad():
            out = self.policy.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=True, top_k=0,
                max_new_tokens=self.max_tokens, eos_token_id=EOS, pad_token_id=PAD,
            )  # fmt: skip
        groups, rewards = [], []
        for p in range(self.prompts):
            group, group_rewards = [], []
            for j in range(self.group_size):
                completion = out[p * self.group_size + j, inputs.shape[1] :].tolist()
                stop = EOS in completion
                completion = completion[: completion.index(EOS) + 1] if stop else completion
                group.append(Rollout(tuple(prompts[p].tolist()), tuple(completion), None, "stop" if stop else "length"))
                group_rewards.append(sum(t == TARGET for t in completion) / self.max_tokens)
            groups.append(group)
            rewards.append(group_rewards)
        self.rewards.append(sum(map(sum, rewards)) / (self.prompts * self.group_size))
        return RolloutBatch.from_groups(groups, rewards, pad_token_id=PAD)

    def train_dataloader(self):
        datamodule = self

        class Stream(IterableDataset):
            def __iter__(self):
                generator = torch.Generator().manual_seed(1234)
                for _ in range(datamodule.steps):
                    yield datamodule._rollout_batch(generator)

        return DataLoader(Stream(), batch_size=None)


def _longact_callbacks() -> list:
    try:
        from longact_lightning.callbacks import LongAct
    except ImportError:
        pytest.skip("longact_lightning.callbacks.LongAct is not importable yet")
    return [LongAct()]


@pytest.mark.parametrize("longact", ["off", "on"])
def test_rule_reward_rises_within_fixed_seeded_steps(tiny_model_dir, longact):
    steps = 16
    callbacks = _longact_callbacks() if longact == "on" else []
    seed_everything(0)
    module = RLPolicyModule(model=tiny_model_dir, tokenizer=TOKENIZER, loss=DAPO, lr=3e-2, micro_batch_size=32)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if "q_proj" in n or "k_proj" in n}
    datamodule = _GenerateOnDemand(steps)
    _trainer(steps, callbacks).fit(module, datamodule=datamodule)
    first, last = sum(datamodule.rewards[:4]) / 4, sum(datamodule.rewards[-4:]) / 4
    assert first < 0.1 and last > first + 0.5, datamodule.rewards

    after = dict(module.policy.named_parameters())
    moved_rows = {n: (after[n].detach() != w).any(dim=1) for n, w in before.items()}  # [rows] per q/k weight
    if longact == "off":
        assert all(rows.all() for rows in moved_rows.values())  # dense updates move every row
        return
    masks = callbacks[0].row_mask.masks
    assert masks, "LongAct selected no rows"
    for name, trainable in masks.items():
        rows = moved_rows[name.removeprefix("policy.")]
        assert not rows[~trainable].any(), f"{name}: a frozen row moved"
        assert rows[trainable].any(), f"{name}: no trainable row moved"
