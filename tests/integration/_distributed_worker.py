"""One multi-process LongAct fit on CPU (gloo); run by ``tests/integration/test_distributed.py``.

Usage: ``python -m tests.integration._distributed_worker --strategy {ddp,fsdp1,fsdp2} --out DIR [--steps N]``
from the repository root. Lightning's ``ddp`` launcher re-executes this module once per extra rank, so it has to
be a standalone script. Every rank trains the same tiny Llama-GQA model with ``LongAct(top_ratio=0.3)`` and
``AdamW(lr=1e-2, weight_decay=0.1)``, then gathers the full weights and checks on its own:

* every unselected Q/K row is bit-identical to its initial value, every selected row moved, all other weights moved;
* the saliency hooks fired on every rank and ``ChannelStats.all_reduce`` summed them (token count of the first
  step's batches on *all* ranks);

and writes ``rank{r}.json`` (verdict, failures, diagnostics) and ``rank{r}.pt`` (channel and row masks) to ``--out``
so the test can also compare the masks across ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from longact_lightning.callbacks import GradientRowMask, LongAct
from longact_lightning.callbacks.local_rows import fsdp1_flat_shards
from longact_lightning.saliency import find_qk_projections
from longact_lightning.saliency.projections import clean_name
from tests.helpers.models import LMModule, random_lm_batches, tiny_model
from tests.helpers.trainer import cpu_trainer

ARCH = "llama_gqa"
BATCH_SIZE = 4


class FSDP2LMModule(LMModule):
    """``LMModule`` plus the ``configure_model`` that ``ModelParallelStrategy`` requires: FSDP2 on each layer."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class GradCheck(pl.Callback):
    """After the row mask ran (it comes first in the callbacks), gather each masked parameter's full gradient and
    check that frozen rows carry exactly zero gradient (so clipping and AdamW moments never see them) while trainable
    rows got some. The frozen-weight check alone could not see a mask that zeroes the wrong gradient elements: the
    snapshot/restore would still keep frozen rows exact."""

    def __init__(self, strategy_name: str, row_mask: GradientRowMask) -> None:
        self.strategy_name, self.row_mask = strategy_name, row_mask
        self.failures: list[str] = []
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = {clean_name(n): p for n, p in pl_module.named_parameters()}
        shards = fsdp1_flat_shards(trainer.strategy.model) if self.strategy_name == "fsdp1" else {}
        for name, mask in sorted(self.row_mask.masks.items()):
            grad = self._full_grad(params[name], shards.get(id(params[name])))
            if grad is None:
                continue
            self.checked += 1
            nonzero = (grad != 0).reshape(grad.shape[0], -1).any(dim=1)
            if nonzero[~mask].any():
                self.failures.append(f"step {trainer.global_step} {name}: frozen rows have gradient")
            if mask.any() and not nonzero[mask].any():
                self.failures.append(f"step {trainer.global_step} {name}: no trainable row has gradient")

    @staticmethod
    def _full_grad(param: torch.Tensor, shard) -> torch.Tensor | None:
        import torch.distributed as dist

        grad = param.grad
        if shard is None:
            if grad is not None and hasattr(grad, "full_tensor"):
                return grad.full_tensor()  # FSDP2: every rank holds a DTensor grad, so all join the collective
            return None if grad is None else grad.detach().clone()
        # FSDP1: this rank's 1-D piece sits at flattened offset `start` of the full parameter.
        pieces: list = [None] * dist.get_world_size()
        local = None if grad is None or shard.numel == 0 else (shard.start, grad.detach().cpu().clone())
        dist.all_gather_object(pieces, local)
        pieces = [p for p in pieces if p is not None]
        if not pieces:
            return None
        full = torch.zeros(shard.shape.numel(), dtype=pieces[0][1].dtype)
        for start, values in pieces:
            full[start : start + values.numel()] = values
        return full.reshape(shard.shape)


def _strategy(name: str):
    if name == "ddp":
        return "ddp"
    if name == "fsdp1":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from tests.helpers.cli import CPUFSDPStrategy

        return CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True, process_group_backend="gloo")
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    raise ValueError(f"unknown strategy {name!r}")


def _full_weights(strategy_name: str, trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Every parameter of ``module.model`` as a full tensor (gathered from all ranks), keyed by clean name."""
    if strategy_name == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=False):
            return {clean_name(n): p.detach().clone() for n, p in module.model.named_parameters()}
    out = {}
    for n, p in module.model.named_parameters():
        data = p.detach()
        out[clean_name(n)] = (data.full_tensor() if hasattr(data, "full_tensor") else data).clone()
    return out


def _explicit_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Seeded random 30 % trainable rows of every matrix and norm of the model, for ``--callback rowmask``.

    Beyond Q/K this covers parameters that FSDP1 splits between ranks mid-parameter (with this model and two ranks,
    the final norm of the root unit straddles the shard boundary) and ones a rank holds none of.
    """
    g = torch.Generator().manual_seed(1234)
    masks = {}
    for name, param in model.named_parameters():
        rows = param.shape[0]
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[torch.randperm(rows, generator=g)[: int(0.3 * rows + 0.5)]] = True
        masks[f"model.{clean_name(name)}"] = mask
    return masks


def _check_rowmask(masks, initial, final, failures: list[str]) -> None:
    for name, mask in masks.items():
        key = name.removeprefix("model.")
        before, after = initial[key], final[key]
        moved = (after != before).reshape(before.shape[0], -1).any(dim=1)
        if moved[~mask].any():
            failures.append(f"{name}: frozen rows {(~mask).nonzero().flatten()[moved[~mask]].tolist()} moved")
        if not moved[mask].all():
            failures.append(f"{name}: trainable rows {mask.nonzero().flatten()[~moved[mask]].tolist()} did not move")


def run(strategy_name: str, out: Path, steps: int, callback: str = "longact") -> None:
    torch.set_num_threads(1)
    module_cls = FSDP2LMModule if strategy_name == "fsdp2" else LMModule
    module = module_cls(tiny_model(ARCH, seed=0), lr=1e-2, weight_decay=0.1)  # same seed: same init on every rank
    initial = {clean_name(n): p.detach().clone() for n, p in module.model.named_parameters()}
    projections = find_qk_projections(module.model)
    batches = random_lm_batches(2 * steps, batch_size=BATCH_SIZE)
    explicit = _explicit_masks(module.model) if callback == "rowmask" else {}
    longact = LongAct(top_ratio=0.3) if callback == "longact" else GradientRowMask(explicit)
    grad_check = GradCheck(strategy_name, longact.row_mask if callback == "longact" else longact)
    trainer = cpu_trainer(
        steps, [longact, grad_check], strategy=_strategy(strategy_name), devices=2, num_nodes=1,
        use_distributed_sampler=True,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    fit_seconds = time.perf_counter() - start
    rank, world = trainer.global_rank, trainer.world_size

    failures: list[str] = []
    diagnostics: dict[str, object] = {
        "rank": rank,
        "world_size": world,
        "fit_seconds": round(fit_seconds, 2),
        "global_step": trainer.global_step,
        "strategy": type(trainer.strategy).__name__,
    }
    if trainer.global_step != steps:
        failures.append(f"trained {trainer.global_step} steps, expected {steps}")
    failures += grad_check.failures
    diagnostics["grad_checks"] = grad_check.checked
    if grad_check.checked < steps:
        failures.append(f"only {grad_check.checked} gradient checks ran")

    # Storage each rank actually held: proves the test exercised the sharded layout it claims to.
    local_params = {clean_name(n): p for n, p in module.named_parameters()}
    q0 = local_params[f"model.{projections[0].weight_name}"]
    diagnostics["q0_param_type"] = type(q0.data).__name__
    diagnostics["q0_param_shape"] = list(q0.shape)
    diagnostics["q0_local_shape"] = list(
        (q0.data._local_tensor if hasattr(q0.data, "_local_tensor") else q0.data).shape
    )
    norm = local_params["model.model.norm.weight"].data
    diagnostics["final_norm_local_shape"] = list((norm._local_tensor if hasattr(norm, "_local_tensor") else norm).shape)

    if callback == "rowmask":
        _check_rowmask(explicit, initial, _full_weights(strategy_name, trainer, module), failures)
        torch.save({"row_masks": longact.masks}, out / f"rank{rank}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": not failures, "failures": failures, **diagnostics}))
        return

    # Saliency hooks fired on every rank and the all-reduced statistics cover every rank's tokens (collect_steps=1:
    # the first batch of each rank; DistributedSampler gives rank r the batches r, r + world, ...).
    expected_tokens = sum(float(batches[r]["attention_mask"].sum()) for r in range(world))
    counts = {key: float(stats.count) for key, stats in longact.stats.items()}
    diagnostics["stats_count"] = sorted(set(counts.values()))
    diagnostics["expected_tokens"] = expected_tokens
    if len(counts) != len(projections):
        failures.append(f"statistics for {len(counts)} projections, expected {len(projections)}")
    for key, count in counts.items():
        if count != expected_tokens:
            failures.append(f"{key}: {count} tokens in the all-reduced statistics, expected {expected_tokens}")

    final = _full_weights(strategy_name, trainer, module)
    qk_rows: dict[str, torch.Tensor] = {}
    selected_total = 0
    for proj in projections:
        name = proj.weight_name
        key = f"model.{proj.key}"
        if key not in longact.channel_masks:
            failures.append(f"{key}: no channel mask selected")
            continue
        channel_mask = longact.channel_masks[key].cpu()
        selected_total += int(channel_mask.sum())
        if int(channel_mask.sum()) != int(0.3 * proj.channels + 0.5):
            failures.append(f"{key}: {int(channel_mask.sum())} selected of {proj.channels}")
        qk_rows.setdefault(name, torch.zeros(initial[name].shape[0], dtype=torch.bool))[proj.rows] = True
        before, after = initial[name], final[name]
        frozen, selected = proj.rows[~channel_mask], proj.rows[channel_mask]
        moved = (after[frozen] != before[frozen]).any(dim=1)
        if moved.any():
            failures.append(
                f"{key}: frozen rows {frozen[moved].tolist()} moved (max |diff| "
                f"{float((after[frozen] - before[frozen]).abs().max()):.3g})"
            )
        still = ~(after[selected] != before[selected]).any(dim=1)
        if still.any():
            failures.append(f"{key}: selected rows {selected[still].tolist()} did not move")
    diagnostics["selected_rows_total"] = selected_total
    for name, value in final.items():
        if name in qk_rows:
            continue
        if torch.equal(value, initial[name]):
            failures.append(f"{name}: did not train")

    torch.save(
        {
            "channel_masks": {k: v.cpu() for k, v in longact.channel_masks.items()},
            "row_masks": {k: v.cpu() for k, v in longact.row_mask.masks.items()},
        },
        out / f"rank{rank}.pt",
    )
    (out / f"rank{rank}.json").write_text(
        json.dumps({"ok": not failures, "failures": failures, **diagnostics}, indent=1)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=["ddp", "fsdp1", "fsdp2"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--callback", default="longact", choices=["longact", "rowmask"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        run(args.strategy, args.out, args.steps, args.callback)
        # Leave the process group together: a rank whose gloo threads outlive it at exit aborts in C++
        # ("terminate called without an active exception", exit -6) after the run has passed.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        rank = os.environ.get("LOCAL_RANK", "0")
        (args.out / f"rank{rank}.error.txt").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    sys.exit(main())
