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
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from longact_lightning.callbacks import LongAct
from longact_lightning.saliency import find_qk_projections
from longact_lightning.saliency.projections import clean_name
from tests.conftest import LMModule, random_lm_batches, tiny_model

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


def _strategy(name: str):
    if name == "ddp":
        return "ddp"
    if name == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # Lightning refuses `FSDPStrategy` with accelerator="cpu" (accelerator connector: "requires a GPU
        # accelerator"), but that check compares `type(strategy) is FSDPStrategy`; torch's FSDP1 itself runs on CPU
        # with gloo. A trivial subclass therefore exercises exactly the FSDP1 storage (flat `use_orig_params` shards)
        # that GPU users get, which is what the row masks have to handle.
        class CPUFSDPStrategy(FSDPStrategy):
            pass

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


def run(strategy_name: str, out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    module_cls = FSDP2LMModule if strategy_name == "fsdp2" else LMModule
    module = module_cls(tiny_model(ARCH, seed=0), lr=1e-2, weight_decay=0.1)  # same seed: same init on every rank
    initial = {clean_name(n): p.detach().clone() for n, p in module.model.named_parameters()}
    projections = find_qk_projections(module.model)
    batches = random_lm_batches(2 * steps, batch_size=BATCH_SIZE)
    longact = LongAct(top_ratio=0.3)
    trainer = pl.Trainer(
        strategy=_strategy(strategy_name), accelerator="cpu", devices=2, num_nodes=1, max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[longact], use_distributed_sampler=True,
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    fit_seconds = time.perf_counter() - start
    rank, world = trainer.global_rank, trainer.world_size

    failures: list[str] = []
    diagnostics: dict[str, object] = {"rank": rank, "world_size": world, "fit_seconds": round(fit_seconds, 2),
                                      "global_step": trainer.global_step, "strategy": type(trainer.strategy).__name__}
    if trainer.global_step != steps:
        failures.append(f"trained {trainer.global_step} steps, expected {steps}")

    # Storage each rank actually held: proves the test exercised the sharded layout it claims to.
    local_params = {clean_name(n): p for n, p in module.named_parameters()}
    q0 = local_params[f"model.{projections[0].weight_name}"]
    diagnostics["q0_param_type"] = type(q0.data).__name__
    diagnostics["q0_param_shape"] = list(q0.shape)
    diagnostics["q0_local_shape"] = list((q0.data._local_tensor if hasattr(q0.data, "_local_tensor") else q0.data).shape)

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
            failures.append(f"{key}: frozen rows {frozen[moved].tolist()} moved (max |diff| "
                            f"{float((after[frozen] - before[frozen]).abs().max()):.3g})")
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
    (out / f"rank{rank}.json").write_text(json.dumps({"ok": not failures, "failures": failures, **diagnostics}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=["ddp", "fsdp1", "fsdp2"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        run(args.strategy, args.out, args.steps)
    except BaseException:
        rank = os.environ.get("LOCAL_RANK", "0")
        (args.out / f"rank{rank}.error.txt").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    sys.exit(main())
