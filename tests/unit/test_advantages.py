"""Group advantages against numbers computed by hand (Bessel std, leave-one-out, batch std, singleton groups)."""

import math

import pytest
import torch

from longact_lightning.rl.advantages import group_advantages

# two groups of three: rewards [1, 0, 2] (mean 1, Bessel std 1) and [3, 3, 6] (mean 4, Bessel std sqrt(3))
REWARDS = torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0, 6.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_group_std_scaling_uses_bessel_std_and_eps():
    adv = group_advantages(REWARDS, GROUPS, "group", eps=0.0)
    s = math.sqrt(3.0)
    torch.testing.assert_close(adv, torch.tensor([0.0, -1.0, 1.0, -1 / s, -1 / s, 2 / s]))
    adv_eps = group_advantages(REWARDS, GROUPS, "group", eps=1.0)
    torch.testing.assert_close(adv_eps[:3], torch.tensor([0.0, -0.5, 0.5]))


def test_no_std_scaling_is_mean_centring_only():
    adv = group_advantages(REWARDS, GROUPS, "none")
    torch.testing.assert_close(adv, torch.tensor([0.0, -1.0, 1.0, -1.0, -1.0, 2.0]))


def test_batch_std_uses_group_mean_and_batch_std():
    batch_std = float(torch.tensor([1.0, 0, 2, 3, 3, 6]).numpy().std(ddof=1))  # independent (numpy) Bessel std
    adv = group_advantages(REWARDS, GROUPS, "batch", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.0, -1.0, 1.0, -1.0, -1.0, 2.0]) / batch_std)


def test_leave_one_out_baseline_is_mean_of_the_others():
    adv = group_advantages(REWARDS, GROUPS, "none", leave_one_out=True)
    # r_i - mean(others): 1 - 1, 0 - 1.5, 2 - 0.5, 3 - 4.5, 3 - 4.5, 6 - 3
    torch.testing.assert_close(adv, torch.tensor([0.0, -1.5, 1.5, -1.5, -1.5, 3.0]))


def test_zero_variance_and_singleton_groups_give_zero_and_groups_need_not_be_contiguous():
    rewards = torch.tensor([1.0, 5.0, 1.0, 7.0])
    groups = torch.tensor([3, 9, 3, 4])  # group 3 = {1, 1} (zero variance), 9 and 4 singletons
    for loo in (False, True):
        adv = group_advantages(rewards, groups, "group", leave_one_out=loo)
        torch.testing.assert_close(adv, torch.zeros(4))


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="std_scaling='median'"):
        group_advantages(REWARDS, GROUPS, "median")
    with pytest.raises(ValueError, match=r"must both be \[B\]"):
        group_advantages(REWARDS, GROUPS[:3])


def test_rewards_near_float32s_limit_give_finite_advantages():
    # float32 sums and squares of these overflow (inf - inf = NaN); the advantages are exact in float64
    big = 3e38
    rewards = torch.tensor([big, big, big, big, 0.0, -big])
    adv = group_advantages(rewards, GROUPS, "group")
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, -1.0]))
