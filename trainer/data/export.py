"""The packed shards as a `datasets.Dataset`, so that other trainers (TRL's `SFTTrainer`, …) can
train on the cached shards.

    ds = packed_dataset("<store>/packed/<key>")   # the "shards" directory `sftdag prepare` prints
    ds.column_names                              # ['input_ids', 'labels', 'seq_lengths']

`labels` is −100 where no loss is taken (the first token of every document included) and
`seq_lengths` the lengths of the documents a row packs, which is what TRL's padding-free collator
reads to restart `position_ids` at each document (README: "Using the packed shards elsewhere").
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from trainer.core.arrow_io import read_shards, shard_paths

if TYPE_CHECKING:
    import datasets


def packed_dataset(directory: str | os.PathLike) -> "datasets.Dataset":
    """The rows of `directory`'s `shard-*.arrow` files, in order, as a `datasets.Dataset` whose
    Arrow buffers are the files' memory maps: nothing is read into memory or copied.

    `ds.cache_files` is empty: datasets transforms (`map`, `filter`) keep their results in memory
    unless given `cache_file_name`, and never write into the store. Pickling the dataset (e.g. for
    `map(num_proc=…)`) copies the rows it holds.
    """
    from datasets import Dataset
    from datasets.fingerprint import Hasher
    from datasets.table import InMemoryTable

    # Not `Dataset.from_file`: it reads the Arrow *stream* format (datasets' cache files), and the
    # shards are IPC *files*. Not `MemoryMappedTable` either: it would list the shards as cache
    # files, so `map` would write its caches into the store and pickling would reopen the shards as
    # streams, which fails. `InMemoryTable` only wraps the memory-mapped table (the name notwithstanding).
    table = read_shards(directory)
    # An explicit fingerprint: without one, datasets hashes the table's whole content to make one.
    # A stage directory is never modified in place, so its files' paths, sizes and times identify it.
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shard_paths(directory)]
    return Dataset(InMemoryTable(table), fingerprint=Hasher.hash(["sftdag packed shards", files]))
