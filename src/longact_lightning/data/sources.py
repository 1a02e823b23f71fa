"""Prompt sources: user data (JSONL, Parquet, any HF dataset) mapped onto :class:`PromptRecord`.

Every source, the benchmark ones included, subclasses :class:`PromptSource`, so a DataModule can take one typed
``source: PromptSource`` argument and LightningCLI builds any of them from ``class_path`` / ``init_args`` without a
registry. Sources that need the policy's tokenizer (to size or truncate prompts) receive it late through
:meth:`PromptSource.connect`, because the tokenizer is known only once the model is.

A bad row never stops a run: it is skipped with a warning that says where it is. A source that yields nothing is a
configuration error, raised on the first pull (``next(iter(source))``), which a DataModule does in ``setup`` —
before training starts.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from longact_lightning.data.records import PromptRecord

# Local files whose builder ``load_dataset`` cannot guess from a bare path argument.
_BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class EmptySourceError(ValueError):
    """A prompt source produced no usable record."""


class PromptSource(ABC):
    """An iterable of :class:`PromptRecord` that a DataModule streams from."""

    @abstractmethod
    def __iter__(self) -> Iterator[PromptRecord]:
        """Yield the records; raise :class:`EmptySourceError` if there are none."""

    def connect(self, tokenizer: Any) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Receive the policy's tokenizer. Sources that do not size or truncate prompts ignore it."""


def nonempty(records: Iterable[PromptRecord], source: str, fix: str) -> Iterator[PromptRecord]:
    """Pass ``records`` through, raising :class:`EmptySourceError` if there were none.

    Args:
        records: the records to pass through.
        source: what was read (a path, a hub id), for the message.
        fix: what the user should change, for the message.

    Raises:
        EmptySourceError: when ``records`` is empty.
    """
    count = 0
    for record in records:
        count += 1
        yield record
    if count == 0:
        raise EmptySourceError(f"Prompt source {source} produced no usable record. {fix}")


def resolve_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as is; a string (model name, path, ``smollm2-135m-instruct``) loaded with its tokenizer.

    Strings keep sources configurable from YAML, where a tokenizer object cannot be written.
    """
    if isinstance(tokenizer, str):
        from longact_lightning.models import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def load_hf_dataset(
    path: str,
    split: str = "train",
    name: str | None = None,
    data_files: str | Sequence[str] | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
):
    """``datasets.load_dataset`` on a hub id, a local dataset directory or a single local data file.

    A single local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file is loaded with the matching packaged builder
    (its one split is ``train``), so a downloaded hub file loads the same way as the hub id.

    Args:
        path: hub id (``THUDM/LongBench-v2``), builder name (``parquet``), local directory or local data file.
        split: split to load.
        name: dataset configuration name, if the dataset has several.
        data_files: data files for a builder name or directory.
        load_kwargs: any further ``load_dataset`` keyword (``cache_dir``, ``revision``, ...).
    """
    from datasets import load_dataset

    kwargs = dict(load_kwargs or {})
    local = Path(path).expanduser()
    if local.is_file():
        builder = _BUILDER_BY_SUFFIX.get(local.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot tell the format of {path!r}: use a file ending in {sorted(_BUILDER_BY_SUFFIX)}, "
                "or pass the builder name as path (e.g. path='json') and the file as data_files."
            )
        return load_dataset(builder, data_files=str(local), split=split, **kwargs)
    return load_dataset(path, name, split=split, data_files=data_files, **kwargs)


def _as_answers(value: Any) -> tuple[str, ...]:
    """A reference column holds one answer or a list of acceptable ones; both become a tuple of strings."""
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value)
    return (str(value),)


class _ColumnMapping:
    """Turns one row (a mapping) into a record, or into the reason it cannot be one."""

    def __init__(
        self,
        prompt_column: str,
        answer_column: str,
        metadata_columns: Sequence[str],
        task: str,
        answer_prefix: str,
    ) -> None:
        self.prompt_column = prompt_column
        self.answer_column = answer_column
        self.metadata_columns = tuple(metadata_columns)
        self.task = task
        self.answer_prefix = answer_prefix

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.prompt_column, self.answer_column, *self.metadata_columns)

    def to_record(self, row: Mapping[str, Any], where: dict[str, Any]) -> PromptRecord | str:
        """The record, or a message naming the missing column (the caller warns with the row's location)."""
        absent = [column for column in self.columns if column not in row]
        if absent:
            return f"missing column(s) {absent} (present: {sorted(row)})"
        null = [column for column in self.columns if row[column] is None]
        if null:
            return f"null value in column(s) {null}"
        prompt = row[self.prompt_column]
        if not isinstance(prompt, str):
            return f"column {self.prompt_column!r} must hold a string, got {type(prompt).__name__}"
        metadata = {column: row[column] for column in self.metadata_columns}
        metadata.update(where)
        return PromptRecord(
            prompt=prompt,
            answers=_as_answers(row[self.answer_column]),
            task=self.task,
            answer_prefix=self.answer_prefix,
            metadata=metadata,
        )


class JsonlSource(PromptSource):
    """Prompts from a JSON Lines file, one object per line.

    Read line by line rather than through ``load_dataset`` so that one malformed line costs one warning with its
    line number instead of the whole file.

    Args:
        path: the ``.jsonl`` file.
        prompt_column: key holding the prompt text.
        answer_column: key holding the reference answer (a string or a list of acceptable strings).
        metadata_columns: further keys copied into ``PromptRecord.metadata``.
        task: task name on every record (picks the reward's default metric).
        answer_prefix: text the model continues from after the assistant header.
    """

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        metadata_columns: Sequence[str] = (),
        task: str = "jsonl",
        answer_prefix: str = "",
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL source {str(self.path)!r} does not exist: pass an existing .jsonl file.")
        self.mapping = _ColumnMapping(prompt_column, answer_column, metadata_columns, task, answer_prefix)

    def __iter__(self) -> Iterator[PromptRecord]:
        return nonempty(
            self._records(),
            source=f"JSONL file {str(self.path)!r}",
            fix=f"Every line must be a JSON object with the keys {list(self.mapping.columns)}; fix the file or the "
            "column mapping (prompt_column / answer_column / metadata_columns).",
        )

    def _records(self) -> Iterator[PromptRecord]:
        with self.path.open("rb") as lines:  # decoded line by line: a bad byte costs its line, not the file
            for line_number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    rank_zero_warn(f"{self.path}:{line_number}: skipped, not UTF-8 ({error}).")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    rank_zero_warn(f"{self.path}:{line_number}: skipped, not valid JSON ({error}).")
                    continue
                if not isinstance(row, dict):
                    rank_zero_warn(f"{self.path}:{line_number}: skipped, a JSON {type(row).__name__}, not an object.")
                    continue
                record = self.mapping.to_record(row, {"source": str(self.path), "line": line_number})
                if isinstance(record, str):
                    rank_zero_warn(f"{self.path}:{line_number}: skipped, {record}.")
                    continue
                yield record


class HFDatasetSource(PromptSource):
    """Prompts from any dataset ``datasets.load_dataset`` reads: a hub id, a local directory, a Parquet/JSON/CSV file.

    Args:
        path: hub id, builder name (``parquet``) with ``data_files``, local directory, or a single local data file.
        prompt_column: column holding the prompt text.
        answer_column: column holding the reference answer (a string or a list of acceptable strings).
        metadata_columns: further columns copied into ``PromptRecord.metadata``.
        task: task name on every record (picks the reward's default metric).
        answer_prefix: text the model continues from after the assistant header.
        split: split to read.
        name: dataset configuration name.
        data_files: data files, for a builder name or a directory.
        load_kwargs: further ``load_dataset`` keywords (``cache_dir``, ``revision``, ...).
    """

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        metadata_columns: Sequence[str] = (),
        task: str = "hf_dataset",
        answer_prefix: str = "",
        split: str = "train",
        name: str | None = None,
        data_files: str | list[str] | None = None,
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.split = split
        self.name = name
        self.data_files = data_files
        self.load_kwargs = load_kwargs
        self.mapping = _ColumnMapping(prompt_column, answer_column, metadata_columns, task, answer_prefix)

    def __iter__(self) -> Iterator[PromptRecord]:
        dataset = load_hf_dataset(self.path, self.split, self.name, self.data_files, self.load_kwargs)
        absent = [column for column in self.mapping.columns if column not in dataset.column_names]
        if absent:
            raise KeyError(
                f"Dataset {self.path!r} (split {self.split!r}) has no column(s) {absent}; its columns are "
                f"{dataset.column_names}. Set prompt_column / answer_column / metadata_columns to existing columns."
            )
        return nonempty(
            self._records(dataset),
            source=f"dataset {self.path!r} (split {self.split!r})",
            fix="Check the path, split and data_files, and that the mapped columns hold values.",
        )

    def _records(self, dataset) -> Iterator[PromptRecord]:
        for index, row in enumerate(dataset):
            record = self.mapping.to_record(row, {"source": self.path, "row": index})
            if isinstance(record, str):
                rank_zero_warn(f"{self.path} (split {self.split!r}) row {index}: skipped, {record}.")
                continue
            yield record
