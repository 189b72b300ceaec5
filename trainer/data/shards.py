"""A source cut into shards: one per file, and a JSONL file every `data.source_rows_per_shard` lines.

Each shard is read, templated and tokenized on its own (in parallel processes) and keyed by its
own bytes: appending rows to the end of a JSONL file, or a file to a glob, leaves every earlier
shard's key as it was, so only the new or grown shards are prepared again. A shard is named by
its file and first line (what its rows' `source` column says), never by its position among the
files, so a file added before the others does not shift them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core.store import file_digest

# Read size while finding line boundaries and hashing a JSONL file.
_BLOCK = 1 << 24


@dataclass(frozen=True)
class SourceShard:
    # What a user reads in a reason or a progress line: "train.jsonl:1-50000", "data.csv", "builtin:default".
    label: str
    # sha256 of its bytes (a hub split or a generated dataset: of the coordinates that make it).
    digest: str
    path: str | None = None
    file_format: str | None = None
    # Byte range [start, end) of a JSONL shard and the line number of its first line.
    start: int = 0
    end: int | None = None
    first_line: int = 1

    def fingerprint(self) -> dict[str, Any]:
        """What its raw rows are made from: its bytes and where they are (the `source` column)."""
        return {"label": self.label, "digest": self.digest, "format": self.file_format, "first_line": self.first_line}


# Plans of JSONL files seen in this process, by (path, size, mtime, rows per shard): observing a
# source and preparing it both plan it, and a grown file is a new entry.
_PLANS: dict[tuple, list[SourceShard]] = {}


def jsonl_shards(path: Path, rows_per_shard: int) -> list[SourceShard]:
    """Cut a JSONL file every `rows_per_shard` lines, hashing each shard's bytes in one pass."""
    stat = os.stat(path)
    memo = (str(path), stat.st_size, stat.st_mtime_ns, rows_per_shard)
    if memo in _PLANS:
        return _PLANS[memo]
    shards: list[SourceShard] = []
    start, first_line, lines, offset = 0, 1, 0, 0
    digest = hashlib.sha256()

    def close(end: int, last_line: int) -> None:
        shards.append(SourceShard(f"{path.name}:{first_line}-{last_line}", digest.hexdigest(), str(path), "jsonl",
                                  start, end, first_line))

    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            i = 0
            while True:
                need = rows_per_shard - lines
                if block.count(b"\n", i) < need:
                    lines += block.count(b"\n", i)
                    digest.update(block[i:])
                    break
                j = i
                for _ in range(need):
                    j = block.index(b"\n", j) + 1
                digest.update(block[i:j])
                close(offset + j, first_line + rows_per_shard - 1)
                start, first_line, lines, i = offset + j, first_line + rows_per_shard, 0, j
                digest = hashlib.sha256()
            offset += len(block)
    if offset > start:  # the last shard: fewer lines, or a last line without its newline
        with open(path, "rb") as f:
            f.seek(offset - 1)
            unterminated = f.read(1) != b"\n"
        close(offset, first_line + lines - 1 + unterminated)
    _PLANS[memo] = shards
    return shards


def file_shard(path: Path, file_format: str) -> SourceShard:
    return SourceShard(path.name, file_digest(path), str(path), file_format)
