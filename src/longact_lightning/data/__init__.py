"""Tasks: prompt records and sources (RULER, LongBench v2, JSONL, HF datasets), their rewards, and the DataModule
that turns prompts into rollout batches."""

from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.data.longbench import LongBenchV2Source
from longact_lightning.data.records import PromptRecord
from longact_lightning.data.ruler import RulerSource
from longact_lightning.data.sources import HFDatasetSource, JsonlSource, PromptSource

__all__ = [
    "HFDatasetSource",
    "JsonlSource",
    "LongBenchV2Source",
    "PromptRecord",
    "PromptSource",
    "RolloutDataModule",
    "RulerSource",
]
