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
from typing import Optional

import numpy as np
import pyarrow as pa

from trainer.core.schemas import IGNORE_INDEX

STRATEGIES = ("bfd", "wrapped", "none")
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


def _flat_list(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start offsets into values, lengths, values) of a list<int> column; null rows have length 0."""
    col = table.column(name)
    # one chunk (a memory-mapped file): use it as is, combine_chunks would copy every token
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
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
    """sum(flags[s:e]) for each (s, e), e < len(flags) (callers append a 0 sentinel)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2] = starts
    bounds[1::2] = ends
    sums = np.add.reduceat(flags, bounds, dtype=np.int64)[0::2]
    sums[ends <= starts] = 0  # reduceat gives flags[s] for an empty range
    return sums


def pack(
    tokenized: pa.Table,
    max_length: int,
    strategy: str = "bfd",
    overlong: str = "truncate",
    truncate_side: str = "keep_start",
    seed: Optional[int] = 0,
    progress: bool = False,
) -> PackResult:
    """Pack a tokenized table (``row_id``, ``input_ids``, ``labels``) into rows ≤ ``max_length``.

    ``seed``: bfd rows (bins) are shuffled deterministically with this seed; ``None`` keeps
    them in bin creation order. ``wrapped`` and ``none`` keep document order.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if truncate_side not in TRUNCATE_SIDES:
        raise ValueError(f"truncate_side must be one of {TRUNCATE_SIDES}, got {truncate_side!r}")
    M = int(max_length)
    if M < 1:
        raise ValueError(f"max_length must be ≥ 1, got {max_length}")

    n = tokenized.num_rows
    if "row_id" in tokenized.column_names:
        row_ids = tokenized.column("row_id").to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        row_ids = np.arange(n, dtype=np.int64)
    ids_start, ids_len, ids_vals = _flat_list(tokenized, "input_ids")
    lab_start, lab_len, lab_vals = _flat_list(tokenized, "labels")
    # trainable flags over the flat label buffer (+1 sentinel so reduceat can end at len)
    lab_tr = np.zeros(len(lab_vals) + 1, dtype=np.int8)
    np.not_equal(lab_vals, IGNORE_INDEX, out=lab_tr[:-1].view(bool))

    reasons: dict[int, str] = {}
    mismatch = ids_len != lab_len
    for i in np.flatnonzero(mismatch):
        reasons[int(i)] = f"input_ids and labels differ in length ({ids_len[i]} != {lab_len[i]})"
    empty = ~mismatch & (ids_len == 0)
    for i in np.flatnonzero(empty):
        reasons[int(i)] = "empty row"
    valid = ~mismatch & ~empty
    L = ids_len
    long = valid & (L > M)

    # Documents: npieces per row, then (row, rel start, length) per piece, in row order.
    npieces = valid.astype(np.int64)
    base_rel = np.zeros(n, dtype=np.int64)
    n_truncated = n_split_rows = n_dropped = 0
    truncated_tokens = 0
    if overlong == "drop":
        for i in np.flatnonzero(long):
            reasons[int(i)] = f"too long: {int(L[i])} tokens > max_length {M}"
        npieces[long] = 0
        n_dropped = int(long.sum())
    elif overlong == "truncate":
        n_truncated = int(long.sum())
        truncated_tokens = int((L[long] - M).sum())
        if truncate_side == "keep_end":
            base_rel[long] = L[long] - M
    else:  # split
        npieces[long] = -(-L[long] // M)
        n_split_rows = int(long.sum())

    ndocs_all = int(npieces.sum())
    doc_row = np.repeat(np.arange(n, dtype=np.int64), npieces)
    first_piece = np.cumsum(npieces) - npieces
    piece_idx = np.arange(ndocs_all, dtype=np.int64) - np.repeat(first_piece, npieces)
    doc_rel = base_rel[doc_row] + piece_idx * M
    doc_len = np.minimum(M, L[doc_row] - doc_rel)
    src_lab = lab_start[doc_row] + doc_rel
    # trainable tokens of each document, its first token (label forced to −100) excluded
    doc_tr = _range_sums(lab_tr, src_lab + 1, src_lab + doc_len)
    keep = doc_tr > 0
    survived = np.bincount(doc_row[keep], minlength=n)
    from_split = long[doc_row] if overlong == "split" else np.zeros(ndocs_all, dtype=bool)
    split_pieces = int((keep & from_split).sum())
    split_pieces_without_loss = int((~keep & from_split).sum())

    for i in np.flatnonzero((npieces > 0) & (survived == 0)):
        i = int(i)
        if long[i] and overlong == "truncate":
            reasons[i] = f"no trainable token after truncation to max_length {M} ({truncate_side})"
        elif long[i] and overlong == "split":
            reasons[i] = f"no trainable token in any of its {int(npieces[i])} pieces after split"
        else:
            reasons[i] = "no trainable token"
    rejects = [(int(row_ids[i]), reasons[i]) for i in sorted(reasons)]

    doc_row = doc_row[keep]
    doc_len = doc_len[keep]
    src_ids = (ids_start[doc_row] + doc_rel[keep]).astype(np.int64)
    src_lab = src_lab[keep]
    ndocs = len(doc_len)

    # Segments: contiguous token runs, each copied whole into one output row.
    wrapped_masked = 0
    mid_doc = None  # segment starts that are not document starts (wrapped only)
    if strategy == "none":
        seg_ids, seg_lab, seg_len = src_ids, src_lab, doc_len
        seg_row = np.arange(ndocs, dtype=np.int64)
        nrows = ndocs
    elif strategy == "bfd":
        order = np.argsort(-doc_len, kind="stable")
        bins, nbins = _bfd_bins(doc_len[order].tolist(), M, progress=progress)
        bins = np.asarray(bins, dtype=np.int64)
        if seed is not None and nbins:
            bins = np.random.default_rng(seed).permutation(nbins)[bins]
        within = np.argsort(bins, kind="stable")  # bin order, insertion order inside a bin
        docs = order[within]
        seg_ids, seg_lab, seg_len = src_ids[docs], src_lab[docs], doc_len[docs]
        seg_row = bins[within]
        nrows = nbins
    else:  # wrapped
        doc_end = np.cumsum(doc_len)
        total = int(doc_end[-1]) if ndocs else 0
        doc_begin = doc_end - doc_len
        starts = np.union1d(doc_begin, np.arange(0, total, M, dtype=np.int64))
        seg_len = np.diff(np.append(starts, total))
        d = np.searchsorted(doc_end, starts, side="right")
        off = starts - doc_begin[d]
        seg_ids, seg_lab = src_ids[d] + off, src_lab[d] + off
        seg_row = starts // M
        mid_doc = off > 0
        nrows = -(-total // M)

    # Gather tokens: one index array for all segments at once.
    seg_len = seg_len.astype(np.int64)
    total = int(seg_len.sum())
    seg_out = np.cumsum(seg_len) - seg_len
    small = max(total, len(ids_vals), len(lab_vals)) < 2**31 - 1
    itype = np.int32 if small else np.int64
    idx = np.repeat((seg_ids - seg_out).astype(itype), seg_len)
    idx += np.arange(total, dtype=itype)
    out_ids = ids_vals[idx]
    delta = seg_lab - seg_ids  # labels usually share the ids' offsets: reuse the index
    if len(delta) and (delta == delta[0]).all():
        if delta[0]:
            idx += itype(delta[0])
    else:
        idx = np.repeat((seg_lab - seg_out).astype(itype), seg_len)
        idx += np.arange(total, dtype=itype)
    out_lab = lab_vals[idx]  # fancy indexing copies: the input buffers are never written
    del idx
    if mid_doc is not None:
        wrapped_masked = int((out_lab[seg_out[mid_doc]] != IGNORE_INDEX).sum())
    out_lab[seg_out] = IGNORE_INDEX

    row_tokens = np.bincount(seg_row, weights=seg_len, minlength=nrows).astype(np.int64)
    row_offsets = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(row_tokens, out=row_offsets[1:])
    seq_offsets = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(np.bincount(seg_row, minlength=nrows), out=seq_offsets[1:])
    if total >= 2**31 or len(seg_len) >= 2**31:
        raise ValueError("packed output exceeds 2**31 tokens; pack in parts")
    ro = pa.array(row_offsets.astype(np.int32))
    so = pa.array(seq_offsets.astype(np.int32))
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(ro, pa.array(out_ids.astype(np.int32, copy=False))),
            "labels": pa.ListArray.from_arrays(ro, pa.array(out_lab.astype(np.int32, copy=False))),
            "seq_lengths": pa.ListArray.from_arrays(so, pa.array(seg_len.astype(np.int32))),
        }
    )

    out_tr = np.zeros(total + 1, dtype=np.int8)
    np.not_equal(out_lab, IGNORE_INDEX, out=out_tr[:-1].view(bool))
    row_trainable = _range_sums(out_tr, row_offsets[:-1], row_offsets[1:])
    # A row with nothing to train (a wrapped row holding only the untrained rest of a document)
    # adds no loss, and a micro-batch of such rows has none at all: never written, counted.
    lossless = row_trainable == 0
    dropped_tokens = int(row_tokens[lossless].sum())
    if lossless.any():
        table = table.filter(pa.array(~lossless))
        total -= dropped_tokens
        nrows = table.num_rows
    trainable = int(row_trainable.sum())
    rows_out = int((survived > 0).sum())
    counts = {
        "rows_in": n,
        "rows_out": rows_out,
        "rejects": len(rejects),
        "documents": ndocs,
        "truncated": n_truncated,
        "truncated_tokens": truncated_tokens,
        "split_rows": n_split_rows,
        "split_pieces": split_pieces,
        "split_pieces_without_loss": split_pieces_without_loss,
        "dropped_too_long": n_dropped,
        "wrapped_boundary_labels_masked": wrapped_masked,
        "tokens": total,
        "trainable_tokens": trainable,
        "packed_rows": nrows,
        "untrainable_rows_dropped": int(lossless.sum()),
        "untrainable_tokens_dropped": dropped_tokens,
        "padding_tokens": nrows * M - total,
        "packing_efficiency": (total / (nrows * M)) if nrows else 0.0,
        "max_length": M,
        "strategy": strategy,
        "overlong": overlong,
        "truncate_side": truncate_side,
    }
    assert counts["rows_in"] == counts["rows_out"] + counts["rejects"], counts
    return PackResult(table=table, rejects=rejects, counts=counts, doc_lengths=doc_len.copy())


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
