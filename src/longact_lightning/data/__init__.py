"""Tasks: prompt records and sources (RULER, LongBench v2, InfiniteBench, JSONL, HF datasets), their rewards, and
the DataModule that turns prompts into rollout batches."""

from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.data.infinitebench import InfiniteBenchSource
from longact_lightning.data.longbench import LongBenchV2Source
from longact_lightning.data.records import PromptRecord
from longact_lightning.data.ruler import RulerSource
from longact_lightning.data.sources import HFDatasetSource, JsonlSource, PromptSource

__all__ = [
    "HFDatasetSource",
    "InfiniteBenchSource",
    "JsonlSource",
    "LongBenchV2Source",
    "PromptRecord",
    "PromptSource",
    "RolloutDataModule",
    "RulerSource",
]
