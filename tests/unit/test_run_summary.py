"""RunSummary reports a resumed run as it ran: the steps it trained and the masks it restored."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from longact_lightning.callbacks import LongAct, RunSummary
from tests.helpers.models import LMModule, random_lm_batches, tiny_model
from tests.helpers.trainer import cpu_trainer


def test_a_resumed_run_reports_its_own_steps_and_the_restored_masks(tmp_path, capsys):
    batches = random_lm_batches(3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = [LongAct(top_ratio=0.3), ckpt]
    cpu_trainer(2, first, enable_checkpointing=True).fit(LMModule(tiny_model("qwen3")), DataLoader(batches[:2], None))
    capsys.readouterr()

    resumed = [LongAct(top_ratio=0.3), RunSummary()]
    module = LMModule(tiny_model("qwen3"))
    cpu_trainer(3, resumed).fit(module, DataLoader(batches, batch_size=None), ckpt_path=tmp_path / "last.ckpt")
    printed = capsys.readouterr().out
    assert "2 -> 3" in printed  # the steps this run trained, not "0 -> 3"
    assert "(mode high)" in printed and "LongAct callback" not in printed  # the restored selection, not "off"
