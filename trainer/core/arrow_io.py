"""Arrow IPC files: how every stage writes its rows and reads its input (memory-mapped)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa

SHARD_GLOB = "shard-*.arrow"


def write_table(path: str | Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


class BatchWriter:
    """Writes a table to an Arrow IPC file one record batch at a time, so a stage's memory is
    set by its batch, not by its output. Counts the rows written."""

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.schema = schema
        self.rows = 0
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if table.num_rows:
            self._writer.write(table)
            self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> "BatchWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_batches(path: str | Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC file, read one at a time (not memory-mapped: pages of
    a mapped file stay resident while it is open, so memory would grow with the file)."""
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)


def read_table(path: str | Path) -> pa.Table:
    # Memory-mapped: reading a stage's output costs no copy, so reuse is near free.
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()


def shard_paths(directory: str | Path) -> list[Path]:
    paths = sorted(Path(directory).glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(f"no {SHARD_GLOB} files in {directory}")
    return paths


def read_shards(directory: str | Path) -> pa.Table:
    return pa.concat_tables([read_table(p) for p in shard_paths(directory)])
