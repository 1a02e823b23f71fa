"""Peak memory of scoring completion tokens over the vocabulary, at once vs in chunks (``token_logprobs``).

Each measurement is its own process: bf16 logits ``[1, N, vocab]`` (what ``lm_head`` returns under bf16-mixed) are
scored (log-prob of a target and entropy, as the training pass does) and backpropagated; the row reports the peak RSS
above the process's RSS with the logits allocated, i.e. what scoring adds beyond the logits themselves.

Usage: python -m benchmarks.vocab_chunking [--tokens 2048 8192] [--vocab 151936] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(tokens: int, vocab: int, chunk: int | None) -> dict:
    """In this process: peak RSS added by scoring + backward, in MB."""
    import time

    import torch

    from longact_lightning.rl.logprobs import token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(1, tokens, vocab, dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    logprobs, entropy = token_logprobs(logits, targets, 1.0, True, chunk)
    (logprobs.sum() + 0.01 * entropy.sum()).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"added_mb": round(peak - before), "logits_mb": round(logits.numel() * 2 / 2**20), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--vocab", type=int, default=151936, help="Qwen2.5/3's vocabulary by default")
    ap.add_argument("--chunk", type=int, default=1024, help="RLPolicyModule(vocab_chunk_tokens=)")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # tokens vocab chunk|none: measure in this process
    args = ap.parse_args()
    if args.one:
        tokens, vocab, chunk = args.one
        print(json.dumps(measure(int(tokens), int(vocab), None if chunk == "none" else int(chunk))))
        return
    from benchmarks._machine import record

    rows = []
    for tokens in args.tokens:
        results = {}
        for chunk in ("none", str(args.chunk)):
            cmd = [sys.executable, "-m", "benchmarks.vocab_chunking", "--one", str(tokens), str(args.vocab), chunk]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[chunk] = json.loads(out.strip().splitlines()[-1])
        at_once, chunked = results["none"], results[str(args.chunk)]
        rows.append(
            f"{tokens} tokens x {args.vocab} vocabulary (bf16 logits {at_once['logits_mb']} MB): scoring + backward "
            f"adds **{at_once['added_mb']} MB at once, {chunked['added_mb']} MB in chunks of {args.chunk}** "
            f"({at_once['seconds']:.1f} s vs {chunked['seconds']:.1f} s)"
        )
        print(rows[-1], flush=True)
    record("Vocabulary scoring memory: at once vs in chunks (token_logprobs: log-prob + entropy, forward + backward)",
           rows)  # fmt: skip


if __name__ == "__main__":
    main()
