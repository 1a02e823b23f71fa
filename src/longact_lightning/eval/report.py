"""Write result tables as CSV (for spreadsheets and diffs) and JSON (for programs), and show them with rich."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Rows with the same keys as one CSV; the header is the first row's keys in order."""
    if not rows:
        raise ValueError(f"No rows to write to {path}; the table is empty.")
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(payload: Any, path: Path) -> None:
    """Strict JSON: non-finite floats (``max / median`` with a zero median) become ``null``."""
    path.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_table(title: str, rows: Sequence[Mapping[str, Any]], digits: int = 3) -> None:
    """A rich table of ``rows`` on the console (floats rounded to ``digits``)."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(str(column), justify="right" if isinstance(rows[0][column], (int, float)) else "left")
    for row in rows:
        table.add_row(*(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(width=200).print(table)  # not the 80 columns rich assumes off a terminal: logs keep whole numbers
