"""Rollout throughput: the vLLM engine vs the transformers engine on the embedded model, in one run.

Both engines get the same chat prompts, group size, dtype and token budget; rounds alternate (vLLM, HF, vLLM, HF, ...)
so machine noise hits both alike, after one untimed warm-up call each. Throughput counts the tokens actually generated
(EOS included, padding after an early stop excluded). Also times a full weight sync of the float32 policy (what the RL
module trains by default) into the running vLLM engine.

Usage: python -m benchmarks.rollout_throughput [--prompts 8] [--samples 8] [--new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks._machine import record
from longact_lightning.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer
from longact_lightning.rollout import HFEngine, SamplingConfig, VLLMEngine

QUESTIONS = [
    "Name three colours of the rainbow.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me a synonym for 'quick'.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
    "What is 12 times 7?",
    "Describe a cat in five words.",
]


def generated_tokens(groups) -> int:
    return sum(len(r.completion_ids) for group in groups for r in group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for q in (QUESTIONS * args.prompts)[: args.prompts]
    ]
    start = time.perf_counter()
    vllm_engine = VLLMEngine(EMBEDDED_MODEL, dtype=args.dtype, max_model_len=1024, kv_cache_gib=2)
    startup = time.perf_counter() - start
    sequences = args.prompts * args.samples
    hf_engine = HFEngine(EMBEDDED_MODEL, dtype=args.dtype, device="cpu", max_batch_sequences=sequences)
    engines = {"vllm": vllm_engine, "hf": hf_engine}
    for engine in engines.values():  # warm-up, untimed
        engine.generate(prompts[:1], SamplingConfig(n=2, max_tokens=4, seed=0))

    rates: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.rounds):
        for name, engine in engines.items():
            sampling = SamplingConfig(n=args.samples, temperature=1.0, max_tokens=args.new_tokens, seed=round_)
            start = time.perf_counter()
            groups = engine.generate(prompts, sampling)
            seconds = time.perf_counter() - start
            tokens = generated_tokens(groups)
            rates[name].append(tokens / seconds)
            print(f"round {round_} {name}: {tokens} tokens, {seconds:.2f} s, {rates[name][-1]:.0f} tok/s")

    policy = load_causal_lm(EMBEDDED_MODEL, dtype="float32")
    params = sum(p.numel() for p in policy.parameters())
    sync_times = []
    for _ in range(3):
        start = time.perf_counter()
        vllm_engine.load_weights(policy.named_parameters())
        sync_times.append(time.perf_counter() - start)

    vllm_rate, hf_rate = statistics.median(rates["vllm"]), statistics.median(rates["hf"])
    load = os.getloadavg()[0]
    record(
        "Rollout throughput: vLLM engine vs HF engine (SmolLM2-135M-Instruct)",
        [
            f"{args.prompts} prompts x {args.samples} samples, {args.new_tokens} new tokens max, temperature 1.0, "
            f"{args.dtype}, {args.rounds} alternating rounds (median); 1-min load average at the end: {load:.1f}",
            f"vLLM engine: {vllm_rate:.0f} generated tok/s (rounds: {', '.join(f'{r:.0f}' for r in rates['vllm'])}); "
            f"engine start {startup:.1f} s",
            f"HF engine: {hf_rate:.0f} generated tok/s (rounds: {', '.join(f'{r:.0f}' for r in rates['hf'])})",
            f"ratio vLLM / HF: {vllm_rate / hf_rate:.2f}x",
            f"weight sync into vLLM, all {params / 1e6:.1f}M params (float32 policy -> {args.dtype} engine): "
            f"median {statistics.median(sync_times):.2f} s of {', '.join(f'{t:.2f}' for t in sync_times)}",
        ],
    )


if __name__ == "__main__":
    main()
