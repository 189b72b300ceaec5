"""Raw data sources → the raw table (`row_id`, `source`, `record` as JSON, `error`).

Local JSON/JSONL are parsed record by record so that one malformed line becomes a reject
naming its file and line instead of failing the whole load (as `datasets`' loader would).
CSV and Parquet go through pyarrow; hub names through `datasets.load_dataset`, at the commit
their revision named when planned.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import inspect
import io
import json
import os
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import pyarrow as pa

from trainer.core.config import DataConfig, EvalConfig, SourceConfig
from trainer.data.shards import SourceShard, file_shard, jsonl_shards

RAW_SCHEMA = pa.schema([
    ("row_id", pa.int64()),
    ("source", pa.string()),
    ("record", pa.string()),
    ("error", pa.string()),
])

_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class SourceError(ValueError):
    pass


class RawJson(NamedTuple):
    """A record parsed from a JSON line, with the line's text."""

    text: str
    value: Any


def resolve_files(source: SourceConfig, base_dir: str | Path) -> list[Path]:
    """The files the source's patterns match, in order; each file once (two patterns that match
    the same file would read its rows twice: an error naming both)."""
    patterns = [source.path] if isinstance(source.path, str) else list(source.path or [])
    files: list[Path] = []
    matched_by: dict[str, str] = {}  # the file's real path -> the pattern that matched it first
    for pattern in patterns:
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else Path(base_dir) / full
        matched = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        if not matched:
            raise SourceError(f"{source.key}.path: no file matches {pattern!r} (looked in {full})")
        for path in matched:
            real = os.path.realpath(path)
            if real in matched_by:
                raise SourceError(f"{source.key}.path: {path} is matched by both {matched_by[real]!r} and {pattern!r}: "
                                  "its rows would be read twice; list each file once")
            matched_by[real] = pattern
        files.extend(matched)
    return files


def check_held_out_files(train: SourceConfig, held_out: SourceConfig, base_dir: str | Path) -> None:
    """A held-out source must not read a file the train source reads: its scores would be of rows
    the model was trained on."""
    if not (train.path and held_out.path):
        return
    trained = {os.path.realpath(p) for p in resolve_files(train, base_dir)}
    hint = " (data.eval.fraction holds rows of one source out)" if train.key == "data.source" else ""
    for path in resolve_files(held_out, base_dir):
        if os.path.realpath(path) in trained:
            raise SourceError(f"{held_out.key}.path: {path} is also a file of {train.key}.path: the held-out rows "
                              f"would be trained on{hint}")


def _file_format(path: Path, source: SourceConfig) -> str:
    if source.file_format:
        return source.file_format
    for suffix in reversed(path.suffixes):
        if suffix.lower() in _FORMATS:
            return _FORMATS[suffix.lower()]
    raise SourceError(f"{path}: cannot tell the format from the extension; set {source.key}.file_format")


def plan_shards(source: SourceConfig, base_dir: str | Path, rows_per_shard: int) -> list[SourceShard]:
    """The source's shards in reading order: a file each, a JSONL file every `rows_per_shard`
    lines, one for a hub split or a generated dataset."""
    if source.path:
        shards = []
        for path in resolve_files(source, base_dir):
            fmt = _file_format(path, source)
            if fmt not in ("json", "jsonl", "csv", "parquet"):
                raise SourceError(f"{path}: unsupported file_format {fmt!r} (json, jsonl, csv, parquet)")
            shards.extend(jsonl_shards(path, rows_per_shard) if fmt == "jsonl" else [file_shard(path, fmt)])
        return shards
    if source.hub:
        # Keyed by the commit, not the ref: a branch moves upstream under the same name.
        commit = hub_commit(source)
        coordinates = {"hub": source.hub, "config": source.hub_config, "split": source.split, "commit": commit}
        return [SourceShard(f"{source.hub}@{commit}", _digest(coordinates), file_format="hub", commit=commit)]
    from trainer.data import default_data

    if source.builtin not in default_data.BUILTIN_DATASETS:
        raise SourceError(f"{source.key}.builtin: unknown builtin dataset {source.builtin!r} "
                          f"(known: {', '.join(repr(k) for k in default_data.BUILTIN_DATASETS)})")
    code = hashlib.sha256(inspect.getsource(default_data).encode()).hexdigest()[:16]
    coordinates = {"builtin": source.builtin, "split": source.split, "rows": source.rows, "seed": source.seed,
                   "generator_code": code}
    return [SourceShard(f"builtin:{source.builtin}", _digest(coordinates), file_format="builtin")]


def hub_commit(source: SourceConfig, cache_dir: str | Path | None = None) -> str:
    """The commit `source.revision` (default: main) names (`trainer.core.identity.hub_commit`)."""
    from trainer.core.identity import IdentityError
    from trainer.core.identity import hub_commit as resolve

    try:
        return resolve(source.hub, source.revision, "dataset", cache_dir=cache_dir)
    except IdentityError as e:
        raise SourceError(f"{source.key}.hub {source.hub!r}: {e}") from None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def source_fingerprint(source: SourceConfig, base_dir: str | Path,
                       rows_per_shard: int = DataConfig.source_rows_per_shard) -> dict[str, Any]:
    return shards_fingerprint(source, plan_shards(source, base_dir, rows_per_shard))


def shards_fingerprint(source: SourceConfig, shards: list[SourceShard]) -> dict[str, Any]:
    """What identifies the source's records: its shards' bytes (file contents, hub coordinates,
    generator code), and the `where` selecting among them (absent when unset)."""
    selection = {"where": source.where} if source.where else {}
    return {"shards": [s.fingerprint() for s in shards], "file_format": source.file_format, **selection}


def _jsonl_records(shard: SourceShard) -> Iterator[tuple[str, Any, str | None]]:
    """The records of a JSONL shard (its byte range), each with its file and line."""
    name = Path(shard.path).name
    digest = hashlib.sha256()
    with open(shard.path, "rb") as f:
        f.seek(shard.start)
        position, lineno = shard.start, shard.first_line - 1
        while position < shard.end:
            raw = f.readline(shard.end - position)
            if not raw:
                break
            digest.update(raw)
            position += len(raw)
            lineno += 1
            if lineno == 1:  # a byte-order mark (Windows tools write one) starts the file, not its first record
                raw = raw.removeprefix(codecs.BOM_UTF8)
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, None, f"invalid UTF-8 (column {e.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, None, f"invalid JSON: {e.msg} (column {e.colno})"
                continue
            # Keep the line as it is: re-serialising every record would cost as much as parsing.
            yield where, RawJson(line.rstrip("\r\n"), record), None
    if digest.hexdigest() != shard.digest:
        # The rows would be stored under the key of bytes they are not made of.
        raise SourceError(f"{shard.path}: lines {shard.label.rsplit(':', 1)[1]} changed while being prepared; run again")


def _keyed_bytes(shard: SourceShard) -> bytes:
    """The file's bytes, read once and checked against the digest it was planned (keyed) with:
    parsed from these, no second read can differ from what the key names."""
    data = Path(shard.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != shard.digest:
        raise SourceError(f"{shard.path}: changed while being prepared; run again")
    return data


def _json_records(path: Path, raw: bytes) -> Iterator[tuple[str, Any, str | None]]:
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte-order mark before the JSON is not JSON
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else f"byte {e.start}: not UTF-8"
        raise SourceError(f"{path}: invalid JSON at {where}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    for index, item in enumerate(data):
        yield f"{path.name}[{index}]", item, None


# Python's csv refuses fields over 131,072 characters by default; a long document is one field.
_CSV_FIELD_LIMIT = 2**31 - 1
# What surrogateescape decodes a byte that is not UTF-8 to (valid UTF-8 never decodes to these).
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _one_line(text: Any) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _csv_records(path: Path, data: bytes) -> Iterator[tuple[str, Any, str | None]]:
    """A CSV file's rows; a row with bytes that are not UTF-8 is a reject naming its field and line,
    a file the csv module cannot parse fails naming the line."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    # Decoded as read; a byte that is not UTF-8 is kept (as a lone surrogate) for the row's check.
    # utf-8-sig: a byte-order mark (as Excel writes) is not part of the first column's name.
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="surrogateescape", newline="")
    # Every CSV field is text: type inference would turn a completion " 4" into the int 4.
    reader = csv.DictReader(text)
    try:
        if any(_NOT_UTF8.search(name) for name in reader.fieldnames or []):
            raise SourceError(f"{path}:{reader.line_num}: invalid UTF-8 in the header row")
        for index, item in enumerate(reader):
            bad = _not_utf8_field(item)
            if bad:
                yield f"{path.name}[{index}]", None, f"invalid UTF-8 in {bad} (line {reader.line_num})"
            else:
                yield f"{path.name}[{index}]", item, None
    except csv.Error as e:
        raise SourceError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None


def _not_utf8_field(item: dict) -> str | None:
    """Which field of a CSV row holds bytes that were not UTF-8 (None: none does)."""
    for name, value in item.items():
        values = value if isinstance(value, list) else [value]  # the fields past the header's columns
        if any(isinstance(v, str) and _NOT_UTF8.search(v) for v in values):
            return f"field {name!r}" if name is not None else "a field past the header's columns"
    return None


def _parquet_records(path: Path, data: bytes) -> Iterator[tuple[str, Any, str | None]]:
    """A Parquet file's rows; a string that is not UTF-8 is a reject of its row, a file pyarrow
    cannot read fails naming the file (and the first row it could not read)."""
    import pyarrow.parquet as pq

    index = 0
    try:
        # The file's bytes are in memory; its rows are decoded a batch at a time.
        for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=4096):
            try:
                items = batch.to_pylist()
            except UnicodeDecodeError:
                items = [_parquet_row(batch, i) for i in range(batch.num_rows)]
            for item in items:
                if isinstance(item, _BadColumn):
                    yield f"{path.name}[{index}]", None, f"invalid UTF-8 in column {item.name!r}"
                else:
                    yield f"{path.name}[{index}]", item, None
                index += 1
    except (pa.ArrowException, OSError) as e:
        where = f" (at row {index})" if index else ""
        raise SourceError(f"{path}: not a readable Parquet file{where}: {_one_line(e)}") from None


class _BadColumn(NamedTuple):
    name: str


def _parquet_row(batch: pa.RecordBatch, i: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError:
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                column[i].as_py()
            except UnicodeDecodeError:
                return _BadColumn(name)
        raise


def _table_records(path: Path, fmt: str, data: bytes) -> Iterator[tuple[str, Any, str | None]]:
    yield from (_csv_records(path, data) if fmt == "csv" else _parquet_records(path, data))


def _hub_records(source: SourceConfig, commit: str | None) -> Iterator[tuple[str, Any, str | None]]:
    import datasets

    ds = datasets.load_dataset(source.hub, source.hub_config, split=source.split, revision=commit)
    for index, item in enumerate(ds):
        yield f"{source.hub}[{index}]", item, None


def _builtin_records(source: SourceConfig) -> Iterator[tuple[str, Any, str | None]]:
    from trainer.data import default_data

    generate = default_data.BUILTIN_DATASETS.get(source.builtin)
    if generate is None:
        raise SourceError(f"{source.key}.builtin: unknown builtin dataset {source.builtin!r} "
                          f"(known: {', '.join(repr(k) for k in default_data.BUILTIN_DATASETS)})")
    split = source.split if source.split in ("train", "test") else "train"
    default_rows = default_data.DEFAULT_TRAIN_ROWS if split == "train" else default_data.DEFAULT_TEST_ROWS
    for index, item in enumerate(generate(split, source.rows or default_rows, seed=source.seed)):
        yield f"{source.builtin}/{split}[{index}]", item, None


def shard_records(shard: SourceShard, source: SourceConfig) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (where, record, error) of one shard, in a stable order."""
    fmt = shard.file_format
    if fmt == "jsonl":
        yield from _jsonl_records(shard)
    elif fmt == "json":
        yield from _json_records(Path(shard.path), _keyed_bytes(shard))
    elif fmt in ("csv", "parquet"):
        yield from _table_records(Path(shard.path), fmt, _keyed_bytes(shard))
    elif fmt == "hub":
        yield from _hub_records(source, shard.commit)
    else:
        yield from _builtin_records(source)


def is_held_out(text: str, holdout: EvalConfig) -> bool:
    """Whether a record belongs to the eval split carved out of its source: a seeded hash of the
    record's text below `fraction`. Decided per record, so a grown source keeps every earlier
    record on its side (and a duplicated record on one side: no eval row is also trained on)."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=holdout.seed.to_bytes(8, "little", signed=True)
                        .ljust(16, b"\0"))
    return int.from_bytes(h.digest(), "little") < holdout.fraction * 2**64


@dataclass
class RawCounts:
    records: int = 0  # rows numbered in the shard (the selected ones, malformed included), both sides
    not_selected: int = 0  # well-formed records `where` left out
    selected: int = 0  # well-formed records it kept, both sides


def raw_batches(source: SourceConfig, shard: SourceShard, holdout: EvalConfig | None, side: str,
                counts: RawCounts, batch_rows: int) -> Iterator[pa.Table]:
    """The shard's raw table (RAW_SCHEMA) in batches, its rows numbered from 0; with `holdout`,
    only the train or eval side (malformed records are rejects of the train side)."""
    carve = holdout is not None and holdout.fraction > 0
    columns: tuple[list, list, list, list] = ([], [], [], [])
    for where, record, error in shard_records(shard, source):
        text = None
        if isinstance(record, RawJson):
            text, record = record.text, record.value
        if error is None and not isinstance(record, dict):
            record, error = None, f"expected a JSON object, got {type(record).__name__}"
        if error is None and source.where and not source.selects(record):
            counts.not_selected += 1
            continue
        row_id = counts.records
        counts.records += 1
        counts.selected += error is None
        if record is not None and text is None:
            text = json.dumps(record, ensure_ascii=False, default=str)
        if carve and (error is None and is_held_out(text, holdout)) != (side == "eval"):
            continue
        for column, value in zip(columns, (row_id, where, text if record is not None else None, error)):
            column.append(value)
        if len(columns[0]) >= batch_rows:
            yield _raw_table(columns)
            columns = ([], [], [], [])
    yield _raw_table(columns)


def _raw_table(columns: tuple[list, list, list, list]) -> pa.Table:
    return pa.table([pa.array(c, t.type) for c, t in zip(columns, RAW_SCHEMA)], schema=RAW_SCHEMA)


def build_raw_table(source: SourceConfig, base_dir: str | Path, holdout: EvalConfig | None = None,
                    side: str = "train", rows_per_shard: int = DataConfig.source_rows_per_shard) -> tuple[pa.Table, int]:
    """The whole source's raw table in memory, rows numbered over all its shards (for small
    sources and tests; the raw stage writes shard by shard). Also returns how many well-formed
    records the source's `where` left out."""
    import pyarrow.compute as pc  # here, not at import: a cached preparation never needs it

    tables, base, not_selected, selected = [], 0, 0, 0
    for shard in plan_shards(source, base_dir, rows_per_shard):
        counts = RawCounts()
        for table in raw_batches(source, shard, holdout, side, counts, batch_rows=1 << 30):
            tables.append(table.set_column(0, "row_id", pc.add(table.column("row_id"), base)))
        base += counts.records
        not_selected += counts.not_selected
        selected += counts.selected
    check_selection(source, selected, not_selected)
    return pa.concat_tables(tables) if tables else _raw_table(([], [], [], [])), not_selected


def check_selection(source: SourceConfig, selected: int, not_selected: int) -> None:
    """A `where` that keeps nothing is one clear line, not an empty dataset."""
    if source.where and not_selected and not selected:
        raise SourceError(f"{source.key}.where: no record matches {source.where} ({not_selected} records read)")
