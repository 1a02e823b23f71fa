"""Native memory that CPU kernels keep per input shape: why the heap's in-use part grows step after step.

``rss_growth`` shows glibc's heap *in use* growing by tens of MB per RL step in every allocator setting, while the
tensors Python can reach stay the same. An RL step's sequence lengths change every step, so every step meets row
counts its kernels have not seen. This runs one forward + backward pass of a SmolLM2-135M-sized layer (autocast bf16
or fp32 linear 576 -> 1536, or causal bf16 attention with 9 query / 3 key-value heads of 64) many times, with the row
count drawn from ``--distinct`` values or held fixed, each arm in a fresh process, and reports the heap in use as it
goes: growth that stops once every row count has been seen is a per-shape kernel cache, bounded by the number of
distinct shapes; growth that does not stop would be a leak.

Usage: python -m benchmarks.shape_cache_growth [--iterations 1500] [--distinct 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

import torch
import torch.nn.functional as F

from benchmarks._heap import heap_mb
from benchmarks._machine import record
from longact_lightning.callbacks.host_memory import retain_freed_host_memory

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64
MIN_ROWS = 400
# name -> (pass, row counts vary, extra environment)
ARMS = {
    "bf16 linear, row count varies": ("linear_bf16", True, {}),
    "bf16 linear, row count fixed": ("linear_bf16", False, {}),
    "fp32 linear, row count varies": ("linear_fp32", True, {}),
    "bf16 linear, row count varies, ONEDNN_PRIMITIVE_CACHE_CAPACITY=0": (
        "linear_bf16", True, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"},
    ),
    "bf16 causal attention (SDPA), length varies": ("attention_bf16", True, {}),
}  # fmt: skip


def one_pass(kind: str, rows: int, linear: torch.nn.Linear) -> None:
    """Forward and backward of one layer on ``rows`` tokens."""
    if kind == "attention_bf16":
        q = torch.randn(1, HEADS, rows, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, KV_HEADS, rows, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float().sum().backward()
        return
    x = torch.randn(rows, HIDDEN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "linear_bf16"):
        y = linear(x)
    y.float().sum().backward()


def run_arm(kind: str, vary: bool, iterations: int, distinct: int, every: int) -> list[int]:
    """Heap in use (MB) before the first pass and after every ``every`` passes."""
    retain_freed_host_memory()  # as in training: freed blocks stay in the heap, so "in use" is what is really kept
    random.seed(0)
    linear = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
    in_use = [heap_mb()[0]]
    for i in range(1, iterations + 1):
        one_pass(kind, MIN_ROWS + (random.randrange(distinct) if vary else distinct // 2), linear)
        if i % every == 0:
            in_use.append(heap_mb()[0])
    return in_use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--distinct", type=int, default=200, help="how many row counts the varying arms draw from")
    ap.add_argument("--every", type=int, default=250, help="read the heap every this many passes")
    ap.add_argument("--arm", choices=sorted({kind for kind, _, _ in ARMS.values()}), help=argparse.SUPPRESS)
    ap.add_argument("--fixed", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if heap_mb() is None:
        sys.exit("shape_cache_growth reads glibc's mallinfo2; run it on Linux with glibc >= 2.33.")
    if args.arm:  # one arm, in the fresh process the parent started
        print(json.dumps(run_arm(args.arm, not args.fixed, args.iterations, args.distinct, args.every)))
        return

    rows = [f"one forward + backward pass per iteration, {args.iterations} iterations, row counts {MIN_ROWS}-"
            f"{MIN_ROWS + args.distinct - 1} ({args.distinct} distinct) where they vary; heap in use after every "
            f"{args.every} iterations"]  # fmt: skip
    for name, (kind, vary, env) in ARMS.items():
        command = [
            sys.executable,
            "-m",
            "benchmarks.shape_cache_growth",
            "--arm",
            kind,
            "--iterations",
            str(args.iterations),
            "--distinct",
            str(args.distinct),
            "--every",
            str(args.every),
        ]
        if not vary:
            command.append("--fixed")
        out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
        in_use = json.loads(out.splitlines()[-1])
        kept = in_use[-1] - in_use[0]
        per_shape = f", {kept / args.distinct:.2f} MB per distinct row count" if vary else ""
        rows.append(f"{name}: heap in use (MB) " + ", ".join(map(str, in_use)) + f"; kept **{kept} MB**{per_shape}")
    record("Heap kept per input shape (SmolLM2-135M-sized layer, forward + backward)", rows)


if __name__ == "__main__":
    main()
