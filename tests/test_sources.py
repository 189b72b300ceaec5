"""Local sources: JSON, JSONL, CSV and Parquet files by glob, each record kept with where it came from."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from trainer.core.config import EvalConfig, SourceConfig
from trainer.data.sources import SourceError, build_raw_table, check_held_out_files, source_fingerprint

ROWS = [{"prompt": f"What is {i} + 1?\nAnswer:", "completion": f" {i + 1}"} for i in range(6)]


def records(table):
    return [json.loads(r) for r in table.column("record").to_pylist()]


def test_every_file_format_and_globs(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    (tmp_path / "b.json").write_text(json.dumps(ROWS[2:3]))
    pacsv.write_csv(pa.Table.from_pylist(ROWS[3:5]), tmp_path / "c.csv")
    pq.write_table(pa.Table.from_pylist(ROWS[5:]), tmp_path / "d.parquet")
    table, _ = build_raw_table(SourceConfig(path=["*.jsonl", "*.json", "*.csv", "*.parquet"]), tmp_path)
    assert records(table) == ROWS
    assert table.column("row_id").to_pylist() == list(range(6))
    assert table.column("source").to_pylist() == ["a.jsonl:1", "a.jsonl:2", "b.json[0]", "c.csv[0]", "c.csv[1]",
                                                  "d.parquet[0]"]
    assert table.column("error").null_count == 6


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_at_the_start_of_a_file_is_not_data(tmp_path, fmt):
    """Windows tools (Excel's "CSV UTF-8", Notepad) start UTF-8 files with a byte-order mark: the
    file reads as the same records as without it (CRLF line ends too), the mark in no record,
    field name or reject; its bytes still count in the key."""
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    for folder in (plain, marked):
        folder.mkdir()
        path = folder / f"rows.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\r\n" for r in ROWS), newline="")
        elif fmt == "json":
            path.write_text(json.dumps(ROWS))
        else:
            pacsv.write_csv(pa.Table.from_pylist(ROWS), path)
    (marked / f"rows.{fmt}").write_bytes(b"\xef\xbb\xbf" + (plain / f"rows.{fmt}").read_bytes())
    tables = [build_raw_table(SourceConfig(path=f"rows.{fmt}"), folder)[0] for folder in (plain, marked)]
    assert records(tables[1]) == records(tables[0]) == ROWS
    assert tables[1].column("error").null_count == len(ROWS)
    assert source_fingerprint(SourceConfig(path=f"rows.{fmt}"), marked) != \
        source_fingerprint(SourceConfig(path=f"rows.{fmt}"), plain)


@pytest.mark.parametrize("patterns, first, second", [
    (["a.jsonl", "*.jsonl"], "a.jsonl", "*.jsonl"),
    (["a.jsonl", "a.jsonl"], "a.jsonl", "a.jsonl"),
    (["a.jsonl", "./sub/../a.jsonl"], "a.jsonl", "./sub/../a.jsonl"),
    (["a.jsonl", "link.jsonl"], "a.jsonl", "link.jsonl"),  # another name of the same file
], ids=["glob", "twice", "another path", "link"])
def test_a_file_two_patterns_match_is_an_error_not_its_rows_twice(tmp_path, patterns, first, second):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    with pytest.raises(SourceError, match=f"data.source.path: .* is matched by both '{re.escape(first)}' and "
                                          f"'{re.escape(second)}': its rows would be read twice"):
        build_raw_table(SourceConfig(path=patterns), tmp_path)
    table, _ = build_raw_table(SourceConfig(path=["a.jsonl"]), tmp_path)
    assert records(table) == ROWS


def test_a_held_out_source_sharing_a_file_with_the_train_source_is_an_error(tmp_path):
    for name in ("train.jsonl", "more.jsonl", "held.jsonl"):
        (tmp_path / name).write_text(json.dumps(ROWS[0]) + "\n")
    train = SourceConfig(path=["train.jsonl", "more.jsonl"])
    held_out = SourceConfig(path=["held.jsonl", "./more.jsonl"])
    held_out.key = "data.eval.source"
    with pytest.raises(SourceError, match=r"data.eval.source.path: .*more.jsonl is also a file of data.source.path"):
        check_held_out_files(train, held_out, tmp_path)
    check_held_out_files(train, SourceConfig(path="held.jsonl"), tmp_path)  # disjoint: fine
    check_held_out_files(SourceConfig(builtin="default"), held_out, tmp_path)  # no files to share

    # A preparation without the command (a library user, a Dagster step) checks it too.
    from trainer.core.config import experiment_from_dict
    from trainer.data.prepare import DataPipeline

    exp = experiment_from_dict({"name": "x", "store": "store", "data": {
        "source": {"path": ["train.jsonl", "more.jsonl"]}, "eval": {"source": {"path": "more.jsonl"}}}},
        base_dir=tmp_path)
    with pytest.raises(SourceError, match="data.eval.source.path: .*more.jsonl is also a file of data.source.path"):
        DataPipeline(exp, progress=False).shards("eval")
    # The loop's prompts come through the eval split, and may be the train prompts: not held out.
    assert len(DataPipeline(exp, progress=False, eval_held_out=False).shards("eval")) == 1


def test_malformed_lines_are_kept_as_errors_with_their_line(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(ROWS[0]) + "\n{broken\n\n[1, 2]\n" + json.dumps(ROWS[1]) + "\n")
    table, _ = build_raw_table(SourceConfig(path="x.jsonl"), tmp_path)
    assert table.num_rows == 4  # the blank line is not a row
    errors = table.column("error").to_pylist()
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("invalid JSON") and table.column("source")[1].as_py() == "x.jsonl:2"
    assert "expected a JSON object, got list" in errors[2]


def test_missing_files_and_unknown_formats_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="no file matches 'nothing/\\*.jsonl'"):
        build_raw_table(SourceConfig(path="nothing/*.jsonl"), tmp_path)
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(SourceError, match="cannot tell the format"):
        build_raw_table(SourceConfig(path="data.txt"), tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SourceError, match="invalid JSON"):
        build_raw_table(SourceConfig(path="bad.json"), tmp_path)


def test_fingerprint_follows_file_content_not_name_or_time(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    source = SourceConfig(path="a.jsonl")
    before = source_fingerprint(source, tmp_path)
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")  # rewritten, same bytes
    assert source_fingerprint(source, tmp_path) == before
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    assert source_fingerprint(source, tmp_path) != before


def test_holdout_is_seeded_per_record_disjoint_and_stable_when_the_source_grows(tmp_path):
    rows = [json.dumps({"text": str(i)}) + "\n" for i in range(3000)]
    (tmp_path / "a.jsonl").write_text("".join(rows[:2000]))
    holdout = EvalConfig(fraction=0.1, seed=3)

    def sides(rows_per_shard=50_000):
        train, _ = build_raw_table(SourceConfig(path="a.jsonl"), tmp_path, holdout, "train", rows_per_shard)
        held, _ = build_raw_table(SourceConfig(path="a.jsonl"), tmp_path, holdout, "eval", rows_per_shard)
        return set(train.column("row_id").to_pylist()), set(held.column("row_id").to_pylist())

    train, held = sides()
    assert not train & held and train | held == set(range(2000))
    assert 140 < len(held) < 260  # ~10% (binomial, sd ~13)
    assert sides(rows_per_shard=300) == (train, held)  # the same rows however the source is cut
    # Another process (another hash seed) holds out the same rows: the key names only fraction and seed.
    code = ("import sys; from trainer.core.config import EvalConfig, SourceConfig; "
            "from trainer.data.sources import build_raw_table; "
            "t, _ = build_raw_table(SourceConfig(path='a.jsonl'), sys.argv[1], EvalConfig(fraction=0.1, seed=3), 'eval'); "
            "print(t.column('row_id').to_pylist())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONHASHSEED": "7"})
    assert set(json.loads(out.stdout)) == held
    other_seed, _ = build_raw_table(SourceConfig(path="a.jsonl"), tmp_path, EvalConfig(fraction=0.1, seed=4), "eval")
    assert set(other_seed.column("row_id").to_pylist()) != held
    # Appending rows leaves every earlier row on its side; a record appended twice sits on one side.
    (tmp_path / "a.jsonl").write_text("".join(rows) + rows[5] + rows[7])
    grown_train, grown_held = sides(rows_per_shard=700)
    assert grown_held & set(range(2000)) == held and grown_train & set(range(2000)) == train
    assert (3000 in grown_held) == (5 in held) and (3001 in grown_held) == (7 in held)


def test_where_keeps_the_matching_records_and_counts_the_rest(tmp_path):
    rows = [{"text": str(i), "task": ["add", "upper", "reverse"][i % 3]} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    table, not_selected = build_raw_table(SourceConfig(path="a.jsonl", where={"task": "add"}), tmp_path)
    kept = [r for r in rows if r["task"] == "add"]
    assert records(table.filter(table.column("error").is_null())) == kept
    assert table.column("row_id").to_pylist() == list(range(len(kept) + 1))  # + the malformed line, a reject
    assert not_selected == len(rows) - len(kept)
    table, not_selected = build_raw_table(SourceConfig(path="a.jsonl", where={"task": ["add", "upper"]}), tmp_path)
    assert table.num_rows - 1 == 20 and not_selected == 10
    # A missing field never matches; no match at all is one clear line, not an empty dataset.
    with pytest.raises(SourceError, match=r"data.source.where: no record matches \{'tsak': 'add'\} \(30 records"):
        build_raw_table(SourceConfig(path="a.jsonl", where={"tsak": "add"}), tmp_path)


def test_where_on_the_builtin_source_and_in_the_key(tmp_path):
    from trainer.data import default_data

    source = SourceConfig(builtin="default", rows=300, where={"task": "add"})
    table, not_selected = build_raw_table(source, tmp_path)
    generated = default_data.generate("train", 300)
    assert records(table) == [r for r in generated if r["task"] == "add"]
    assert table.num_rows + not_selected == 300
    plain = SourceConfig(builtin="default", rows=300)
    assert "where" not in source_fingerprint(plain, tmp_path)  # keys without a selection are unchanged
    assert source_fingerprint(source, tmp_path) == {**source_fingerprint(plain, tmp_path), "where": {"task": "add"}}


def test_where_must_be_a_mapping():
    from trainer.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.source.where: expected a mapping"):
        SourceConfig(builtin="default", where={}).validate("data.source")


def test_source_errors_name_the_key_the_source_was_read_from(tmp_path):
    """The same mistake under data.eval.source or loop.prompts.source names that key, not data.source."""
    from trainer.loop.settings import parse_loop

    (tmp_path / "a.jsonl").write_text('{"task": "add"}\n')
    held_out = SourceConfig(path="a.jsonl", where={"task": "upper"})
    held_out.validate("data.eval.source")
    with pytest.raises(SourceError, match=r"^data\.eval\.source\.where: no record matches"):
        build_raw_table(held_out, tmp_path)
    prompts = parse_loop({"prompts": {"source": {"path": "missing/*.jsonl"}}}, tmp_path).prompts.source
    with pytest.raises(SourceError, match=r"^loop\.prompts\.source\.path: no file matches 'missing/\*\.jsonl'"):
        build_raw_table(prompts, tmp_path)
    prompts = parse_loop({"prompts": {"source": {"builtin": "gsm8k"}}}, tmp_path).prompts.source
    with pytest.raises(SourceError, match=r"^loop\.prompts\.source\.builtin: unknown builtin dataset 'gsm8k'"):
        build_raw_table(prompts, tmp_path)
