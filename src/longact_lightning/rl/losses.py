"""Policy-gradient losses of GRPO, DAPO, Dr.GRPO, GSPO, KL-Cov and Clip-Cov as pure tensor functions.

Every function works on padded ``[B, C]`` completion tensors (``B`` sequences, ``C`` completion columns) with a
``mask`` that is 1 on tokens entering the loss. The algorithms differ in three separable places, and this file keeps
them separate so that each can be checked against its paper on its own:

1. the per-token objective (clipped ratio with clip-higher and dual clip; GSPO's sequence ratio; KL-Cov's / Clip-Cov's
   covariance-selected tokens), plus optional KL-to-reference and entropy terms;
2. the aggregation of per-token terms into one scalar (per-sequence mean, token mean, constant normaliser);
3. the normaliser of that aggregation, which is always passed in explicitly. It is the count over the *whole optimizer
   step* (every micro-batch and every rank), so that a loss summed over micro-batches equals the loss over the
   concatenated batch — the property DAPO's token-level mean needs and a per-micro-batch mean silently breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "dapo", "dr_grpo", "gspo", "kl_cov", "clip_cov"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "dapo", "dr_grpo", "gspo", "kl_cov", "clip_cov")
AGGREGATIONS: tuple[str, ...] = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

# How each published method aggregates (rl-anchors.md §5): GRPO and GSPO average per sequence, DAPO and the
# KL-Cov / Clip-Cov recipes average over tokens, Dr.GRPO divides the token sum by a constant.
DEFAULT_AGGREGATION: dict[str, str] = {
    "grpo": "seq_mean_token_mean",
    "dapo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
    "gspo": "seq_mean_token_mean",
    "kl_cov": "token_mean",
    "clip_cov": "token_mean",
}
# (eps_low, eps_high): PPO's 0.2; DAPO's clip-higher 0.28; GSPO's sequence-ratio range 3e-4 / 4e-4; the Clip-Cov
# scripts set both to 1. KL-Cov does not clip, so its pair is unused.
DEFAULT_CLIP: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "dr_grpo": (0.2, 0.2),
    "gspo": (3e-4, 4e-4),
    "kl_cov": (0.2, 0.2),
    "clip_cov": (1.0, 1.0),
}


@dataclass(frozen=True)
class LossConfig:
    """The knobs of :func:`policy_loss`: ``RLPolicyModule(loss=...)``, ``model.loss.*`` in a config.

    Attributes:
        loss_type: ``grpo`` | ``dapo`` | ``dr_grpo`` | ``gspo`` | ``kl_cov`` | ``clip_cov``.
        clip_eps_low: lower clip range, ratio clipped to ``1 - clip_eps_low``; ``None`` = the loss type's default
            (0.2; GSPO 3e-4).
        clip_eps_high: upper clip range, ratio clipped to ``1 + clip_eps_high``; ``None`` = the default (0.2; DAPO's
            clip-higher 0.28; GSPO 4e-4).
        clip_ratio_c: dual-clip bound ``c > 1`` (verl uses 3.0): for negative advantages the loss is capped at
            ``-A * c``; ``None`` disables it.
        aggregation: override the loss type's aggregation (``seq_mean_token_mean`` | ``token_mean`` |
            ``seq_mean_token_sum_norm``; ``None`` = :data:`DEFAULT_AGGREGATION`).
        max_completion_length: Dr.GRPO's constant ``L_max`` (the generation budget, not the batch's longest); the
            ``longact`` CLI links it to ``data.max_new_tokens``.
        beta: coefficient of the KL-to-reference term; > 0 makes ``RLPolicyModule`` load a frozen reference copy.
        kl_estimator: ``k1`` / ``k2`` / ``k3`` estimator of KL(pi || pi_ref) (also logged as ``train/kl``).
        entropy_coef: weight of the entropy bonus (subtracted from the loss; 0 = entropy is only logged).
        kl_cov_ratio: fraction of valid tokens KL-Cov penalises (a fraction, as in verl: 0.002 = the 7B recipe).
        kl_cov_coef: KL-Cov's penalty coefficient on ``|log pi - log pi_old|``.
        clip_cov_ratio: fraction of valid tokens Clip-Cov detaches.
        clip_cov_lb: Clip-Cov's lower covariance bound for candidate tokens.
        clip_cov_ub: Clip-Cov's upper covariance bound for candidate tokens.
        tis_cap: cap of the truncated importance weight ``min(pi_old / pi_engine, cap)`` between trainer and engine
            log-probs; ``None`` disables it.
    """

    loss_type: LossType = "grpo"
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    clip_ratio_c: float | None = None
    aggregation: Aggregation | None = None
    max_completion_length: int | None = None
    beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    kl_cov_ratio: float = 2e-3
    kl_cov_coef: float = 1.0
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not supported; use one of {', '.join(LOSS_TYPES)}.")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation={self.aggregation!r} is not supported; use one of {', '.join(AGGREGATIONS)} "
                "or None for the loss type's own."
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} is not supported; use 'k1', 'k2' or 'k3'.")
        low, high = self.eps
        if not 0 <= low <= 1:
            raise ValueError(f"clip_eps_low={low} must be in [0, 1] (the ratio is clipped below at 1 - eps_low).")
        if high < 0:
            raise ValueError(f"clip_eps_high={high} must be >= 0 (the ratio is clipped above at 1 + eps_high).")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c={self.clip_ratio_c} must be > 1 (dual clip, verl uses 3.0) or None.")
        if self.resolved_aggregation == "seq_mean_token_sum_norm" and not (self.max_completion_length or 0) > 0:
            raise ValueError(
                f"max_completion_length={self.max_completion_length} but the 'seq_mean_token_sum_norm' aggregation "
                "(Dr.GRPO) divides by the constant G * L_max: set max_completion_length to the rollout's max tokens."
            )
        for name in ("beta", "entropy_coef", "kl_cov_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("kl_cov_ratio", "clip_cov_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a fraction in (0, 1] (0.002 = 0.2 %).")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb={self.clip_cov_lb} must be below clip_cov_ub={self.clip_cov_ub}.")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap={self.tis_cap} must be > 0 (2.0 is common) or None to disable.")

    @property
    def eps(self) -> tuple[float, float]:
        low, high = DEFAULT_CLIP[self.loss_type]
        return (
            low if self.clip_eps_low is None else self.clip_eps_low,
            high if self.clip_eps_high is None else self.clip_eps_high,
        )

    @property
    def resolved_aggregation(self) -> str:
        return self.aggregation or DEFAULT_AGGREGATION[self.loss_type]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs (Schulman's k1 / k2 / k3).

    With ``d = log pi - log pi_ref``: ``k1 = d`` (unbiased, high variance, can be negative), ``k2 = d^2 / 2``
    (biased, low variance), ``k3 = exp(-d) - 1 + d`` (unbiased, always >= 0; GRPO's choice).

    Args:
        logprobs: ``[B, C]`` policy log-probs of the sampled tokens.
        ref_logprobs: ``[B, C]`` reference log-probs of the same tokens.
        estimator: which estimator.

    Returns:
        ``[B, C]`` per-token KL estimates.
    """
    log_ratio = logprobs - ref_logprobs  # [B, C]
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"kl_estimator={estimator!r} is not supported; use 'k1', 'k2' or 'k3'.")


@dataclass(frozen=True)
class Surrogate:
    """Output of :func:`clipped_surrogate`; every field is ``[B, C]``."""

    loss: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    dual_clipped: torch.Tensor


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    clip_ratio_c: float | None = None,
) -> Surrogate:
    """PPO's pessimistic clipped objective, negated into a loss, with clip-higher and optional dual clip.

    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``. A separate ``eps_high > eps_low`` (DAPO) lets
    low-probability tokens with positive advantage grow further before the gradient stops, which counters entropy
    collapse. Dual clip caps the loss of negative-advantage tokens at ``-A c``: without it a huge ratio on a bad token
    gives an unbounded loss.

    Args:
        log_ratio: ``[B, C]`` ``log pi - log pi_old`` (carries the gradient).
        advantages: ``[B, C]`` advantage per token (usually the sequence advantage broadcast).
        eps_low: lower clip range.
        eps_high: upper clip range.
        clip_ratio_c: dual-clip bound (> 1) or ``None``.

    Returns:
        the per-token loss and boolean masks of where each clip is active (its gradient is zero there).
    """
    ratio = torch.exp(log_ratio)  # [B, C]
    unclipped = -advantages * ratio  # [B, C]
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # [B, C]
    loss = torch.maximum(unclipped, clipped)  # [B, C]
    clipped_low = (ratio < 1 - eps_low) & (advantages < 0)
    clipped_high = (ratio > 1 + eps_high) & (advantages > 0)
    dual_clipped = torch.zeros_like(clipped_low)
    if clip_ratio_c is not None:
        cap = -advantages * clip_ratio_c  # [B, C]
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_clipped, cap, loss)
    return Surrogate(loss=loss, clipped_low=clipped_low, clipped_high=clipped_high, dual_clipped=dual_clipped)


def gspo_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log importance ratio, expressed per token so the clipped objective can consume it.

    ``log s_i = (1/|y_i|) sum_t (log pi - log pi_old)`` (a length-normalised geometric mean of token ratios). The
    per-token version ``log s_i + log pi_t - sg(log pi_t)`` has the value ``log s_i`` at every token and, averaged over
    the sequence's tokens, the gradient of ``s_i`` — GSPO-token's trick, which reduces to GSPO exactly when every token
    carries the sequence advantage, and which lets the sequence ratio reuse token-shaped clipping and aggregation.

    Args:
        logprobs: ``[B, C]`` current log-probs (with gradient).
        old_logprobs: ``[B, C]`` log-probs of the sampling policy.
        mask: ``[B, C]`` 1 on valid tokens.

    Returns:
        ``[B, C]`` per-token log-ratio whose value is the sequence log-ratio.
    """
    token_log_ratio = (logprobs - old_logprobs) * mask  # [B, C]
    seq_log_ratio = token_log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()  # [B, C]


def _centred_covariance(advantages: torch.Tensor, logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(A_t - mean A) * (log pi_t - mean log pi)`` over valid tokens (detached); ``-inf`` elsewhere.  # [B, C]"""
    adv = advantages.detach()[valid]  # [N]
    logp = logprobs.detach()[valid]  # [N]
    cov = torch.full_like(advantages, float("-inf"), dtype=logprobs.dtype)  # [B, C]
    cov[valid] = ((adv - adv.mean()) * (logp - logp.mean())).to(cov.dtype)
    return cov


def kl_cov_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-Cov (Cui et al. 2025): penalise ``|log pi - log pi_old|`` on the tokens with the highest covariance.

    Entropy collapses because confident tokens with positive advantage (high covariance of log-prob and advantage)
    keep getting reinforced. KL-Cov takes the top ``max(1, floor(ratio * N))`` of the ``N`` valid tokens of this call
    by ``Cov_t = (A_t - mean A)(log pi_t - mean log pi)`` (detached, means over the valid tokens) and adds
    ``coef * |log pi_t - log pi_old_t|`` to their loss; every token uses the *unclipped* ``-A r``. The selection is
    made per call, i.e. per micro-batch, as in the reference implementation.

    Args:
        logprobs: ``[B, C]`` current log-probs.
        old_logprobs: ``[B, C]`` sampling-policy log-probs.
        advantages: ``[B, C]`` per-token advantages.
        mask: ``[B, C]`` 1 on valid tokens.
        ratio: fraction of valid tokens to penalise.
        coef: penalty coefficient.

    Returns:
        ``[B, C]`` per-token loss and the ``[B, C]`` boolean mask of penalised tokens.
    """
    log_ratio = logprobs - old_logprobs  # [B, C]
    loss = -advantages * torch.exp(log_ratio)  # [B, C]
    valid = mask > 0
    selected = torch.zeros_like(valid)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return loss, selected
    cov = _centred_covariance(advantages, logprobs, valid)  # [B, C]
    top = torch.topk(cov.flatten(), max(1, int(num_valid * ratio))).indices
    selected.view(-1)[top] = True
    return torch.where(selected, loss + coef * log_ratio.abs(), loss), selected


def clip_cov_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    generator: torch.Generator | None = None,
) -> tuple[Surrogate, torch.Tensor]:
    """Clip-Cov (Cui et al. 2025): detach a random few high-covariance tokens from the clipped PPO loss.

    Candidates are valid tokens not already clipped by PPO with ``clip_cov_lb < Cov_t < clip_cov_ub`` (``Cov_t`` as in
    :func:`kl_cov_loss`); ``max(1, floor(clip_cov_ratio * N))`` of them, drawn uniformly without replacement, get loss
    (and so gradient) zero. The rest use the usual clipped surrogate.

    Args:
        logprobs: ``[B, C]`` current log-probs.
        old_logprobs: ``[B, C]`` sampling-policy log-probs.
        advantages: ``[B, C]`` per-token advantages.
        mask: ``[B, C]`` 1 on valid tokens.
        config: clip ranges, ``clip_cov_ratio`` and bounds.
        generator: RNG for the random draw (seed it for reproducibility).

    Returns:
        the surrogate (with the chosen tokens' loss zeroed) and the ``[B, C]`` boolean mask of chosen tokens.
    """
    eps_low, eps_high = config.eps
    surrogate = clipped_surrogate(logprobs - old_logprobs, advantages, eps_low, eps_high, config.clip_ratio_c)
    valid = mask > 0
    selected = torch.zeros_like(valid)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return surrogate, selected
    cov = _centred_covariance(advantages, logprobs, valid)  # [B, C]
    cov = cov.masked_fill(surrogate.clipped_low | surrogate.clipped_high, float("-inf"))
    candidates = torch.nonzero(((cov > config.clip_cov_lb) & (cov < config.clip_cov_ub)).flatten()).squeeze(-1)
    if candidates.numel():
        order = torch.randperm(candidates.numel(), generator=generator, device="cpu").to(candidates.device)
        chosen = candidates[order[: max(1, int(num_valid * config.clip_cov_ratio))]]
        selected.view(-1)[chosen] = True
    loss = torch.where(selected, torch.zeros_like(surrogate.loss), surrogate.loss)
    return Surrogate(loss, surrogate.clipped_low, surrogate.clipped_high, surrogate.dual_clipped), selected


def truncated_is_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Token-level truncated importance weight ``min(pi_old / pi_engine, cap)`` (detached).

    The rollout engine (vLLM, bf16 kernels) samples from a slightly different distribution than the trainer computes,
    so "on-policy" samples are off-policy by that mismatch; weighting the policy-gradient term by the truncated ratio
    corrects it with bounded variance.

    Args:
        old_logprobs: ``[B, C]`` trainer log-probs before the update.
        engine_logprobs: ``[B, C]`` log-probs the engine reported for the sampled tokens.
        cap: upper bound on the weight.

    Returns:
        ``[B, C]`` weights without gradient.
    """
    return torch.exp(old_logprobs.detach() - engine_logprobs.detach()).clamp(max=cap)  # [B, C]


def step_denominator(
    completion_mask: torch.Tensor, aggregation: str, max_completion_length: int | None = None
) -> torch.Tensor:
    """This rank's share of the normaliser of one optimizer step; sum it over micro-batches and ranks.

    - ``token_mean`` (DAPO): the number of loss tokens, so every token of the step weighs the same.
    - ``seq_mean_token_mean`` (GRPO, GSPO): the number of sequences with at least one loss token (a sequence whose
      tokens are all masked, e.g. a masked truncated one, is absent rather than counted as a zero loss).
    - ``seq_mean_token_sum_norm`` (Dr.GRPO): ``rows * L_max`` — every sequence of the step (``G`` per prompt, masked or
      not) times the constant generation budget ``L_max = max_completion_length``. It depends neither on the sampled
      lengths nor on padding, which is what removes GRPO's length bias.

    Args:
        completion_mask: ``[B, C]`` loss mask of all sequences this rank trains on in the step.
        aggregation: one of :data:`AGGREGATIONS`.
        max_completion_length: ``L_max`` for Dr.GRPO.

    Returns:
        scalar float64 count.
    """
    mask = completion_mask.double()
    if aggregation == "token_mean":
        return mask.sum()
    if aggregation == "seq_mean_token_mean":
        return (mask.sum(-1) > 0).double().sum()
    if aggregation == "seq_mean_token_sum_norm":
        if max_completion_length is None or not max_completion_length > 0:
            raise ValueError(f"max_completion_length={max_completion_length}: Dr.GRPO needs the constant L_max > 0.")
        return mask.new_tensor(float(mask.shape[0] * max_completion_length))
    raise ValueError(f"aggregation={aggregation!r} is not supported; use one of {', '.join(AGGREGATIONS)}.")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, denominator: float) -> torch.Tensor:
    """Sum this micro-batch's per-token losses the way ``aggregation`` says and divide by the step's normaliser.

    Summing the returned values over all micro-batches of a step gives exactly the full-batch loss, because the
    denominator (from :func:`step_denominator`) already counts the whole step.

    Args:
        per_token: ``[B, C]`` per-token loss.
        mask: ``[B, C]`` 1 on loss tokens.
        aggregation: one of :data:`AGGREGATIONS`.
        denominator: the step's normaliser (> 0).

    Returns:
        scalar loss contribution.
    """
    masked = per_token * mask  # [B, C]
    if aggregation in ("token_mean", "seq_mean_token_sum_norm"):
        return masked.sum() / denominator
    if aggregation == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / denominator
    raise ValueError(f"aggregation={aggregation!r} is not supported; use one of {', '.join(AGGREGATIONS)}.")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    denominator: float,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    engine_logprobs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch: per-token objective of ``config.loss_type`` (+ KL, - entropy), aggregated.

    Args:
        logprobs: ``[B, C]`` current policy log-probs of the sampled tokens (with gradient).
        old_logprobs: ``[B, C]`` log-probs of the policy that generated the batch, taken before the first update.
        advantages: ``[B]`` sequence advantages (broadcast to every token of the sequence).
        mask: ``[B, C]`` 1 on tokens entering the loss.
        config: the loss knobs.
        denominator: the step's normaliser from :func:`step_denominator`, summed over micro-batches and ranks.
        ref_logprobs: ``[B, C]`` reference log-probs; required when ``config.beta > 0``.
        entropy: ``[B, C]`` per-token entropy (with gradient); required when ``config.entropy_coef > 0``.
        engine_logprobs: ``[B, C]`` rollout-engine log-probs; used for truncated IS when ``config.tis_cap`` is set.
        generator: RNG for Clip-Cov's random draw.

    Returns:
        the scalar loss and detached token-mean metrics of this micro-batch: ``clip_frac_low``, ``clip_frac_high``,
        ``dual_clip_frac``, ``ratio_mean``, ``kl`` (when a reference is given), ``cov_selected_frac`` (KL-Cov /
        Clip-Cov), ``tis_weight_mean`` (when truncated IS is on).
    """
    if config.beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={config.beta} > 0 needs ref_logprobs; pass the reference model's log-probs.")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={config.entropy_coef} > 0 needs the per-token entropy; pass entropy.")
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1).expand_as(logprobs)  # [B, C]
    eps_low, eps_high = config.eps
    metrics: dict[str, torch.Tensor] = {}
    selected = None

    if config.loss_type == "kl_cov":
        pg, selected = kl_cov_loss(logprobs, old_logprobs, adv, mask, config.kl_cov_ratio, config.kl_cov_coef)
        log_ratio = logprobs - old_logprobs
        no_clip = torch.zeros_like(mask, dtype=torch.bool)
        surrogate = Surrogate(pg, no_clip, no_clip, no_clip)
    elif config.loss_type == "clip_cov":
        surrogate, selected = clip_cov_loss(logprobs, old_logprobs, adv, mask, config, generator)
        log_ratio = logprobs - old_logprobs
    else:
        if config.loss_type == "gspo":
            log_ratio = gspo_log_ratio(logprobs, old_logprobs, mask)
        else:
            log_ratio = logprobs - old_logprobs
        surrogate = clipped_surrogate(log_ratio, adv, eps_low, eps_high, config.clip_ratio_c)

    per_token = surrogate.loss  # [B, C]
    if config.tis_cap is not None and engine_logprobs is not None:
        weights = truncated_is_weights(old_logprobs, engine_logprobs, config.tis_cap)  # [B, C]
        per_token = per_token * weights
        metrics["tis_weight_mean"] = _token_mean(weights, mask)
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, config.kl_estimator)  # [B, C]
        metrics["kl"] = _token_mean(kl, mask)
        if config.beta > 0:
            per_token = per_token + config.beta * kl
    if config.entropy_coef > 0:
        assert entropy is not None  # checked on entry
        per_token = per_token - config.entropy_coef * entropy

    loss = aggregate(per_token, mask, config.resolved_aggregation, denominator)
    metrics["clip_frac_low"] = _token_mean(surrogate.clipped_low, mask)
    metrics["clip_frac_high"] = _token_mean(surrogate.clipped_high, mask)
    metrics["dual_clip_frac"] = _token_mean(surrogate.dual_clipped, mask)
    metrics["ratio_mean"] = _token_mean(torch.exp(log_ratio), mask)
    if selected is not None:
        metrics["cov_selected_frac"] = _token_mean(selected, mask)
    return loss, metrics


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached mean of ``values`` over the tokens where ``mask`` is 1 (0 when there are none)."""
    values = values.detach().to(mask.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
