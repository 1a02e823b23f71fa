"""The shipped configs are artifacts under test: each parses (``--print_config``), keeps every value it writes,
says how to launch it, and instantiates (on CPU, with a tiny model standing in for the GPU configs' hub model);
and LightningCLI's errors for an unknown key, a wrong type and a missing model path name the key.

Instantiation uses ``cli_main(args, run=False)``, which builds model, data, callbacks and trainer but runs nothing
(and, without subcommands, takes the arguments without ``fit``). The GPU configs ask for CUDA, FSDP and a hub model;
the tests override ``trainer.accelerator/devices/strategy``, ``model.model`` and ``data.engine`` for that, and check
the GPU-side values separately by parsing alone.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import SingleDeviceStrategy

from longact_lightning.callbacks import LongAct, RunSummary
from longact_lightning.cli import LongActCLI, LongActTrainer, cli_main
from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.data.ruler import RulerSource
from longact_lightning.rl.module import RLPolicyModule
from longact_lightning.rollout import VLLMEngine
from tests.helpers.cli import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GPU_CONFIGS = [path for path in CONFIGS if path.name.startswith("qwen_")]
DEMO = ROOT / "configs" / "smollm_cpu_demo.yaml"
CPU_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]


def _id(path: Path) -> str:
    return path.stem


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


class _ParseOnly(LongActCLI):
    """Parses (config files, flags, links) and stops before instantiating anything."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


class _Parsed(Exception):
    def __init__(self, config: Any) -> None:
        self.config = config


def _parse(*args: str) -> Any:
    with pytest.raises(_Parsed) as info:
        _ParseOnly(RLPolicyModule, RolloutDataModule, trainer_class=LongActTrainer, args=list(args), run=False)
    return info.value.config


def _assert_subset(written: Any, parsed: Any, where: str) -> None:
    if isinstance(written, dict):
        assert isinstance(parsed, dict), f"{where}: {parsed!r}"
        for key, value in written.items():
            assert key in parsed, f"{where}.{key} missing after parsing"
            _assert_subset(value, parsed[key], f"{where}.{key}")
    elif isinstance(written, list) and any(isinstance(item, dict) for item in written):
        assert isinstance(parsed, list) and len(parsed) == len(written), f"{where}: {parsed!r}"
        for index, (item, parsed_item) in enumerate(zip(written, parsed)):
            _assert_subset(item, parsed_item, f"{where}[{index}]")
    elif isinstance(written, float):
        assert parsed == pytest.approx(written), where
    else:
        assert parsed == written, f"{where}: wrote {written!r}, parsed {parsed!r}"


def test_every_config_is_covered():
    assert {path.name for path in CONFIGS} >= {
        "qwen_dapo.yaml", "qwen_grpo.yaml", "qwen_klcov.yaml", "smollm_cpu_demo.yaml",
    }  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_header_says_what_and_how_to_launch(config):
    header = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 3, f"{config.name} has no header comment"
    assert f"longact fit --config configs/{config.name}" in "\n".join(header)


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_print_config_parses_and_keeps_every_value(config, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(config.read_text())
    for section in ("model", "data", "longact", "checkpoint"):
        _assert_subset(written.get(section, {}), printed[section], section)
    trainer = dict(written["trainer"])
    strategy = trainer.pop("strategy", None)
    _assert_subset(trainer, printed["trainer"], "trainer")
    if isinstance(strategy, dict):  # jsonargparse cannot print auto_wrap_policy (a set of classes) back
        assert printed["trainer"]["strategy"]["class_path"] == strategy["class_path"]


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=_id)
def test_gpu_config_values(config):
    c = _parse("--config", str(config))
    assert c.trainer.accelerator == "gpu" and c.trainer.devices == 8
    assert c.trainer.precision == "bf16-mixed"  # fp32 master weights: lr 1e-6 updates survive
    assert c.trainer.strategy.class_path == "lightning.pytorch.strategies.ModelParallelStrategy"  # FSDP2
    assert c.model.model.startswith("Qwen/Qwen3-4B")
    assert c.data.model == c.model.model  # linked
    assert c.model.dtype == "float32" and c.model.gradient_checkpointing is True
    assert (c.model.lr, c.model.weight_decay, c.model.max_grad_norm) == (1e-6, 0.1, 1.0)
    assert (c.longact.top_ratio, c.longact.mode) == (0.3, "high")
    assert c.checkpoint.save_last is True and c.checkpoint.save_on_exception is True
    assert c.data.engine == "vllm"
    options = c.data.engine_options
    assert set(options) <= set(inspect.signature(VLLMEngine).parameters), "engine_options VLLMEngine does not take"
    assert options["enable_sleep_mode"] is True and 0 < options["gpu_memory_utilization"] < 1
    assert c.data.source.class_path == "longact_lightning.data.ruler.RulerSource"
    target = c.data.source.init_args.target_length
    assert target >= 16384 and options["max_model_len"] >= target + c.data.max_new_tokens - 128
    assert c.trainer.max_steps % c.model.ppo_epochs == 0
    name = config.stem
    if name == "qwen_dapo":
        loss = c.model.loss
        assert loss.loss_type == "dapo" and (loss.clip_eps_low, loss.clip_eps_high) == (0.2, 0.28)
        assert c.data.dynamic_sampling is True and c.data.overlong_buffer_tokens > 0 and c.data.group_size == 16
        assert c.model.loss.beta == 0
    elif name == "qwen_grpo":
        assert c.model.loss.loss_type == "grpo" and c.model.loss.beta > 0 and c.model.loss.kl_estimator == "k3"
        assert c.data.group_size == 16
    elif name == "qwen_klcov":
        loss = c.model.loss
        assert loss.loss_type == "kl_cov" and loss.kl_cov_ratio == 2e-3 and loss.kl_cov_coef == 1.0
        assert c.model.ppo_epochs >= 2  # the |log pi - log pi_old| penalty is zero on a batch's first update
        assert c.data.dynamic_sampling is True
    else:
        pytest.fail(f"no expectations written for {config.name}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_stage_2"])
def test_strategy_switches_by_flag(strategy):
    c = _parse("--config", str(ROOT / "configs" / "qwen_dapo.yaml"), "--trainer.strategy", strategy,
               "--trainer.devices", "4")  # fmt: skip
    assert c.trainer.strategy == strategy and int(c.trainer.devices) == 4  # "4": devices also takes strings


def test_hybrid_sharding_by_flag():
    """The two ways the configs' headers name: FSDP1's HYBRID_SHARD, FSDP2's replicas of shard groups."""
    c = _parse("--config", str(ROOT / "configs" / "qwen_dapo.yaml"), "--trainer.strategy", "FSDPStrategy",
               "--trainer.strategy.sharding_strategy", "HYBRID_SHARD", "--trainer.num_nodes", "2")  # fmt: skip
    assert c.trainer.strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    assert c.trainer.strategy.init_args.sharding_strategy.name == "HYBRID_SHARD" and c.trainer.num_nodes == 2
    c = _parse("--config", str(ROOT / "configs" / "qwen_dapo.yaml"), "--trainer.num_nodes", "2",
               "--model.hybrid_shard_replicas", "2")  # fmt: skip
    assert c.model.hybrid_shard_replicas == 2 and c.trainer.num_nodes == 2


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_config_instantiates_on_cpu_with_a_tiny_model(config, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative output paths
    written = yaml.safe_load(config.read_text())
    args = ["--config", str(config), *CPU_OVERRIDES, "--model.model", str(tiny_model_dir), "--data.engine", "hf"]
    cli = cli_main(args, run=False)

    assert isinstance(cli.trainer.strategy, SingleDeviceStrategy)
    assert cli.trainer.max_steps == written["trainer"]["max_steps"]
    model, data = cli.model, cli.datamodule
    assert isinstance(model, RLPolicyModule) and isinstance(data, RolloutDataModule)
    assert model.loss_config.loss_type == written["model"]["loss"]["loss_type"]
    assert data.model == str(tiny_model_dir)  # model.model -> data.model link
    assert data.sampling.n == written["data"]["group_size"]
    assert isinstance(data.source, RulerSource)
    assert (model.reference is not None) == (written["model"]["loss"].get("beta", 0) > 0)
    assert model.policy.is_gradient_checkpointing == written["model"].get("gradient_checkpointing", False)

    callbacks = cli.trainer.callbacks
    (longact,) = [cb for cb in callbacks if isinstance(cb, LongAct)]
    assert longact.top_ratio == written["longact"]["top_ratio"] and longact.mode == written["longact"]["mode"]
    (checkpoint,) = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint)]
    assert checkpoint.save_last is True and checkpoint.save_on_exception is True
    assert checkpoint._every_n_train_steps == written["checkpoint"]["every_n_train_steps"]
    assert any(isinstance(cb, RichProgressBar) for cb in callbacks)
    assert any(isinstance(cb, RunSummary) for cb in callbacks)
    assert {type(logger) for logger in cli.trainer.loggers} == {TensorBoardLogger, CSVLogger}
    assert not any(tmp_path.iterdir()), "instantiating wrote files"


def test_no_progress_bar_when_the_trainer_is_told_not_to_draw_one(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(DEMO), "--model.model", str(tiny_model_dir), "--data.engine", "hf"]
    cli = cli_main([*args, "--trainer.enable_progress_bar", "false"], run=False)
    assert not any(isinstance(cb, RichProgressBar) for cb in cli.trainer.callbacks)
    assert any(isinstance(cb, RunSummary) for cb in cli.trainer.callbacks)


def test_cpu_demo_instantiates_with_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", str(DEMO)], run=False)
    assert cli.model.hparams.model == cli.datamodule.model == "smollm2-135m-instruct"
    assert cli.datamodule.engine_kind == "vllm"
    assert str(cli.trainer.strategy.root_device) == "cpu"


# --- errors ----------------------------------------------------------------------------------------------------------


def _fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(DEMO), *args])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_unknown_key_is_named(capsys, tmp_path):
    assert "--model.bogus_key" in _fails(capsys, "--model.bogus_key", "1")
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  bogus_key: 1\n")
    assert "model.bogus_key" in _fails(capsys, "--config", str(extra))
    extra.write_text("longact:\n  top_ration: 0.2\n")
    assert "longact.top_ration" in _fails(capsys, "--config", str(extra))


def test_predict_is_not_offered(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["predict", "--config", str(DEMO)])
    assert info.value.code == 2
    assert "invalid choice: 'predict' (choose from" in capsys.readouterr().err


def test_bad_callback_value_fails_before_the_model_loads(capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr("longact_lightning.rl.module.load_causal_lm", lambda *a, **k: loaded.append(a))
    assert 'Parser key "longact": top_ratio=1.5 must be in (0, 1]' in _fails(capsys, "--longact.top_ratio", "1.5")
    assert not loaded


def test_sampling_temperature_and_budget_are_set_once_on_the_data_side(capsys):
    c = _parse("--config", str(DEMO), "--data.temperature", "0.7", "--data.max_new_tokens", "40")
    # the loss scores at the temperature the engine sampled at; Dr.GRPO's L_max is the generation budget
    assert (c.model.temperature, c.model.loss.max_completion_length) == (0.7, 40)
    assert 'must be given via "data.temperature"' in _fails(capsys, "--model.temperature", "0.7")


def test_wrong_type_is_named(capsys, tmp_path):
    assert 'Parser key "model.lr"' in _fails(capsys, "--model.lr", "abc")
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  group_size: many\n")
    assert 'Parser key "data.group_size"' in _fails(capsys, "--config", str(extra))


@pytest.mark.parametrize(
    ("key", "value"),
    [("--model.model", "/nonexistent/dir"), ("--model.model", "./no-such-model"), ("--model.tokenizer", "/no/tok")],
)
def test_missing_model_path_fails_before_any_work(key, value, capsys, tmp_path, monkeypatch):
    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model or tokenizer was loaded before the path was checked")

    monkeypatch.setattr("longact_lightning.rl.module.load_causal_lm", no_work)
    monkeypatch.setattr("longact_lightning.rl.module.load_tokenizer", no_work)
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, key, value)
    assert f'Parser key "{key[2:]}"' in err and f"Model path {value!r} does not exist" in err
    assert not any(tmp_path.iterdir()), "files were written before the error"


def test_a_missing_path_under_a_local_directory_is_not_taken_for_a_hub_id(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/missing could be the hub id "runs/missing", but runs/ is a directory here
    assert "Model path 'runs/missing' does not exist" in _fails(capsys, "--model.model", "runs/missing")
