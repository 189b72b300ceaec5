"""Arrow IPC files: how every stage writes its rows and reads its input (memory-mapped)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

SHARD_GLOB = "shard-*.arrow"


def write_table(path: str | Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_table(path: str | Path) -> pa.Table:
    # Memory-mapped: reading a stage's output costs no copy, so reuse is near free.
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()


def write_shards(directory: str | Path, table: pa.Table, rows_per_shard: int) -> list[str]:
    """Split `table` into `shard-00000.arrow`, ... of at most `rows_per_shard` rows each."""
    directory = Path(directory)
    names = []
    for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        name = f"shard-{index:05d}.arrow"
        write_table(directory / name, table.slice(start, rows_per_shard))
        names.append(name)
    return names


def shard_paths(directory: str | Path) -> list[Path]:
    paths = sorted(Path(directory).glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(f"no {SHARD_GLOB} files in {directory}")
    return paths


def read_shards(directory: str | Path) -> pa.Table:
    return pa.concat_tables([read_table(p) for p in shard_paths(directory)])
