"""Packing: tokenized rows → rows of at most `max_length` tokens with per-document `seq_lengths`.

Strategies
- ``bfd``: best-fit decreasing over the whole dataset (not per batch). Documents are sorted by
  length, longest first (stable: ties keep row order), and each goes into the open bin with the
  smallest remaining capacity that fits it, else into a new bin. The "smallest capacity ≥ length
  that has a bin" query is a max segment tree over capacities 1..max_length plus one stack of
  bin ids per capacity: O(n log L) for n documents.
- ``wrapped``: all documents concatenated in order and cut into rows of exactly ``max_length``
  (the last row shorter). A document cut at a row boundary continues in the next row; the first
  token of every row piece gets label −100 (under isolated attention it has no context).
- ``none``: one document per row.

Over-long rows (more than ``max_length`` tokens) are handled first, for every strategy:
``truncate`` keeps the first (``keep_start``) or last (``keep_end``) ``max_length`` tokens,
``split`` cuts them into consecutive pieces of at most ``max_length`` tokens (each its own
document), ``drop`` rejects them. The first token of every document has label −100 (no
context). Documents left with no trainable token are never written: a row none of whose
documents survive is a reject with its reason. ``rows_in == rows_out + len(rejects)`` always.
Every packed row has a trainable token: a wrapped row without one is dropped and counted
(``untrainable_rows_dropped``, ``untrainable_tokens_dropped``).

The output is built with numpy gathers over the flat Arrow buffers, never per token in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from trainer.core.arrow_io import iter_batches, write_table
from trainer.core.schemas import IGNORE_INDEX

STRATEGIES = ("bfd", "wrapped", "none")
# Output tokens gathered at a time by `pack_files` (ids and labels: 8 bytes each): its memory.
GATHER_TOKENS = 1 << 25
OVERLONG = ("truncate", "split", "drop")
TRUNCATE_SIDES = ("keep_start", "keep_end")

_LIST_I32 = pa.list_(pa.int32())


@dataclass
class PackResult:
    # input_ids list<int32>, labels list<int32>, seq_lengths list<int32>
    table: pa.Table
    # (row_id, reason), in input row order
    rejects: list[tuple[int, str]]
    counts: dict
    # lengths of the packed documents (after truncation / splitting), in input order
    doc_lengths: np.ndarray


def _flat_list(table: pa.Table | pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start offsets into values, lengths, values) of a list<int> column; null rows have length 0."""
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        # one chunk (a memory-mapped file): use it as is, combine_chunks would copy every token
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    arr = col
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise TypeError(f"column {name!r} must be a list of integers, got {arr.type}")
    if arr.type.value_type != pa.int32() or pa.types.is_large_list(arr.type):
        arr = arr.cast(_LIST_I32)
    if arr.values.null_count:
        raise ValueError(f"column {name!r} holds null tokens")
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths[arr.is_null().to_numpy(zero_copy_only=False)] = 0
    return offsets[:-1], lengths, values


def _bfd_bins(lengths: list[int], max_length: int, progress: bool = False) -> tuple[list[int], int]:
    """Best-fit bin for each length (already in packing order). Returns (bin ids, number of bins).

    Open bins are kept by remaining capacity: ``stacks[c]`` holds the ids of the bins with exactly
    ``c`` free slots, and a 64-ary bit tree over capacities 0..max_length answers "smallest
    capacity ≥ L that has a bin" in O(log_64 L) word operations. Level 0 has bit c set when
    ``stacks[c]`` is not empty; bit j of level h+1 is set when word j of level h is not zero.
    (A binary max segment tree gives the same bins; this is about twice as fast in Python.)
    """
    M = max_length
    sizes = []
    n = M + 1
    while True:  # one padding word per level, so "the next word" always exists
        w = (n >> 6) + 1
        sizes.append(w)
        if w == 1:
            break
        n = w
    levels = [[0] * s for s in sizes]
    H = len(levels)
    stacks: list[list[int]] = [[] for _ in range(M + 1)]
    bin_of = [0] * len(lengths)
    nbins = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(lengths), desc="bfd", unit="doc")
    step = 16384
    for k, L in enumerate(lengths):
        # successor query: climb until a word has a set bit at/after i, then descend leftmost
        c = -1
        h = 0
        i = L
        while h < H:
            j = i >> 6
            w = levels[h][j] >> (i & 63)
            if w:
                i += (w & -w).bit_length() - 1
                while h:
                    h -= 1
                    w = levels[h][i]
                    i = (i << 6) + (w & -w).bit_length() - 1
                c = i
                break
            i = j + 1
            h += 1
        if c >= 0:
            st = stacks[c]
            b = st.pop()
            if not st:  # no bin has capacity c any more: clear its bit (and emptied words above)
                i = c
                for lv in levels:
                    j = i >> 6
                    w = lv[j] & ~(1 << (i & 63))
                    lv[j] = w
                    if w:
                        break
                    i = j
        else:
            b = nbins
            nbins += 1
            c = M
        bin_of[k] = b
        nc = c - L
        if nc > 0:
            st = stacks[nc]
            st.append(b)
            if len(st) == 1:
                i = nc
                for lv in levels:
                    j = i >> 6
                    w = lv[j]
                    lv[j] = w | (1 << (i & 63))
                    if w:
                        break
                    i = j
        if bar is not None and k % step == step - 1:
            bar.update(step)
    if bar is not None:
        bar.update(len(lengths) - bar.n)
        bar.close()
    return bin_of, nbins


def _range_sums(flags: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """sum(flags[s:e]) of a boolean array for each (s, e); an empty or reversed range sums to 0."""
    n = len(flags)
    if n == 0:
        return np.zeros(len(starts), dtype=np.int64)
    # numpy's fast path: a boolean cumsum into a fresh int32 array (with out= it is ~10x slower)
    cumulative = np.cumsum(flags, dtype=np.int32 if n < 2**31 else np.int64)
    ends = np.minimum(ends, n)
    upper = np.where(ends > 0, cumulative[np.maximum(ends - 1, 0)], 0)
    lower = np.where(starts > 0, cumulative[np.maximum(starts - 1, 0)], 0)
    sums = upper.astype(np.int64) - lower
    sums[ends <= starts] = 0
    return sums


@dataclass
class _Documents:
    """The documents of the packed rows, in input order, and where their tokens are: part (a
    record batch of the input), offsets into that part's flat ids and labels."""

    part: np.ndarray
    src_ids: np.ndarray
    src_lab: np.ndarray
    length: np.ndarray


def trainable_after_first(labels: pa.ListArray | pa.ChunkedArray) -> np.ndarray:
    """Per row, the trainable tokens after its first (what packing asks of every whole document):
    the tokenized stage stores them beside its rows, so packing need not read the labels."""
    offsets, lengths, values = _flat_list(pa.table({"labels": labels}), "labels")
    return _range_sums(values != IGNORE_INDEX, offsets + 1, offsets + lengths).astype(np.int32)


def _part_documents(batch: pa.RecordBatch | pa.Table, row_ids: np.ndarray, M: int, overlong: str,
                    truncate_side: str, reasons: dict[int, str], counts: dict,
                    row_trainable: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray]:
    """(src_ids, src_lab, length, survived per row) of one part's documents that have a trainable
    token; a row with none, or malformed, gets its reason in `reasons` (by its row id).
    `row_trainable`: `trainable_after_first` of the rows, when known (then only the labels of
    rows longer than M are read)."""
    n = batch.num_rows
    ids_start, ids_len, _ = _flat_list(batch, "input_ids")
    lab_start, lab_len, lab_vals = _flat_list(batch, "labels")

    row_reasons: dict[int, str] = {}
    mismatch = ids_len != lab_len
    for i in np.flatnonzero(mismatch):
        row_reasons[int(i)] = f"input_ids and labels differ in length ({ids_len[i]} != {lab_len[i]})"
    empty = ~mismatch & (ids_len == 0)
    for i in np.flatnonzero(empty):
        row_reasons[int(i)] = "empty row"
    valid = ~mismatch & ~empty
    L = ids_len
    long = valid & (L > M)

    # Documents: npieces per row, then (row, rel start, length) per piece, in row order.
    npieces = valid.astype(np.int64)
    base_rel = np.zeros(n, dtype=np.int64)
    if overlong == "drop":
        for i in np.flatnonzero(long):
            row_reasons[int(i)] = f"too long: {int(L[i])} tokens > max_length {M}"
        npieces[long] = 0
        counts["dropped_too_long"] += int(long.sum())
    elif overlong == "truncate":
        counts["truncated"] += int(long.sum())
        counts["truncated_tokens"] += int((L[long] - M).sum())
        if truncate_side == "keep_end":
            base_rel[long] = L[long] - M
    else:  # split
        npieces[long] = -(-L[long] // M)
        counts["split_rows"] += int(long.sum())

    ndocs = int(npieces.sum())
    doc_row = np.repeat(np.arange(n, dtype=np.int64), npieces)
    first_piece = np.cumsum(npieces) - npieces
    piece_idx = np.arange(ndocs, dtype=np.int64) - np.repeat(first_piece, npieces)
    doc_rel = base_rel[doc_row] + piece_idx * M
    doc_len = np.minimum(M, L[doc_row] - doc_rel)
    src_lab = lab_start[doc_row] + doc_rel
    # trainable tokens of each document, its first token (label forced to −100) excluded
    if row_trainable is None:
        doc_tr = _range_sums(lab_vals != IGNORE_INDEX, src_lab + 1, src_lab + doc_len)
    else:  # whole rows: as stored; pieces of long rows: read from their labels
        doc_tr = row_trainable[doc_row].astype(np.int64)
        for d in np.flatnonzero(long[doc_row]).tolist():
            doc_tr[d] = np.count_nonzero(lab_vals[src_lab[d] + 1:src_lab[d] + doc_len[d]] != IGNORE_INDEX)
    keep = doc_tr > 0
    survived = np.bincount(doc_row[keep], minlength=n)
    if overlong == "split":
        from_split = long[doc_row]
        counts["split_pieces"] += int((keep & from_split).sum())
        counts["split_pieces_without_loss"] += int((~keep & from_split).sum())

    for i in np.flatnonzero((npieces > 0) & (survived == 0)):
        i = int(i)
        if long[i] and overlong == "truncate":
            row_reasons[i] = f"no trainable token after truncation to max_length {M} ({truncate_side})"
        elif long[i] and overlong == "split":
            row_reasons[i] = f"no trainable token in any of its {int(npieces[i])} pieces after split"
        else:
            row_reasons[i] = "no trainable token"
    for i in sorted(row_reasons):
        reasons[int(row_ids[i])] = row_reasons[i]
    src_ids = ids_start[doc_row[keep]] + doc_rel[keep]
    return src_ids, src_lab[keep], doc_len[keep], survived


def _segments(docs: _Documents, M: int, strategy: str, seed: Optional[int], progress: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray], int]:
    """The packing plan: segments (contiguous token runs of one document, each copied whole into
    one output row) as (document, offset in it, length, output row), sorted by output row; which
    segments start mid-document (wrapped only); the number of rows."""
    ndocs = len(docs.length)
    doc_len = docs.length
    zero = np.zeros(ndocs, dtype=np.int64)
    if strategy == "none":
        return np.arange(ndocs, dtype=np.int64), zero, doc_len, np.arange(ndocs, dtype=np.int64), None, ndocs
    if strategy == "bfd":
        order = np.argsort(-doc_len, kind="stable")
        bins, nbins = _bfd_bins(doc_len[order].tolist(), M, progress=progress)
        bins = np.asarray(bins, dtype=np.int64)
        if seed is not None and nbins:
            bins = np.random.default_rng(seed).permutation(nbins)[bins]
        within = np.argsort(bins, kind="stable")  # bin order, insertion order inside a bin
        seg_doc = order[within]
        return seg_doc, zero, doc_len[seg_doc], bins[within], None, nbins
    # wrapped
    doc_end = np.cumsum(doc_len)
    total = int(doc_end[-1]) if ndocs else 0
    doc_begin = doc_end - doc_len
    starts = np.union1d(doc_begin, np.arange(0, total, M, dtype=np.int64))
    seg_len = np.diff(np.append(starts, total))
    d = np.searchsorted(doc_end, starts, side="right")
    off = starts - doc_begin[d]
    return d, off, seg_len, starts // M, off > 0, -(-total // M)


def _run_indices(starts: np.ndarray, lengths: np.ndarray, itype: type) -> np.ndarray:
    """starts[0], starts[0]+1, … (lengths[0] of them), then the same for every run, in order: one
    cumulative sum of steps (1 inside a run, a jump at its start), not an index array per step."""
    step = np.ones(int(lengths.sum()), dtype=itype)
    if len(step):
        first = np.cumsum(lengths) - lengths
        step[first[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
        step[0] = starts[0]
    return np.cumsum(step, dtype=itype)


# Mean segment length (tokens) from which copying slice by slice beats one index gather.
_SLICE_COPY_MIN_MEAN = 64


def _copy_segments(out: np.ndarray, values: np.ndarray, src: np.ndarray, seg_len: np.ndarray,
                   seg_out: np.ndarray) -> None:
    """out[seg_out[i]:+seg_len[i]] = values[src[i]:+seg_len[i]] for every segment: a slice copy
    each when segments are long (whole documents: a microsecond or two a segment), else one
    gather by index arrays (which costs per token, and builds two index arrays as long as `out`)."""
    keep = seg_len > 0
    src, seg_len, seg_out = src[keep], seg_len[keep], seg_out[keep]
    if len(seg_len) and seg_len.sum() >= _SLICE_COPY_MIN_MEAN * len(seg_len):
        for s, n, o in zip(src.tolist(), seg_len.tolist(), seg_out.tolist()):
            out[o:o + n] = values[s:s + n]
        return
    itype = np.int32 if max(len(values), len(out)) < 2**31 else np.int64
    out[_run_indices(seg_out, seg_len, itype)] = values[_run_indices(src, seg_len, itype)]


_TOKEN_COLUMNS = ("input_ids", "labels")


class _Gather:
    """Copies segments out of the input by part (a record batch): the parts are grouped in units
    (an input file, or a batch in memory) whose tokens are one int32 array, where each part's
    column starts at `_start[column][part]`."""

    unit: np.ndarray  # part -> its unit (the file it is in; in memory, the batch itself)
    _start: dict[str, np.ndarray]

    def _values(self, unit: int, column: str) -> np.ndarray:
        raise NotImplementedError

    def gather(self, part: np.ndarray, src: dict[str, np.ndarray], seg_len: np.ndarray, seg_out: np.ndarray,
               total: int) -> dict[str, np.ndarray]:
        """{column: the tokens of every segment, at its place in the output}."""
        out = {column: np.empty(total, dtype=np.int32) for column in src}
        units = self.unit[part]
        for unit in np.unique(units).tolist():
            mine = units == unit
            for column, starts in src.items():
                _copy_segments(out[column], self._values(unit, column), self._start[column][part[mine]] + starts[mine],
                               seg_len[mine], seg_out[mine])
        return out


class _Parts(_Gather):
    """The input files' record batches by part number: read a batch at a time for the plan; for
    each group of output rows, every input file is read in turn into one reused buffer and its
    segments copied out in one gather. (Memory-mapping the input instead would keep every page a
    gather touches, and the pages the kernel maps around them, as the process's memory: with
    best-fit rows drawing on documents all over the input, nearly the whole input.)"""

    def __init__(self, paths: Sequence[Path], row_trainable: Optional[Sequence[Path]] = None):
        self.paths = [Path(p) for p in paths]
        self.row_trainable = row_trainable
        units, starts = [], {column: [] for column in _TOKEN_COLUMNS}
        for f, path in enumerate(self.paths):
            with pa.memory_map(str(path), "r") as source:
                base = source.read_buffer(1).address  # zero-copy: the map's first byte
                reader = pa.ipc.open_file(source)
                for b in range(reader.num_record_batches):
                    batch = reader.get_batch(b)  # metadata only: no token page is read
                    units.append(f)
                    for column in _TOKEN_COLUMNS:
                        values = batch.column(column).values
                        if values.type != pa.int32():
                            raise TypeError(f"{path}: column {column!r} must hold int32 tokens, got {values.type}")
                        at = values.buffers()[1].address - base + values.offset * 4
                        assert at % 4 == 0  # Arrow aligns buffers: the file reads as int32 from 0
                        starts[column].append(at // 4)
        self.unit = np.array(units, dtype=np.int64)  # part -> its file
        self._start = {column: np.array(at, dtype=np.int64) for column, at in starts.items()}
        self._buffer = np.empty(0, dtype=np.uint8)
        self._loaded: Optional[int] = None

    def batches(self) -> Iterator[tuple[pa.RecordBatch, Optional[np.ndarray]]]:
        """(batch, its rows' `trainable_after_first` if stored), memory-mapped, a file at a time:
        the plan reads the offsets (and the labels of what it must), never the ids."""
        for f, path in enumerate(self.paths):
            trainable = iter_batches(self.row_trainable[f]) if self.row_trainable is not None else None
            with pa.memory_map(str(path), "r") as source:
                reader = pa.ipc.open_file(source)
                for b in range(reader.num_record_batches):
                    counts = next(trainable).column(0).to_numpy() if trainable is not None else None
                    yield reader.get_batch(b), counts

    def _values(self, unit: int, column: str) -> np.ndarray:
        """Input file `unit` as int32 (both columns), read into one buffer reused for every file:
        random reads from a memory map cost a page fault each, a plain read of the file a copy."""
        size = self.paths[unit].stat().st_size
        if self._loaded != unit:
            if len(self._buffer) < size:
                self._buffer = np.empty(size, dtype=np.uint8)
            with open(self.paths[unit], "rb") as source:
                source.readinto(memoryview(self._buffer)[:size])
            self._loaded = unit
        return self._buffer[:size - size % 4].view(np.int32)


class _InMemoryParts(_Gather):
    def __init__(self, table: pa.Table):
        self._batches = table.combine_chunks().to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]
        self.unit = np.arange(len(self._batches), dtype=np.int64)  # each batch its own unit, columns from 0
        self._start = {column: np.zeros(len(self._batches), dtype=np.int64) for column in _TOKEN_COLUMNS}

    def batches(self) -> Iterator[tuple[pa.RecordBatch, None]]:
        return ((batch, None) for batch in self._batches)

    def _values(self, unit: int, column: str) -> np.ndarray:
        return _flat_list(self._batches[unit], column)[2]


@dataclass
class _Plan:
    docs: _Documents
    seg_doc: np.ndarray
    seg_off: np.ndarray
    seg_len: np.ndarray
    seg_row: np.ndarray
    mid_doc: Optional[np.ndarray]
    nrows: int
    rejects: list[tuple[int, str]]
    counts: dict


def _plan(parts: Any, row_bases: Sequence[int] | None, M: int, strategy: str, overlong: str, truncate_side: str,
          seed: Optional[int], progress: bool) -> _Plan:
    """Pass 1 over the input (a batch at a time): documents and their lengths; then the global plan."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if truncate_side not in TRUNCATE_SIDES:
        raise ValueError(f"truncate_side must be one of {TRUNCATE_SIDES}, got {truncate_side!r}")
    if M < 1:
        raise ValueError(f"max_length must be ≥ 1, got {M}")
    counts = dict.fromkeys(("rows_in", "rows_out", "truncated", "truncated_tokens", "split_rows", "split_pieces",
                            "split_pieces_without_loss", "dropped_too_long"), 0)
    reasons: dict[int, str] = {}
    columns: list[list[np.ndarray]] = [[], [], [], []]
    for p, (batch, row_trainable) in enumerate(parts.batches()):
        n = batch.num_rows
        if "row_id" in batch.schema.names:
            row_ids = batch.column("row_id").to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            row_ids = np.arange(counts["rows_in"], counts["rows_in"] + n, dtype=np.int64)
        if row_bases is not None:
            row_ids = row_ids + row_bases[parts.unit[p]]
        src_ids, src_lab, length, survived = _part_documents(batch, row_ids, M, overlong, truncate_side, reasons,
                                                             counts, row_trainable)
        for column, values in zip(columns, (np.full(len(length), p, dtype=np.int64), src_ids, src_lab, length)):
            column.append(values)
        counts["rows_in"] += n
        counts["rows_out"] += int((survived > 0).sum())
    docs = _Documents(*(np.concatenate(c) if c else np.zeros(0, dtype=np.int64) for c in columns))
    seg_doc, seg_off, seg_len, seg_row, mid_doc, nrows = _segments(docs, M, strategy, seed, progress)
    rejects = sorted(reasons.items())
    counts["rejects"] = len(rejects)
    counts["documents"] = len(docs.length)
    return _Plan(docs, seg_doc, seg_off, seg_len.astype(np.int64), seg_row, mid_doc, nrows, rejects, counts)


def _rows(plan: _Plan, parts: Any, row_start: int, row_end: int, M: int) -> tuple[pa.Table, dict]:
    """Output rows [row_start, row_end) of the plan, gathered from the parts; rows with nothing to
    train are left out and counted."""
    lo, hi = np.searchsorted(plan.seg_row, [row_start, row_end])
    seg_doc, seg_len = plan.seg_doc[lo:hi], plan.seg_len[lo:hi]
    seg_row = plan.seg_row[lo:hi] - row_start
    nrows = row_end - row_start
    part = plan.docs.part[seg_doc]
    total = int(seg_len.sum())
    seg_out = np.cumsum(seg_len) - seg_len
    offset = plan.seg_off[lo:hi]
    tokens = parts.gather(part, {"input_ids": plan.docs.src_ids[seg_doc] + offset,
                                 "labels": plan.docs.src_lab[seg_doc] + offset}, seg_len, seg_out, total)
    out_ids, out_lab = tokens["input_ids"], tokens["labels"]
    wrapped_masked = 0
    if plan.mid_doc is not None:
        mid = plan.mid_doc[lo:hi]
        wrapped_masked = int((out_lab[seg_out[mid]] != IGNORE_INDEX).sum())
    out_lab[seg_out] = IGNORE_INDEX  # nothing in the row predicts a segment's first token

    row_tokens = np.bincount(seg_row, weights=seg_len, minlength=nrows).astype(np.int64)
    row_offsets = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(row_tokens, out=row_offsets[1:])
    seq_offsets = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(np.bincount(seg_row, minlength=nrows), out=seq_offsets[1:])
    if total >= 2**31:
        raise ValueError("packed output exceeds 2**31 tokens in one file; lower data.rows_per_shard")
    ro = pa.array(row_offsets.astype(np.int32))
    table = pa.table({
        "input_ids": pa.ListArray.from_arrays(ro, pa.array(out_ids)),
        "labels": pa.ListArray.from_arrays(ro, pa.array(out_lab)),
        "seq_lengths": pa.ListArray.from_arrays(pa.array(seq_offsets.astype(np.int32)),
                                                pa.array(seg_len.astype(np.int32))),
    })
    trained = out_lab != IGNORE_INDEX
    # A row with nothing to train (a wrapped row holding only the untrained rest of a document)
    # adds no loss, and a micro-batch of such rows has none at all: never written, counted. Only
    # wrapping makes one: other rows hold whole documents, each with a trainable token after its first.
    lossless = (_range_sums(trained, row_offsets[:-1], row_offsets[1:]) == 0 if plan.mid_doc is not None
                else np.zeros(nrows, dtype=bool))
    dropped_tokens = int(row_tokens[lossless].sum())
    if lossless.any():
        table = table.filter(pa.array(~lossless))
    return table, {"wrapped_boundary_labels_masked": wrapped_masked, "tokens": total - dropped_tokens,
                   "trainable_tokens": int(np.count_nonzero(trained)), "packed_rows": table.num_rows,
                   "untrainable_rows_dropped": int(lossless.sum()), "untrainable_tokens_dropped": dropped_tokens}


def _finish(plan: _Plan, written: list[dict], M: int, strategy: str, overlong: str, truncate_side: str) -> dict:
    counts = dict(plan.counts)
    for key in ("wrapped_boundary_labels_masked", "tokens", "trainable_tokens", "packed_rows",
                "untrainable_rows_dropped", "untrainable_tokens_dropped"):
        counts[key] = sum(w[key] for w in written)
    nrows, total = counts["packed_rows"], counts["tokens"]
    counts.update(padding_tokens=nrows * M - total, packing_efficiency=(total / (nrows * M)) if nrows else 0.0,
                  max_length=M, strategy=strategy, overlong=overlong, truncate_side=truncate_side)
    assert counts["rows_in"] == counts["rows_out"] + counts["rejects"], counts
    return counts


def pack(
    tokenized: pa.Table,
    max_length: int,
    strategy: str = "bfd",
    overlong: str = "truncate",
    truncate_side: str = "keep_start",
    seed: Optional[int] = 0,
    progress: bool = False,
) -> PackResult:
    """Pack a tokenized table (``row_id``, ``input_ids``, ``labels``) into rows ≤ ``max_length``, in memory.

    ``seed``: bfd rows (bins) are shuffled deterministically with this seed; ``None`` keeps
    them in bin creation order. ``wrapped`` and ``none`` keep document order.
    """
    M = int(max_length)
    parts = _InMemoryParts(tokenized)
    plan = _plan(parts, None, M, strategy, overlong, truncate_side, seed, progress)
    table, written = _rows(plan, parts, 0, plan.nrows, M)
    counts = _finish(plan, [written], M, strategy, overlong, truncate_side)
    return PackResult(table=table, rejects=plan.rejects, counts=counts, doc_lengths=plan.docs.length.copy())


@dataclass
class PackedFiles:
    files: list[str]
    rows_per_file: list[int]
    rejects: list[tuple[int, str]]
    counts: dict
    doc_lengths: np.ndarray


@dataclass
class FilesPlan:
    """The packing plan of tokenized Arrow files (`plan_files`), which `write_packed` carries out."""

    parts: "_Parts"
    plan: _Plan
    max_length: int
    settings: tuple[str, str, str]  # strategy, overlong, truncate_side

    @property
    def doc_lengths(self) -> np.ndarray:
        return self.plan.docs.length


def plan_files(paths: Sequence[Path], row_bases: Sequence[int], max_length: int, strategy: str = "bfd",
               overlong: str = "truncate", truncate_side: str = "keep_start", seed: Optional[int] = 0,
               progress: bool = False, row_trainable: Optional[Sequence[Path]] = None) -> FilesPlan:
    """One pass over tokenized Arrow files (rows of file i numbered from `row_bases[i]`) for every
    document's length, then the global plan: memory is set by the documents' count, not the tokens.
    `row_trainable`: per file, an Arrow file of its rows' `trainable_after_first` (one int32 column,
    batch by batch as the file), so the plan reads no labels but those of rows longer than max_length."""
    M = int(max_length)
    parts = _Parts(paths, row_trainable)
    plan = _plan(parts, row_bases, M, strategy, overlong, truncate_side, seed, progress)
    return FilesPlan(parts, plan, M, (strategy, overlong, truncate_side))


def write_packed(files_plan: FilesPlan, out_dir: Path, rows_per_file: int, progress: bool = False) -> PackedFiles:
    """`shard-00000.arrow`, … of at most `rows_per_file` rows, exactly as `pack` packs the same rows
    together: each group of output files gathered on its own (every input file read in turn, its
    segments copied out), so memory is set by `GATHER_TOKENS`, not by the tokens."""
    plan, parts, M = files_plan.plan, files_plan.parts, files_plan.max_length
    files, sizes, written = [], [], []
    # Several output files per gather: every gather reads each input file once more.
    step = rows_per_file * max(1, GATHER_TOKENS // (rows_per_file * M))
    bar = tqdm(total=plan.nrows, desc="pack: write", unit="row", disable=not progress)
    for start in range(0, max(plan.nrows, 1), step):
        table, counts = _rows(plan, parts, start, min(start + step, plan.nrows), M)
        written.append(counts)
        for offset in range(0, max(table.num_rows, 1), rows_per_file):
            name = f"shard-{len(files):05d}.arrow"
            write_table(Path(out_dir) / name, table.slice(offset, rows_per_file))
            files.append(name)
            sizes.append(min(rows_per_file, table.num_rows - offset))
        bar.update(min(start + step, plan.nrows) - start)
    bar.close()
    counts = _finish(plan, written, M, *files_plan.settings)
    return PackedFiles(files, sizes, plan.rejects, counts, plan.docs.length.copy())


def pack_files(paths: Sequence[Path], row_bases: Sequence[int], max_length: int, out_dir: Path, rows_per_file: int,
               strategy: str = "bfd", overlong: str = "truncate", truncate_side: str = "keep_start",
               seed: Optional[int] = 0, progress: bool = False,
               row_trainable: Optional[Sequence[Path]] = None) -> PackedFiles:
    """Pack tokenized Arrow files into `shard-00000.arrow`, … (`plan_files`, then `write_packed`)."""
    files_plan = plan_files(paths, row_bases, max_length, strategy, overlong, truncate_side, seed, progress,
                            row_trainable)
    return write_packed(files_plan, out_dir, rows_per_file, progress)


def length_histogram(lengths, max_length: int, bins: int = 16) -> list[dict]:
    """Counts of lengths in `bins` equal ranges of 1..max_length; `start`/`end` are inclusive.

    Lengths above max_length (should not happen after packing) get one extra bin."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bins = max(1, min(int(bins), int(max_length)))
    edges = np.round(np.linspace(0, max_length, bins + 1)).astype(np.int64)
    idx = np.clip(np.searchsorted(edges, lengths, side="left") - 1, 0, bins)
    counts = np.bincount(idx, minlength=bins + 1)
    out = [
        {"start": int(edges[i]) + 1, "end": int(edges[i + 1]), "count": int(counts[i])}
        for i in range(bins)
    ]
    if counts[bins]:
        out.append({"start": int(max_length) + 1, "end": int(lengths.max()), "count": int(counts[bins])})
    return out


# The picture of a packed output's length histogram, stored in the output beside its shards.
LENGTH_HISTOGRAM_PLOT = "length_histogram.png"


def plot_length_histogram(histogram: list[dict], max_length: int) -> bytes:
    """PNG bytes of a `length_histogram` (matplotlib, Agg, no global pyplot state).

    Drawn from the bins stored in the packed manifest, so the picture costs nothing during
    packing (importing matplotlib alone takes seconds) and can be drawn again any time.
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    starts = [b["start"] - 1 for b in histogram]
    ax.bar(starts, [b["count"] for b in histogram], width=[b["end"] - b["start"] + 1 for b in histogram],
           align="edge", color="#4C72B0", edgecolor="white")
    ax.axvline(max_length, color="#C44E52", linestyle="--", linewidth=1, label=f"max_length {max_length}")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title(f"{sum(b['count'] for b in histogram)} documents")
    ax.legend(loc="upper right", frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
