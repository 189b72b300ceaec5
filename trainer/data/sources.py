"""Raw data sources → the raw table (`row_id`, `source`, `record` as JSON, `error`).

Local JSON/JSONL are parsed record by record so that one malformed line becomes a reject
naming its file and line instead of failing the whole load (as `datasets`' loader would).
CSV and Parquet go through pyarrow; hub names through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from trainer.core.config import EvalConfig, SourceConfig
from trainer.core.store import file_digest

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
    patterns = [source.path] if isinstance(source.path, str) else list(source.path or [])
    files: list[Path] = []
    for pattern in patterns:
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else Path(base_dir) / full
        matched = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        if not matched:
            raise SourceError(f"{source.key}.path: no file matches {pattern!r} (looked in {full})")
        files.extend(matched)
    return files


def _file_format(path: Path, source: SourceConfig) -> str:
    if source.file_format:
        return source.file_format
    for suffix in reversed(path.suffixes):
        if suffix.lower() in _FORMATS:
            return _FORMATS[suffix.lower()]
    raise SourceError(f"{path}: cannot tell the format from the extension; set {source.key}.file_format")


def source_fingerprint(source: SourceConfig, base_dir: str | Path) -> dict[str, Any]:
    """What identifies the source's records: file contents, hub coordinates, or generator code,
    and the `where` selecting among them (absent when unset: those keys stay as they were)."""
    selection = {"where": source.where} if source.where else {}
    return {**_bytes_fingerprint(source, base_dir), **selection}


def _bytes_fingerprint(source: SourceConfig, base_dir: str | Path) -> dict[str, Any]:
    if source.path:
        return {"files": [[p.name, file_digest(p)] for p in resolve_files(source, base_dir)],
                "file_format": source.file_format}
    if source.hub:
        return {"hub": source.hub, "config": source.hub_config, "split": source.split, "revision": source.revision}
    from trainer.data import default_data

    code = hashlib.sha256(inspect.getsource(default_data).encode()).hexdigest()[:16]
    return {"builtin": source.builtin, "split": source.split, "rows": source.rows, "seed": source.seed,
            "generator_code": code}


def _json_records(path: Path, fmt: str) -> Iterator[tuple[str, Any, str | None]]:
    name = path.name
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{name}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, None, f"invalid JSON: {e.msg} (column {e.colno})"
                    continue
                # Keep the line as it is: re-serialising every record would cost as much as parsing.
                yield where, RawJson(line.rstrip("\r\n"), record), None
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    for index, item in enumerate(data):
        yield f"{name}[{index}]", item, None


def _table_records(path: Path, fmt: str) -> Iterator[tuple[str, Any, str | None]]:
    if fmt == "csv":
        # Every CSV field is text: type inference would turn a completion " 4" into the int 4.
        with open(path, newline="", encoding="utf-8") as f:
            for index, item in enumerate(csv.DictReader(f)):
                yield f"{path.name}[{index}]", item, None
        return
    import pyarrow.parquet as pq

    for index, item in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path.name}[{index}]", item, None


def _hub_records(source: SourceConfig) -> Iterator[tuple[str, Any, str | None]]:
    import datasets

    ds = datasets.load_dataset(source.hub, source.hub_config, split=source.split, revision=source.revision)
    for index, item in enumerate(ds):
        yield f"{source.hub}[{index}]", item, None


def iter_records(source: SourceConfig, base_dir: str | Path) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (where, record, error) in a stable order."""
    if source.path:
        for path in resolve_files(source, base_dir):
            fmt = _file_format(path, source)
            if fmt in ("json", "jsonl"):
                yield from _json_records(path, fmt)
            elif fmt in ("csv", "parquet"):
                yield from _table_records(path, fmt)
            else:
                raise SourceError(f"{path}: unsupported file_format {fmt!r} (json, jsonl, csv, parquet)")
    elif source.hub:
        yield from _hub_records(source)
    else:
        from trainer.data import default_data

        generate = default_data.BUILTIN_DATASETS.get(source.builtin)
        if generate is None:
            raise SourceError(f"{source.key}.builtin: unknown builtin dataset {source.builtin!r} "
                              f"(known: {', '.join(repr(k) for k in default_data.BUILTIN_DATASETS)})")
        split = source.split if source.split in ("train", "test") else "train"
        default_rows = default_data.DEFAULT_TRAIN_ROWS if split == "train" else default_data.DEFAULT_TEST_ROWS
        for index, item in enumerate(generate(split, source.rows or default_rows, seed=source.seed)):
            yield f"{source.builtin}/{split}[{index}]", item, None


def holdout_mask(num_rows: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows held out for evaluation: a seeded, exact-size random choice."""
    mask = np.zeros(num_rows, dtype=bool)
    count = int(round(num_rows * fraction))
    if count:
        mask[np.random.default_rng(seed).choice(num_rows, size=count, replace=False)] = True
    return mask


def build_raw_table(source: SourceConfig, base_dir: str | Path, holdout: EvalConfig | None = None,
                    side: str = "train") -> tuple[pa.Table, int]:
    """Load a source into the raw table; with `holdout`, keep only the train or eval side of it.
    Also returns how many well-formed records the source's `where` left out."""
    wheres, records, errors = [], [], []
    not_selected = 0
    for where, record, error in iter_records(source, base_dir):
        text = None
        if isinstance(record, RawJson):
            text, record = record.text, record.value
        if error is None and not isinstance(record, dict):
            record, error = None, f"expected a JSON object, got {type(record).__name__}"
        if error is None and source.where and not source.selects(record):
            not_selected += 1
            continue
        wheres.append(where)
        if record is not None and text is None:
            text = json.dumps(record, ensure_ascii=False, default=str)
        records.append(text if record is not None else None)
        errors.append(error)
    row_ids = np.arange(len(records), dtype=np.int64)
    table = pa.table([pa.array(row_ids), pa.array(wheres, pa.string()), pa.array(records, pa.string()),
                      pa.array(errors, pa.string())], schema=RAW_SCHEMA)
    if holdout is not None and holdout.fraction > 0:
        mask = holdout_mask(table.num_rows, holdout.fraction, holdout.seed)
        table = table.filter(pa.array(mask if side == "eval" else ~mask))
    if source.where and not_selected and not any(r is not None for r in records):
        raise SourceError(f"{source.key}.where: no record matches {source.where} ({not_selected} records read)")
    return table, not_selected
