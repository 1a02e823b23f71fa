"""Test-wide settings: one intra-op thread per test (the 2-core machines run the suite), quiet tokenizers.

Shared helpers live in ``tests/helpers/`` and are imported from there, never from a test module or this file.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
