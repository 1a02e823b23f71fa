"""Lightning callbacks implementing LongAct; each works in any Lightning project."""

from longact_lightning.callbacks.activation_saliency import ActivationSaliency
from longact_lightning.callbacks.checkpoint import RankSafeCheckpoint
from longact_lightning.callbacks.gradient_row_mask import GradientRowMask
from longact_lightning.callbacks.host_memory import HostMemoryReuse
from longact_lightning.callbacks.longact import LongAct
from longact_lightning.callbacks.run_summary import RunSummary

__all__ = ["ActivationSaliency", "GradientRowMask", "HostMemoryReuse", "LongAct", "RankSafeCheckpoint", "RunSummary"]
