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
from concurrent.futures import ThreadPoolExecutor
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
    # The dataset commit a hub shard is read at (also in its label and digest).
    commit: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What its raw rows are made from: its bytes and where they are (the `source` column)."""
        return {"label": self.label, "digest": self.digest, "format": self.file_format, "first_line": self.first_line}


# Plans of JSONL files seen in this process, by (path, size, mtime, rows per shard): observing a
# source and preparing it both plan it, and a grown file is a new entry.
_PLANS: dict[tuple, list[SourceShard]] = {}


def jsonl_shards(path: Path, rows_per_shard: int) -> list[SourceShard]:
    """Cut a JSONL file every `rows_per_shard` lines and hash each shard's bytes (in threads:
    hashlib lets go of the GIL, so the cores share a large file)."""
    stat = os.stat(path)
    memo = (str(path), stat.st_size, stat.st_mtime_ns, rows_per_shard)
    if memo not in _PLANS:
        ranges = _line_ranges(path, rows_per_shard)
        with ThreadPoolExecutor(max(1, min(len(ranges), os.cpu_count() or 1))) as pool:
            digests = list(pool.map(lambda r: _digest(path, r[0], r[1]), ranges))
        _PLANS[memo] = [SourceShard(f"{path.name}:{first}-{last}", digest, str(path), "jsonl", start, end, first)
                        for (start, end, first, last), digest in zip(ranges, digests)]
    return _PLANS[memo]


def _line_ranges(path: Path, rows_per_shard: int) -> list[tuple[int, int, int, int]]:
    """(start byte, end byte, first line, last line) of every `rows_per_shard` lines."""
    ranges = []
    start, first_line, lines, offset = 0, 1, 0, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            i = 0
            while block.count(b"\n", i) >= rows_per_shard - lines:
                for _ in range(rows_per_shard - lines):
                    i = block.index(b"\n", i) + 1
                ranges.append((start, offset + i, first_line, first_line + rows_per_shard - 1))
                start, first_line, lines = offset + i, first_line + rows_per_shard, 0
            lines += block.count(b"\n", i)
            offset += len(block)
            last_byte = block[-1:]
    if offset > start:  # the last shard: fewer lines, or a last line without its newline
        ranges.append((start, offset, first_line, first_line + lines - 1 + (last_byte != b"\n")))
    return ranges


def _digest(path: Path, start: int, end: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while start < end and (block := f.read(min(_BLOCK, end - start))):
            digest.update(block)
            start += len(block)
    return digest.hexdigest()


def file_shard(path: Path, file_format: str) -> SourceShard:
    return SourceShard(path.name, file_digest(path), str(path), file_format)
