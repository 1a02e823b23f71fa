"""Each loss against numbers computed by hand (or by an independent closed form written here), on tiny tensors."""

import math

import pytest
import torch

from longact_lightning.rl.losses import (
    LossConfig,
    aggregate,
    clip_cov_loss,
    clipped_surrogate,
    kl_cov_loss,
    kl_penalty,
    policy_loss,
    step_denominator,
    truncated_is_weights,
)


def test_clip_higher_is_asymmetric():
    # ratios / advantages: inside the high range only thanks to eps_high; below 1 - eps_low with A < 0 (clipped);
    # above 1 + eps_high with A > 0 (clipped); and the two "wrong-side" cases that PPO never clips.
    ratio = torch.tensor([1.25, 0.75, 1.30, 0.75, 1.30])
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    log_ratio = ratio.log().requires_grad_()
    out = clipped_surrogate(log_ratio, adv, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(out.loss, torch.tensor([-1.25, 0.80, -1.28, -0.75, 1.30]))
    assert out.clipped_low.tolist() == [False, True, False, False, False]
    assert out.clipped_high.tolist() == [False, False, True, False, False]
    out.loss.sum().backward()
    # d(-A r)/d log r = -A r where unclipped, 0 where clipped
    torch.testing.assert_close(log_ratio.grad, torch.tensor([-1.25, 0.0, 0.0, -0.75, 1.30]))

    symmetric = clipped_surrogate(ratio.log(), adv, eps_low=0.2, eps_high=0.2)
    assert symmetric.loss[0].item() == pytest.approx(-1.2)  # the 1.25 token is clipped with symmetric eps
    assert symmetric.clipped_high[0]


def test_dual_clip_caps_negative_advantage_loss_at_c():
    ratio = torch.tensor([5.0, 2.0, 5.0])
    adv = torch.tensor([-1.0, -2.0, 1.0])
    out = clipped_surrogate(ratio.log(), adv, eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0)
    # token 0: max(5, 1.28) = 5 > cap 3 -> 3; token 1: max(4, 2.56) = 4 < cap 6; token 2 (A > 0): -1.28, untouched
    torch.testing.assert_close(out.loss, torch.tensor([3.0, 4.0, -1.28]))
    assert out.dual_clipped.tolist() == [True, False, False]


def test_kl_estimators_k1_k2_k3():
    logprobs = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])  # d = log pi - log pi_ref = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"), torch.tensor([0.125, 0.5]))
    # exp(-d) - 1 + d: e^-0.5 - 0.5 and e^1 - 2
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"), torch.tensor([0.10653066, 0.71828183]))


def _micro(lengths, adv, width):
    mask = torch.zeros(len(lengths), width)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    zeros = torch.zeros(len(lengths), width)
    return zeros, zeros.clone(), torch.tensor(adv), mask


# Two micro-batches of different padded widths (3 and 5): sequences of 1 and 3 tokens, then one of 5 tokens.
# With log pi = log pi_old every token loss is -A, so by hand:
#   DAPO    (token mean)         = (-1*1 + 0.5*3 - 2*5) / 9    = -9.5 / 9
#   GRPO    (seq mean)           = (-1 + 0.5 - 2) / 3          = -2.5 / 3
#   Dr.GRPO (sum / (rows*L_max)) = (-1 + 1.5 - 10) / (3 * 8)   = -9.5 / 24
MICRO_A = _micro([1, 3], [1.0, -0.5], width=3)
MICRO_B = _micro([5], [2.0], width=5)


@pytest.mark.parametrize(
    ("loss_type", "expected"), [("dapo", -9.5 / 9), ("grpo", -2.5 / 3), ("dr_grpo", -9.5 / 24), ("gspo", -2.5 / 3)]
)
def test_micro_batched_loss_equals_concatenated_loss_and_hand_value(loss_type, expected):
    config = LossConfig(loss_type=loss_type, max_completion_length=8)
    agg = config.resolved_aggregation
    denominator = float(step_denominator(MICRO_A[3], agg, 8) + step_denominator(MICRO_B[3], agg, 8))
    micro_sum = sum(policy_loss(*m, config, denominator)[0] for m in (MICRO_A, MICRO_B))

    pad = torch.nn.functional.pad
    concatenated = [torch.cat([pad(a, (0, 2)) if a.dim() == 2 else a, b]) for a, b in zip(MICRO_A, MICRO_B)]
    full_denominator = float(step_denominator(concatenated[3], agg, 8))
    full = policy_loss(*concatenated, config, full_denominator)[0]
    assert full.item() == pytest.approx(expected)
    assert micro_sum.item() == pytest.approx(expected)


def test_per_micro_batch_mean_would_differ_so_the_dapo_test_above_is_meaningful():
    config = LossConfig(loss_type="dapo")
    local = [policy_loss(*m, config, float(m[3].sum()))[0] for m in (MICRO_A, MICRO_B)]
    assert (sum(local) / 2).item() != pytest.approx(-9.5 / 9)


def test_dr_grpo_normaliser_counts_every_row_times_the_constant_budget():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # a fully masked row still counts
    assert step_denominator(mask, "seq_mean_token_sum_norm", max_completion_length=16).item() == 3 * 16
    assert step_denominator(mask, "token_mean").item() == 3
    assert step_denominator(mask, "seq_mean_token_mean").item() == 2  # the masked row is absent
    with pytest.raises(ValueError, match="max_completion_length=None"):
        LossConfig(loss_type="dr_grpo")


def test_gspo_uses_length_normalised_sequence_ratio_with_its_gradient():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    delta = torch.tensor([[0.1, -0.3, 0.2], [0.0005, 0.0015, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logprobs = (old + delta).requires_grad_()
    adv = torch.tensor([1.0, 2.0])
    config = LossConfig(loss_type="gspo")  # eps 3e-4 / 4e-4
    loss, metrics = policy_loss(logprobs, old, adv, mask, config, denominator=2.0)
    # s_0 = exp(mean(0.1, -0.3, 0.2)) = 1 (unclipped); s_1 = exp(0.001) > 1 + 4e-4 -> clipped to 1.0004
    assert loss.item() == pytest.approx(-(1.0 * 1.0 + 2.0 * 1.0004) / 2)
    assert metrics["clip_frac_high"].item() == pytest.approx(2 / 5)  # the two valid tokens of sequence 1
    loss.backward()
    # d/d logp_t of -(1/2) A_0 s_0 = -(1/2) * 1 * s_0 / |y_0| = -1/6 on sequence 0; zero on the clipped sequence
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 6] * 3, [0.0, 0.0, 0.0]]))


def _kl_cov_case():
    # valid tokens (row-major): A = [1, 1, 1, -1, -1], log pi = [-0.1, -2.0, -0.5, -0.3, -1.0]; mean A = 0.2,
    # mean log pi = -0.78, so Cov = 0.8*0.68, 0.8*-1.22, 0.8*0.28, -1.2*0.48, -1.2*-0.22
    #                             = 0.544,   -0.976,    0.224,    -0.576,    0.264
    logprobs = torch.tensor([[-0.1, -2.0, -0.5], [-0.3, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    delta = torch.tensor([[0.1, 0.0, -0.2], [0.05, -0.1, 0.0]])
    return logprobs, logprobs - delta, adv, mask, delta


def test_kl_cov_picks_exactly_the_top_k_covariance_tokens():
    logprobs, old, adv, mask, delta = _kl_cov_case()
    loss, selected = kl_cov_loss(logprobs, old, adv, mask, ratio=0.4, coef=1.0)  # n = floor(5 * 0.4) = 2
    assert selected.tolist() == [[True, False, False], [False, True, False]]  # covariances 0.544 and 0.264
    expected = -adv * delta.exp()  # unclipped everywhere
    expected[0, 0] += 0.1  # + |log pi - log pi_old| on the selected tokens
    expected[1, 1] += 0.1
    torch.testing.assert_close(loss * mask, expected * mask)

    _, one = kl_cov_loss(logprobs, old, adv, mask, ratio=0.01, coef=1.0)  # max(1, floor(0.05)) = 1
    assert one.nonzero().tolist() == [[0, 0]]

    config = LossConfig(loss_type="kl_cov", kl_cov_ratio=0.4, kl_cov_coef=1.0)
    total, metrics = policy_loss(logprobs, old, adv[:, 0], mask, config, denominator=5.0)
    assert total.item() == pytest.approx(float((expected * mask).sum() / 5))
    assert metrics["cov_selected_frac"].item() == pytest.approx(2 / 5)


def test_clip_cov_detaches_in_bound_unclipped_tokens_only():
    # A = [2, 2, -2, -2] (mean 0), log pi = [0, -4, -1, -3] (mean -2): Cov = [4, -4, -2, 2]. In (1, 5): tokens 0 and 3;
    # token 0 has ratio e^0.5 > 1.2 with A > 0, i.e. is already PPO-clipped, so token 3 is the only candidate.
    logprobs = torch.tensor([[0.0, -4.0], [-1.0, -3.0]], requires_grad=True)
    delta = torch.tensor([[0.5, 0.0], [0.1, 0.05]])
    old = logprobs.detach() - delta
    adv = torch.tensor([[2.0, 2.0], [-2.0, -2.0]])
    mask = torch.ones(2, 2)
    config = LossConfig(loss_type="clip_cov", clip_eps_low=0.2, clip_eps_high=0.2, clip_cov_ratio=0.25)
    surrogate, selected = clip_cov_loss(logprobs, old, adv, mask, config)
    assert selected.tolist() == [[False, False], [False, True]]
    torch.testing.assert_close(surrogate.loss.detach(), torch.tensor([[-2.4, -2.0], [2 * math.exp(0.1), 0.0]]))
    surrogate.loss.sum().backward()
    assert logprobs.grad[1, 1] == 0 and logprobs.grad[0, 0] == 0  # detached / clipped
    assert logprobs.grad[0, 1] == pytest.approx(-2.0) and logprobs.grad[1, 0] == pytest.approx(2 * math.exp(0.1))


def test_truncated_importance_sampling_weights_scale_the_policy_term():
    old = torch.tensor([[-1.0, -1.0]])
    engine = torch.tensor([[-1.5, -0.5]])
    weights = truncated_is_weights(old, engine, cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, math.exp(-0.5)]]))  # e^0.5 = 1.65 truncated to 1.5
    config = LossConfig(loss_type="dapo", tis_cap=1.5)
    loss, metrics = policy_loss(old, old, torch.tensor([1.0]), torch.ones(1, 2), config, 2.0, engine_logprobs=engine)
    assert loss.item() == pytest.approx(-(1.5 + math.exp(-0.5)) / 2)
    assert metrics["tis_weight_mean"].item() == pytest.approx((1.5 + math.exp(-0.5)) / 2)


def test_kl_and_entropy_terms_enter_per_token_before_aggregation():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    entropy = torch.tensor([[2.0, 4.0]])
    config = LossConfig(loss_type="grpo", beta=0.1, kl_estimator="k2", entropy_coef=0.01)
    loss, metrics = policy_loss(
        logprobs, logprobs, torch.tensor([0.0]), torch.ones(1, 2), config, 1.0, ref_logprobs=ref, entropy=entropy
    )
    # A = 0 -> policy term 0; mean over the sequence of 0.1 * [0.125, 0.5] - 0.01 * [2, 4]
    assert loss.item() == pytest.approx((0.0125 + 0.05 - 0.02 - 0.04) / 2)
    assert metrics["kl"].item() == pytest.approx(0.3125)
    with pytest.raises(ValueError, match="beta=0.1 > 0 needs ref_logprobs"):
        policy_loss(logprobs, logprobs, torch.tensor([0.0]), torch.ones(1, 2), config, 1.0, entropy=entropy)


def test_aggregate_seq_mean_ignores_padding_inside_each_sequence():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "seq_mean_token_mean", 2.0).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(per_token, mask, "token_mean", 3.0).item() == pytest.approx(8.0 / 3)


def test_config_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        LossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="clip_ratio_c=0.5 must be > 1"):
        LossConfig(clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        LossConfig(kl_estimator="k4")
    assert LossConfig(loss_type="dapo").eps == (0.2, 0.28)
    assert LossConfig(loss_type="gspo").eps == (3e-4, 4e-4)
