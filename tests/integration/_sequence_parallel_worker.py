"""One rank of a 2-process sequence-parallel scoring run; run by ``test_sequence_parallel.py``.

Usage: ``python -m tests.integration._sequence_parallel_worker RANK PORT MODEL_DIR CHECKPOINTING OUT``. Scores a fixed
batch with each sequence split over both ranks, backpropagates a loss that uses log-probs and entropies, averages the
gradients over the ranks as DDP does, sums the query/key statistics over the ranks as ``ActivationSaliency`` does, and
compares all three with one process scoring the whole sequences; writes the largest differences to
``OUT/rank{RANK}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist


def _batch():
    """Three sequences: a long prompt whose completion lies in rank 1's half only, and two of other lengths."""
    g = torch.Generator().manual_seed(0)
    P, C = 20, 6
    ids = torch.randint(3, 200, (3, P + C), generator=g)
    mask = torch.ones_like(ids)
    mask[0, P + 3 :] = 0  # 20 + 3 tokens: positions 19.. predict the completion, rank 0 holds 0..11
    mask[1, :9] = 0  # left padding: an 11-token prompt, 6 completion tokens
    mask[2, :15], mask[2, P + 4 :] = 0, 0  # 5 + 4 tokens: an odd length, padded to 10
    return ids, mask, C


def _statistics(model, declared: bool):
    """``ChannelStats`` of every q/k projection over the tokens each forward declares (or masks) real."""
    from longact_lightning.saliency.real_tokens import declared_real_tokens
    from longact_lightning.saliency.stats import ChannelStats

    stats, handles, current, counted = {}, [], {"forward": 0}, {}

    def start(module, args, kwargs):
        current.update(mask=declared_real_tokens() if declared else kwargs["attention_mask"])
        current["forward"] += 1

    handles.append(model.register_forward_pre_hook(start, with_kwargs=True))
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj")):
            stats[name] = ChannelStats(module.out_features)

            def hook(module, args, output, name=name):
                if counted.get(name) != current["forward"]:  # count the forward, not checkpointing's replay
                    counted[name] = current["forward"]
                    stats[name].update(output, current["mask"])

            handles.append(module.register_forward_hook(hook))
    return stats, handles


def main() -> None:
    rank, port, model_dir, checkpointing, out = (
        int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1", Path(sys.argv[5])
    )  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from transformers import AutoModelForCausalLM

    from longact_lightning.rl.logprobs import completion_logprobs, sequence_parallel_completion_logprobs
    from longact_lightning.sequence_parallel import ulysses

    ids, mask, C = _batch()
    weights = (torch.arange(C, dtype=torch.float32) - 2.5)[None] * mask[:, -C:]  # [B, C] signed, masked

    def run(sequence_parallel: bool):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        stats, handles = _statistics(model, declared=sequence_parallel)
        scope = ulysses(model) if sequence_parallel else nullcontext()
        with scope:
            if sequence_parallel:
                logprobs, entropy = sequence_parallel_completion_logprobs(model, ids, mask, C, 0.8, True, 3)
            else:
                logprobs, entropy = completion_logprobs(model, ids, mask, C, 0.8, True, chunk_tokens=3)
            loss = (logprobs * weights).sum() + 0.1 * (entropy * mask[:, -C:]).sum()
            loss.backward()
        for handle in handles:
            handle.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if sequence_parallel:
            for grad in grads.values():
                dist.all_reduce(grad)
                grad /= 2  # DDP's average
            for s in stats.values():
                s.all_reduce()
        real = mask[:, -C:].bool()
        return logprobs[real].detach(), entropy[real].detach(), float(loss), grads, stats

    lp_sp, ent_sp, loss_sp, grads_sp, stats_sp = run(True)
    lp, ent, loss, grads, stats = run(False)
    relative = max(float((grads_sp[n] - g).norm() / g.norm().clamp(min=1e-12)) for n, g in grads.items())
    stat_diff = max(
        max(float((getattr(stats_sp[n], f) - getattr(s, f)).abs().max()) for f in ("sum_abs", "sum_sq", "max_abs"))
        for n, s in stats.items()
    )
    result = {
        "logprob_diff": float((lp_sp - lp).abs().max()), "entropy_diff": float((ent_sp - ent).abs().max()),
        "loss": [loss_sp, loss], "grad_rel": relative, "stat_diff": stat_diff,
        "counts": [sorted({float(s.count) for s in side.values()}) for side in (stats_sp, stats)],
        "grad_norm": float(torch.stack([g.norm() for g in grads.values()]).norm()),
    }  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
