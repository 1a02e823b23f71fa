"""JSONL / Parquet / HF dataset sources: column mapping, bad rows skipped with their location, empty sources fail."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longact_lightning.data.records import PromptRecord
from longact_lightning.data.sources import EmptySourceError, HFDatasetSource, JsonlSource, PromptSource


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_maps_columns(tmp_path):
    path = _write_lines(
        tmp_path / "data.jsonl",
        [
            json.dumps({"question": "2+2?", "gold": "4", "split": "dev"}),
            json.dumps({"question": "Colour of the sky?", "gold": ["blue", "azure"], "split": "dev"}),
        ],
    )
    source = JsonlSource(
        str(path),
        prompt_column="question",
        answer_column="gold",
        metadata_columns=["split"],
        task="arith",
        answer_prefix=" Answer:",
    )
    records = list(source)
    assert records[0] == PromptRecord(
        prompt="2+2?",
        answers=("4",),
        task="arith",
        answer_prefix=" Answer:",
        metadata={"split": "dev", "source": str(path), "line": 1},
    )
    assert records[1].answers == ("blue", "azure")


def test_malformed_jsonl_line_warns_with_line_number_and_is_skipped(tmp_path):
    path = _write_lines(
        tmp_path / "data.jsonl",
        [
            json.dumps({"prompt": "a", "answer": "1"}),
            "",  # blank lines are not records and not errors
            '{"prompt": "b", "answer": ',  # line 3: truncated JSON
            json.dumps({"prompt": "c", "answer": "3"}),
            json.dumps({"prompt": "d"}),  # line 5: missing the mapped answer column
            json.dumps(["not", "an", "object"]),  # line 6
            json.dumps({"prompt": "e", "answer": None}),  # line 7: a null answer
        ],
    )
    with pytest.warns(UserWarning, match="skipped") as caught:
        records = list(JsonlSource(str(path)))
    messages = [str(w.message) for w in caught]
    assert any(f"{path}:3: skipped, not valid JSON" in m for m in messages)
    assert any(f"{path}:5: skipped, missing column(s) ['answer']" in m for m in messages)
    assert any(f"{path}:6: skipped" in m for m in messages)
    assert any(f"{path}:7: skipped, null value in column(s) ['answer']" in m for m in messages)
    assert len(messages) == 4
    assert [r.prompt for r in records] == ["a", "c"]
    assert [r.metadata["line"] for r in records] == [1, 4]


def test_empty_jsonl_fails_on_first_pull_naming_source_and_fix(tmp_path):
    path = _write_lines(tmp_path / "empty.jsonl", [""])
    source = JsonlSource(str(path))
    with pytest.raises(EmptySourceError, match=r"empty\.jsonl.*no usable record.*prompt_column"):
        next(iter(source))


def test_a_bad_byte_late_in_the_file_costs_its_line_only(tmp_path):
    # past the first 8 KB, where a text-mode reader would raise in the middle of the run
    good = [json.dumps({"prompt": f"p{i} " + "x" * 100, "answer": "a"}) for i in range(100)]
    path = tmp_path / "late.jsonl"
    path.write_bytes(("\n".join(good[:90]) + "\n").encode() + b'{"prompt": "bad \xff", "answer": "a"}\n'
                     + ("\n".join(good[90:]) + "\n").encode())  # fmt: skip
    with pytest.warns(UserWarning, match=r"late.jsonl:91: skipped, not UTF-8"):
        records = list(JsonlSource(str(path)))
    assert len(records) == 100


def test_all_rows_bad_is_also_empty(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", ["{oops", json.dumps({"text": "x"})])
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(EmptySourceError, match="bad.jsonl"):
        next(iter(JsonlSource(str(path))))


def test_missing_jsonl_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlSource(str(tmp_path / "nope.jsonl"))


def test_parquet_through_load_dataset(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.table({"text": ["p0", "p1", None], "label": [["x"], ["y", "z"], ["w"]], "level": [1, 2, 3]}), path
    )
    source = HFDatasetSource(
        str(path),
        prompt_column="text",
        answer_column="label",
        metadata_columns=["level"],
        load_kwargs={"cache_dir": str(tmp_path / "cache")},
    )
    with pytest.warns(UserWarning, match=r"row 2: skipped, null value in column\(s\) \['text'\]"):
        records = list(source)
    assert [(r.prompt, r.answers, r.metadata["level"], r.metadata["row"]) for r in records] == [
        ("p0", ("x",), 1, 0),
        ("p1", ("y", "z"), 2, 1),
    ]
    assert records[0].task == "hf_dataset"


def test_hf_dataset_wrong_column_names_the_available_ones(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["p0"], "label": ["x"]}), path)
    source = HFDatasetSource(str(path), load_kwargs={"cache_dir": str(tmp_path / "cache")})
    with pytest.raises(KeyError, match=r"no column\(s\) \['prompt', 'answer'\].*\['text', 'label'\]"):
        iter(source)


def test_hf_dataset_without_usable_rows_fails_clearly(tmp_path):
    path = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"prompt": pa.array([None], pa.string()), "answer": ["x"]}), path)
    source = HFDatasetSource(str(path), load_kwargs={"cache_dir": str(tmp_path / "cache")})
    with pytest.warns(UserWarning, match="row 0"), pytest.raises(EmptySourceError, match="blank.parquet"):
        next(iter(source))


def test_sources_build_from_lightning_cli_style_config(tmp_path):
    """A DataModule typed ``source: PromptSource`` gets any source from class_path / init_args, no registry."""
    from jsonargparse import ArgumentParser

    path = _write_lines(tmp_path / "d.jsonl", [json.dumps({"q": "hi", "a": "yo"})])
    parser = ArgumentParser()
    parser.add_argument("--source", type=PromptSource)
    config = parser.parse_object(
        {
            "source": {
                "class_path": "longact_lightning.data.sources.JsonlSource",
                "init_args": {"path": str(path), "prompt_column": "q", "answer_column": "a"},
            }
        }
    )
    source = parser.instantiate_classes(config).source
    assert isinstance(source, JsonlSource)
    assert [r.answers for r in source] == [("yo",)]
    ruler = parser.instantiate_classes(
        parser.parse_object(
            {
                "source": {
                    "class_path": "longact_lightning.data.ruler.RulerSource",
                    "init_args": {"task": "vt", "target_length": 1024, "tokenizer": "smollm2-135m-instruct"},
                }
            }
        )
    ).source
    assert (ruler.task, ruler.target_length, ruler.tokenizer) == ("vt", 1024, "smollm2-135m-instruct")
