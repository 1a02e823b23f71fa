"""DeepSpeed fails at setup with a clear message instead of silently moving frozen rows.

``DeepSpeedStrategy()`` cannot be constructed without the ``deepspeed`` package (Lightning raises
``MisconfigurationException: To use the DeepSpeedStrategy, you must have DeepSpeed installed``), and the guard only
looks at the strategy's type, so the tests build a real ``DeepSpeedStrategy`` instance without running its
``__init__``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from longact_lightning.callbacks import GradientRowMask, LongAct
from tests.helpers.models import LMModule, tiny_model

MESSAGE = "cannot guarantee frozen rows under DeepSpeed"


def _deepspeed_strategy() -> DeepSpeedStrategy:
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # no deepspeed import needed for an isinstance check


def test_gradient_row_mask_refuses_deepspeed():
    trainer = SimpleNamespace(strategy=_deepspeed_strategy())
    with pytest.raises(RuntimeError, match=MESSAGE) as info:
        GradientRowMask().setup(trainer, LMModule(tiny_model("llama_gqa")), "fit")
    assert "strategy='ddp'" in str(info.value)  # the message names what to use instead


def test_longact_refuses_deepspeed():
    longact = LongAct(top_ratio=0.3)
    trainer = SimpleNamespace(strategy=_deepspeed_strategy(), callbacks=[longact])
    try:
        with pytest.raises(RuntimeError, match=MESSAGE):
            longact.setup(trainer, LMModule(tiny_model("llama_gqa")), "fit")
    finally:
        longact.teardown(trainer, None, "fit")


def test_deepspeed_subclass_is_refused_too():
    class MyDeepSpeed(DeepSpeedStrategy):
        pass

    with pytest.raises(RuntimeError, match=MESSAGE):
        GradientRowMask().setup(SimpleNamespace(strategy=MyDeepSpeed.__new__(MyDeepSpeed)), None, "fit")


def test_other_strategies_and_stages_pass_the_guard():
    GradientRowMask().setup(SimpleNamespace(strategy=DDPStrategy()), None, "fit")
    GradientRowMask().setup(SimpleNamespace(strategy=_deepspeed_strategy()), None, "validate")  # only fit updates
