"""``longact``: the LightningCLI entry point (``longact fit --config configs/qwen_dapo.yaml``).

``fit`` / ``validate`` / ``test`` are Lightning's own (held-out scores of ``data.val_source`` / ``data.test_source``;
``predict`` is not offered: an RL policy has nothing to predict that ``eval`` does not do); ``profile`` and ``eval``
are methods of :class:`LongActTrainer` so they take the same ``--config`` and the same model/data sections. Values the
module and the DataModule share (the model path, the sampling temperature, the completion budget) are linked, not
repeated.

Two callbacks are top-level config sections rather than entries of ``trainer.callbacks``, because runs and ablations
change them most: ``longact:`` (:class:`LongAct`; ``--longact.mode none`` is the uniform-update baseline, which still
measures and logs saliency, so every arm runs the same code) and ``checkpoint:`` (:class:`RankSafeCheckpoint`, with
``last.ckpt``, periodic checkpoints of which the 3 newest are kept, and a checkpoint on SIGTERM or any exception that
every rank raised). A third, ``host_memory:`` (:class:`HostMemoryReuse`), keeps freed CPU memory for reuse when
training on the CPU; it is on unless ``--host_memory.enabled false``.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from longact_lightning.callbacks import HostMemoryReuse, LongAct, RankSafeCheckpoint, RunSummary
from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.models import EMBEDDED_MODEL, check_model_path
from longact_lightning.rl.module import RLPolicyModule
from longact_lightning.stopping import EXIT_CODE, LocalSignalConnector

# Where a run writes when neither trainer.default_root_dir nor a logger says: the default loggers' <save_dir>/<name>.
_DEFAULT_LOGS = {"save_dir": "runs", "name": "longact"}
DEFAULT_ROOT = f"{_DEFAULT_LOGS['save_dir']}/{_DEFAULT_LOGS['name']}"
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "max_epochs": -1,
    "logger": [
        {"class_path": f"lightning.pytorch.loggers.{kind}", "init_args": dict(_DEFAULT_LOGS)}
        for kind in ("TensorBoardLogger", "CSVLogger")
    ],
}


class LongActTrainer(Trainer):
    """Lightning's Trainer plus the ``profile`` and ``eval`` subcommands, and a SIGTERM handler that only records
    the signal (see :class:`~longact_lightning.stopping.LocalSignalConnector`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signal_connector = LocalSignalConnector(self)

    def profile(
        self,
        model: RLPolicyModule,
        datamodule: RolloutDataModule,
        output_dir: str = "profile",
        tasks: list[str] | None = None,
        long_length: int = 1024,
        short_length: int = 384,
        lengths: list[int] | None = None,
        num_samples: int = 4,
        top_ratio: float = 0.3,
        statistic: Literal["mean_abs", "rms", "max_abs"] = "mean_abs",
        batch_size: int = 4,
        ckpt_path: str | None = None,
        compare_model: str | None = None,
    ) -> None:
        """Q/K channel-magnitude maps, sparsity metrics and mask stability on long and short prompts.

        Args:
            model: the policy to profile.
            datamodule: where the prompts come from.
            output_dir: directory for PNG heatmaps/histograms and CSV/JSON tables.
            tasks: RULER tasks; default: the source's task plus two others (RULER source) or the source's records.
            long_length: target (or truncation) length of the long context, in tokens.
            short_length: the same for the short context.
            lengths: profile at each of these lengths instead of the long and short one (e.g. ``[1024, 2048, 4096,
                8128]``): concentration per length and mask overlap between every two lengths.
            num_samples: prompts per task and length.
            top_ratio: fraction of channels in the selected mask (paper: 0.3).
            statistic: per-channel statistic over real tokens.
            batch_size: prompts per forward pass.
            ckpt_path: a Lightning .ckpt of the module to profile instead of ``--model.model``'s weights.
            compare_model: a second checkpoint (HF dir, model name or .ckpt) for checkpoint mask stability.
        """
        from longact_lightning.eval.profile import run_profile

        run_profile(
            model, datamodule, output_dir, tasks=tasks, long_length=long_length, short_length=short_length,
            lengths=lengths, num_samples=num_samples, top_ratio=top_ratio, statistic=statistic,
            batch_size=batch_size, ckpt_path=ckpt_path, compare_model=compare_model,
        )  # fmt: skip

    def eval(
        self,
        model: RLPolicyModule,
        datamodule: RolloutDataModule,
        output_dir: str = "eval",
        tasks: list[str] | None = None,
        lengths: list[int] | None = None,
        num_samples: int | None = None,
        longbench_path: str | None = None,
        longbench_max_length: int | None = None,
        max_tokens: int | None = None,
        ckpt_path: str | None = None,
    ) -> None:
        """Greedy evaluation on the DataModule's source (RULER-style tasks, LongBench v2) with official metrics.

        Args:
            model: the policy (any checkpoint or HF directory given as ``--model.model``).
            datamodule: the evaluation prompts and the rollout engine.
            output_dir: directory for the JSON/CSV results.
            tasks: RULER tasks; default: the source's task (RULER source) or the source's records.
            lengths: RULER target lengths; default: the RULER source's, else 1024.
            num_samples: records per RULER task and length (default: the RULER source's, else 20); for other
                sources and LongBench v2 the first N records (default: all).
            longbench_path: LongBench v2 data (hub id, data.json or parquet); unset = skipped.
            longbench_max_length: middle-truncate LongBench v2 prompts to this many tokens.
            max_tokens: tokens to generate per record; default: each benchmark's own budget.
            ckpt_path: a Lightning .ckpt of the module; exported to ``<output_dir>/policy_hf`` and served.
        """
        from longact_lightning.eval.evaluate import run_eval

        run_eval(
            model, datamodule, output_dir, tasks=tasks, lengths=lengths, num_samples=num_samples,
            longbench_path=longbench_path, longbench_max_length=longbench_max_length, max_tokens=max_tokens,
            ckpt_path=ckpt_path,
        )  # fmt: skip


class LongActCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        lightning = {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}
        return {**lightning, "profile": {"model", "datamodule"}, "eval": {"model", "datamodule"}}

    def before_instantiate_classes(self) -> None:
        """Reject bad callback arguments and a model or tokenizer path that does not exist as parser errors naming the
        key, before anything (model, engine, trainer, log directories) is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
        # The callback sections are cheap to build: a bad value fails here, not after the model has loaded.
        sections = {"longact": LongAct, "checkpoint": RankSafeCheckpoint, "host_memory": HostMemoryReuse}
        for key, callback in sections.items():
            if config.get(key) is not None:
                try:
                    callback(**config[key].as_dict())
                except ValueError as error:
                    parser.error(f'Parser key "{key}": {error}')
        self._place_outputs(config)
        for key in ("model.model", "model.tokenizer"):
            value = config.get(key)
            if value is None or value == EMBEDDED_MODEL:
                continue
            try:
                check_model_path(str(value))
            except FileNotFoundError as error:
                parser.error(f'Parser key "{key}": {error}')

    @staticmethod
    def _place_outputs(config: Any) -> None:
        """Put what a run writes under one directory: ``trainer.default_root_dir`` (``runs/longact`` if unset).

        The default loggers write to ``<root>/logs`` and checkpoints default to ``<root>/checkpoints``, one fixed
        place rather than the logger's new ``version_N``, so ``--ckpt_path last`` finds the run's own checkpoints
        when it is started again, and runs with different roots never read each other's."""
        root = config.get("trainer.default_root_dir")
        if root is not None:
            for logger in config.get("trainer.logger") or []:
                args = getattr(logger, "init_args", None)
                if args is not None and args.get("save_dir") == _DEFAULT_LOGS["save_dir"]:  # the defaults' own
                    args["save_dir"], args["name"] = root, "logs"
        if "checkpoint" in config and config.get("checkpoint.dirpath") is None:
            config["checkpoint.dirpath"] = f"{root or DEFAULT_ROOT}/checkpoints"

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        """The persistent progress bar only where the run shows one (Lightning refuses a bar it may not draw)."""
        if config.get("enable_progress_bar") is False:
            defaults = self.trainer_defaults["callbacks"]
            self.trainer_defaults["callbacks"] = [c for c in defaults if not isinstance(c, RichProgressBar)]
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.model")
        # The loss scores log-probs at the temperature the rollouts were sampled at, and Dr.GRPO's L_max is the
        # generation budget: each is set once, on the data side, so the two can never disagree.
        parser.link_arguments("data.temperature", "model.temperature")
        parser.link_arguments("data.max_new_tokens", "model.loss.max_completion_length")
        parser.add_lightning_class_args(LongAct, "longact")
        parser.add_lightning_class_args(RankSafeCheckpoint, "checkpoint")
        parser.add_lightning_class_args(HostMemoryReuse, "host_memory")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 10,
                # keep the 3 newest periodic checkpoints (and last.ckpt): full checkpoints of a 4B model are ~50 GB
                "checkpoint.save_top_k": 3,
                "checkpoint.monitor": "step",
                "checkpoint.mode": "max",
                "checkpoint.save_on_exception": True,
            }
        )


def cli_main(args: list[str] | None = None, run: bool = True) -> LongActCLI:
    """Build (and by default run) the CLI; tests pass ``args`` to drive it in-process."""
    return LongActCLI(
        RLPolicyModule,
        RolloutDataModule,
        trainer_class=LongActTrainer,
        # Persistent callbacks (always present, not configurable): a progress bar, the end-of-fit summary table.
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [RichProgressBar(), RunSummary()]},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """The ``longact`` console script.

    A run stopped by SIGTERM has saved its checkpoint (``checkpoint.save_on_exception``); it exits with the
    conventional 128 + 15 rather than Lightning's 0 (when Lightning itself stops between steps), so a scheduler can
    tell it apart from a finished run.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        cli_main()
    except SIGTERMException:
        raise SystemExit(EXIT_CODE) from None


if __name__ == "__main__":
    main()
