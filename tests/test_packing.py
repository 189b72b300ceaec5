"""Packing: property tests (nothing lost, duplicated or mislabelled) plus exact cases.

Every input token is a unique id and its label is either the token itself (trainable) or −100,
so each output token can be traced back to its row and position.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.data.packing import PackResult, length_histogram, pack, plot_length_histogram
from trainer.core.schemas import IGNORE_INDEX

LIST_I32 = pa.list_(pa.int32())
MODES = [("truncate", "keep_start"), ("truncate", "keep_end"), ("split", "keep_start"), ("drop", "keep_start")]


# ---------------------------------------------------------------- helpers

def make_rows(lengths, masks=None, start_token=1):
    """Rows of unique tokens; mask[i][j] True = trainable. Default: all trainable but position 0."""
    rows, tok = [], start_token
    for i, n in enumerate(lengths):
        ids = list(range(tok, tok + n))
        tok += n
        m = masks[i] if masks is not None else [j > 0 for j in range(n)]
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, m)]
        rows.append((100 + i, ids, labels))
    return rows


def to_table(rows, layout="plain"):
    """Arrow table of rows; other layouts exercise chunked, sliced and unaligned buffers."""
    row_ids = [r[0] for r in rows]
    ids = [r[1] for r in rows]
    labels = [r[2] for r in rows]
    if layout == "plain" or not rows:
        return pa.table({"row_id": pa.array(row_ids, pa.int64()), "input_ids": pa.array(ids, LIST_I32),
                         "labels": pa.array(labels, LIST_I32)})
    if layout == "chunked":
        k = len(rows) // 2
        return pa.concat_tables([to_table(rows[:k]), to_table(rows[k:])])
    if layout == "sliced":  # extra rows on both sides; labels buffer offset differs from ids
        pad_ids = [[7] * 3]
        pad_lab = [[IGNORE_INDEX] * 5, [IGNORE_INDEX] * 2]
        t = pa.table({
            "row_id": pa.array([-1] + row_ids + [-2], pa.int64()),
            "input_ids": pa.array(pad_ids + ids + pad_ids, LIST_I32),
            "labels": pa.array(pad_lab[:1] + labels + pad_lab[1:], LIST_I32),
        })
        return t.slice(1, len(rows))
    if layout == "unaligned":  # labels come from a different buffer than input_ids
        lab = pa.array([[IGNORE_INDEX] * 4] + labels, LIST_I32).slice(1)
        return pa.table({"row_id": pa.array(row_ids, pa.int64()), "input_ids": pa.array(ids, LIST_I32),
                         "labels": lab})
    raise ValueError(layout)


def expected(rows, M, overlong, side):
    """Reference overlong handling: (documents [(row_id, ids, labels)], {row_id: reason})."""
    docs, rejects = [], {}
    for rid, ids, labels in rows:
        n = len(ids)
        if n > M and overlong == "drop":
            rejects[rid] = f"too long: {n} tokens > max_length {M}"
            continue
        if n > M and overlong == "truncate":
            s = 0 if side == "keep_start" else n - M
            pieces = [(ids[s:s + M], labels[s:s + M])]
        elif n > M:
            pieces = [(ids[k:k + M], labels[k:k + M]) for k in range(0, n, M)]
        else:
            pieces = [(ids, labels)]
        kept = []
        for pi, pl in pieces:
            pl = [IGNORE_INDEX] + list(pl[1:])
            if any(x != IGNORE_INDEX for x in pl):
                kept.append((rid, list(pi), pl))
        if not kept:
            rejects[rid] = (f"no trainable token after truncation to max_length {M} ({side})"
                            if n > M and overlong == "truncate"
                            else "no trainable token in any" if n > M else "no trainable token")
        docs += kept
    return docs, rejects


def out_rows(res: PackResult):
    t = res.table
    assert t.schema.field("input_ids").type == LIST_I32
    assert t.schema.field("labels").type == LIST_I32
    assert t.schema.field("seq_lengths").type == LIST_I32
    return list(zip(t.column("input_ids").to_pylist(), t.column("labels").to_pylist(),
                    t.column("seq_lengths").to_pylist()))


def ref_bfd_fills(lengths, M):
    """Naive global best-fit decreasing: sorted bin fills."""
    caps = []
    for L in sorted(lengths, reverse=True):
        fits = [i for i, c in enumerate(caps) if c >= L]
        if fits:
            i = min(fits, key=lambda i: caps[i])
            caps[i] -= L
        else:
            caps.append(M - L)
    return sorted(M - c for c in caps)


def check(rows, res: PackResult, M, strategy, overlong, side):
    docs, rejects = expected(rows, M, overlong, side)
    c = res.counts
    # every row is out or a reject, and rejects carry the reference reason
    assert c["rows_in"] == len(rows) == c["rows_out"] + c["rejects"]
    assert c["rejects"] == len(res.rejects)
    assert [r for r, _ in res.rejects] == [r for r, *_ in rows if r in rejects]
    for rid, reason in res.rejects:
        assert reason.startswith(rejects[rid]), (reason, rejects[rid])
    assert c["rows_out"] == len({d[0] for d in docs})

    got = out_rows(res)
    for ids, labels, seqs in got:
        assert 0 < len(ids) <= M
        assert len(labels) == len(ids)
        assert all(s > 0 for s in seqs) and sum(seqs) == len(ids)
        assert all(lab == tok or lab == IGNORE_INDEX for tok, lab in zip(ids, labels))

    # every packed row trains something (a batch of them never has zero loss tokens)
    assert all(any(lab != IGNORE_INDEX for lab in labels) for _, labels, _ in got)
    # no token duplicated; none lost but the counted rows without loss
    all_out = [t for ids, _, _ in got for t in ids]
    all_exp = [t for _, ids, _ in docs for t in ids]
    assert len(all_out) == len(set(all_out))
    assert len(all_out) + c["untrainable_tokens_dropped"] == len(all_exp)

    if strategy == "wrapped":
        stream_ids = [t for _, ids, _ in docs for t in ids]
        stream_lab = [x for _, _, lab in docs for x in lab]
        doc_starts = set(np.cumsum([0] + [len(d[1]) for d in docs])[:-1].tolist())
        # The stream cut every M tokens, continued pieces' first labels masked, rows without
        # loss left out.
        want_rows, masked, dropped = [], 0, 0
        for pos in range(0, len(stream_ids), M):
            ids = stream_ids[pos:pos + M]
            labels = list(stream_lab[pos:pos + M])
            if pos not in doc_starts:
                masked += labels[0] != IGNORE_INDEX
                labels[0] = IGNORE_INDEX
            # pieces are cut at document starts and at the row start
            cuts = sorted({j for j in range(len(ids)) if pos + j in doc_starts} | {0})
            seqs = [b - a for a, b in zip(cuts, cuts[1:] + [len(ids)])]
            if all(lab == IGNORE_INDEX for lab in labels):
                dropped += 1
                continue
            want_rows.append((ids, labels, seqs))
        assert got == want_rows
        assert c["wrapped_boundary_labels_masked"] == masked
        assert c["untrainable_rows_dropped"] == dropped
    else:
        # each output document is exactly one expected document, tokens and labels
        out_docs = []
        for ids, labels, seqs in got:
            o = 0
            for s in seqs:
                out_docs.append((tuple(ids[o:o + s]), tuple(labels[o:o + s])))
                o += s
        exp_docs = [(tuple(i), tuple(lab)) for _, i, lab in docs]
        assert collections.Counter(out_docs) == collections.Counter(exp_docs)
        if strategy == "none":
            assert out_docs == exp_docs and all(len(s) == 1 for _, _, s in got)
        else:
            assert sorted(len(ids) for ids, _, _ in got) == ref_bfd_fills([len(d[1]) for d in docs], M)
            for _, _, seqs in got:  # inside a bin: longest first
                assert seqs == sorted(seqs, reverse=True)
        assert sorted(all_out) == sorted(all_exp)
        assert c["wrapped_boundary_labels_masked"] == 0
        assert c["untrainable_rows_dropped"] == c["untrainable_tokens_dropped"] == 0

    tokens = len(all_out)
    trainable = sum(lab != IGNORE_INDEX for _, labels, _ in got for lab in labels)
    assert c["tokens"] == tokens and c["trainable_tokens"] == trainable
    assert c["packed_rows"] == len(got) == res.table.num_rows
    assert c["padding_tokens"] == len(got) * M - tokens
    assert c["packing_efficiency"] == pytest.approx(tokens / (len(got) * M) if got else 0.0)
    assert c["documents"] == len(docs)
    assert sorted(res.doc_lengths.tolist()) == sorted(len(d[1]) for d in docs)
    assert c["max_length"] == M and c["strategy"] == strategy
    long_rows = [r for r in rows if len(r[1]) > M]
    assert c["truncated"] == (len(long_rows) if overlong == "truncate" else 0)
    assert c["dropped_too_long"] == (len(long_rows) if overlong == "drop" else 0)
    if overlong == "split":
        assert c["split_rows"] == len(long_rows)
        n_pieces = sum(-(-len(r[1]) // M) for r in long_rows)
        split_docs = sum(1 for d in docs if any(d[0] == r[0] for r in long_rows))
        assert c["split_pieces"] == split_docs
        assert c["split_pieces"] + c["split_pieces_without_loss"] == n_pieces
    else:
        assert c["split_rows"] == c["split_pieces"] == c["split_pieces_without_loss"] == 0


# ---------------------------------------------------------------- properties

@st.composite
def datasets(draw):
    M = draw(st.integers(2, 70))
    n = draw(st.integers(0, 25))
    lengths, masks = [], []
    for _ in range(n):
        L = draw(st.integers(2, 3 * M + 2))
        mode = draw(st.sampled_from(["random", "tail", "head", "one"]))
        if mode == "random":
            m = [False] + draw(st.lists(st.booleans(), min_size=L - 1, max_size=L - 1))
        elif mode == "tail":  # trainable only at the end (truncate keep_start loses it)
            k = draw(st.integers(1, L - 1))
            m = [j >= L - k for j in range(L)]
        elif mode == "head":  # trainable only right after the start
            k = draw(st.integers(1, L - 1))
            m = [0 < j <= k for j in range(L)]
        else:
            j0 = draw(st.integers(1, L - 1))
            m = [j == j0 for j in range(L)]
        if not any(m):
            m[draw(st.integers(1, L - 1))] = True
        lengths.append(L)
        masks.append(m)
    layout = draw(st.sampled_from(["plain", "chunked", "sliced", "unaligned"]))
    return M, make_rows(lengths, masks), layout


@pytest.mark.parametrize("strategy", ["bfd", "wrapped", "none"])
@pytest.mark.parametrize("overlong,side", MODES)
@settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets(), seed=st.sampled_from([None, 0, 3]))
def test_pack_properties(strategy, overlong, side, data, seed):
    M, rows, layout = data
    res = pack(to_table(rows, layout), M, strategy, overlong, side, seed=seed)
    check(rows, res, M, strategy, overlong, side)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), max_size=300), M=st.integers(1, 300))
def test_bfd_matches_naive_best_fit(lengths, M):
    lengths = [min(L, M) for L in lengths]
    masks = [[True] * L if L == 1 else [j > 0 for j in range(L)] for L in lengths]
    rows = make_rows(lengths, masks)
    res = pack(to_table(rows), M, "bfd", seed=None)
    docs, _ = expected(rows, M, "truncate", "keep_start")
    assert sorted(len(r) for r in res.table.column("input_ids").to_pylist()) == \
        ref_bfd_fills([len(d[1]) for d in docs], M)


def test_deterministic_and_seeded_order():
    rng = np.random.default_rng(1)
    rows = make_rows(rng.integers(2, 200, 500).tolist())
    t = to_table(rows)
    a, b = pack(t, 128, "bfd", seed=5), pack(t, 128, "bfd", seed=5)
    assert a.table.equals(b.table)
    c, d = pack(t, 128, "bfd", seed=6), pack(t, 128, "bfd", seed=None)
    assert not a.table.equals(c.table)
    key = lambda r: sorted(map(tuple, r.table.column("input_ids").to_pylist()))  # noqa: E731
    assert key(a) == key(c) == key(d)
    # seed=None: bins in creation order, so the first row holds the longest document
    assert d.table.column("seq_lengths")[0].as_py()[0] == 128  # rows over 128 are truncated
    # the progress bar changes nothing; counts are plain JSON for the manifest
    e = pack(t, 128, "bfd", seed=5, progress=True)
    assert e.table.equals(a.table) and e.counts == a.counts
    assert json.loads(json.dumps(a.counts)) == a.counts


# ---------------------------------------------------------------- BFD exact cases

def test_bfd_is_global_not_per_batch():
    # max_length 10, documents 6, 6, 4, 4. Packed per batch of 2 rows: [6, 6] needs 2 bins and
    # [4, 4] one more = 3. Globally: 6+4, 6+4 = 2 full bins.
    rows = make_rows([6, 6, 4, 4])
    per_batch = sum(pack(to_table(rows[i:i + 2]), 10, "bfd").counts["packed_rows"] for i in (0, 2))
    assert per_batch == 3
    res = pack(to_table(rows), 10, "bfd")
    assert res.counts["packed_rows"] == 2
    assert res.counts["packing_efficiency"] == 1.0
    assert sorted(map(tuple, res.table.column("seq_lengths").to_pylist())) == [(6, 4), (6, 4)]


def test_bfd_best_fit_not_first_fit():
    # After 7 and 5 open bins with 3 and 5 free, a 3 goes into the 3 (best fit), so the 5 still fits.
    rows = make_rows([7, 5, 3, 5])
    res = pack(to_table(rows), 10, "bfd", seed=None)
    assert res.table.column("seq_lengths").to_pylist() == [[7, 3], [5, 5]]
    # documents are placed whole: tokens of row 0 then row 2 in the first bin
    ids = res.table.column("input_ids").to_pylist()
    assert ids[0] == rows[0][1] + rows[2][1]


def test_bfd_efficiency_lognormal():
    rng = np.random.default_rng(0)
    n, M = 40_000, 2048
    sigma = 0.8
    lens = np.clip(np.round(rng.lognormal(np.log(300) - sigma**2 / 2, sigma, n)), 2, 4 * M).astype(np.int64)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ids = np.arange(off[-1], dtype=np.int32)
    lab = ids.copy()
    lab[off[:-1]] = IGNORE_INDEX
    t = pa.table({"row_id": np.arange(n), "input_ids": pa.ListArray.from_arrays(pa.array(off), pa.array(ids)),
                  "labels": pa.ListArray.from_arrays(pa.array(off), pa.array(lab))})
    res = pack(t, M, "bfd")
    c = res.counts
    assert c["packing_efficiency"] >= 0.995, c
    assert c["rows_out"] == n and c["truncated"] == int((lens > M).sum())
    assert c["tokens"] == int(np.minimum(lens, M).sum())
    out = res.table.column("input_ids").combine_chunks()
    assert np.array_equal(np.sort(out.values.to_numpy()),
                          np.sort(np.concatenate([ids[o:o + min(L, M)] for o, L in zip(off[:-1], lens)])))


# ---------------------------------------------------------------- overlong exact cases

def test_truncate_keep_start_exact():
    rows = make_rows([7, 3])  # tokens 1..7, 8..10
    res = pack(to_table(rows), 5, "none", "truncate", "keep_start")
    assert res.table.column("input_ids").to_pylist() == [[1, 2, 3, 4, 5], [8, 9, 10]]
    assert res.table.column("labels").to_pylist() == [[IGNORE_INDEX, 2, 3, 4, 5], [IGNORE_INDEX, 9, 10]]
    assert res.counts["truncated"] == 1 and res.counts["truncated_tokens"] == 2
    assert res.rejects == []


def test_truncate_keep_end_exact_masks_new_first_token():
    rows = make_rows([7])
    res = pack(to_table(rows), 5, "none", "truncate", "keep_end")
    assert res.table.column("input_ids").to_pylist() == [[3, 4, 5, 6, 7]]
    assert res.table.column("labels").to_pylist() == [[IGNORE_INDEX, 4, 5, 6, 7]]


def test_truncate_rejects_rows_without_trainable_tokens():
    # row 100: trainable only at the end -> keep_start leaves nothing; row 101 only at position 1
    rows = make_rows([8, 8], masks=[[j == 7 for j in range(8)], [j == 1 for j in range(8)]])
    res = pack(to_table(rows), 4, "bfd", "truncate", "keep_start")
    assert res.rejects == [(100, "no trainable token after truncation to max_length 4 (keep_start)")]
    assert res.counts["rows_out"] == 1 and res.counts["rows_in"] == 2
    res = pack(to_table(rows), 4, "bfd", "truncate", "keep_end")
    assert res.rejects == [(101, "no trainable token after truncation to max_length 4 (keep_end)")]
    # keep_end: position 4 becomes the first token, so its label is masked
    rows = make_rows([8], masks=[[j == 4 for j in range(8)]])
    res = pack(to_table(rows), 4, "none", "truncate", "keep_end")
    assert res.rejects == [(100, "no trainable token after truncation to max_length 4 (keep_end)")]


def test_split_pieces_exact():
    rows = make_rows([11])  # tokens 1..11
    res = pack(to_table(rows), 4, "none", "split")
    assert res.table.column("input_ids").to_pylist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert res.table.column("labels").to_pylist() == [[IGNORE_INDEX, 2, 3, 4], [IGNORE_INDEX, 6, 7, 8], [IGNORE_INDEX, 10, 11]]
    c = res.counts
    assert (c["split_rows"], c["split_pieces"], c["split_pieces_without_loss"]) == (1, 3, 0)
    assert c["rows_out"] == 1 and c["documents"] == 3


def test_split_drops_pieces_without_loss_and_counts_them():
    # only tokens 2..3 trainable: piece 2 (5..8) has none; piece 3 (9..11) has none either
    rows = make_rows([11, 9], masks=[[j in (1, 2) for j in range(11)], [j == 4 for j in range(9)]])
    res = pack(to_table(rows), 4, "none", "split")
    assert res.table.column("input_ids").to_pylist() == [[1, 2, 3, 4]]
    # row 101: its only trainable token (position 4) is the first of piece 2 -> reject
    assert [r for r, _ in res.rejects] == [101]
    assert res.rejects[0][1].startswith("no trainable token in any")
    c = res.counts
    assert (c["split_rows"], c["split_pieces"], c["split_pieces_without_loss"]) == (2, 1, 5)
    assert c["rows_in"] == c["rows_out"] + c["rejects"] == 2


def test_drop_rejects_with_reason():
    rows = make_rows([5, 9, 3])
    res = pack(to_table(rows), 5, "bfd", "drop")
    assert res.rejects == [(101, "too long: 9 tokens > max_length 5")]
    assert res.counts["dropped_too_long"] == 1 and res.counts["rows_out"] == 2
    assert sorted(res.table.column("seq_lengths").to_pylist()) == [[3], [5]]


def test_malformed_rows_are_rejects_not_silent():
    t = pa.table({"row_id": pa.array([1, 2, 3, 4], pa.int64()),
                  "input_ids": pa.array([[5, 6], [], [7, 8], None], LIST_I32),
                  "labels": pa.array([[IGNORE_INDEX, 6], [], [IGNORE_INDEX], None], LIST_I32)})
    res = pack(t, 8, "bfd")
    assert res.rejects == [(2, "empty row"), (3, "input_ids and labels differ in length (2 != 1)"),
                           (4, "empty row")]
    assert res.counts["rows_out"] == 1
    # a row with no trainable token at all (label 0 is masked whatever the input says)
    res = pack(to_table([(9, [1, 2], [1, IGNORE_INDEX])]), 8, "none")
    assert res.rejects == [(9, "no trainable token")]


# ---------------------------------------------------------------- wrapped and none

def test_wrapped_exact():
    rows = make_rows([3, 4, 3])  # tokens 1..3, 4..7, 8..10 ; max_length 4
    res = pack(to_table(rows), 4, "wrapped")
    assert res.table.column("input_ids").to_pylist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert res.table.column("seq_lengths").to_pylist() == [[3, 1], [3, 1], [2]]
    # document starts (1, 4, 8) and continued pieces (5, 9) have no loss
    assert res.table.column("labels").to_pylist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 6, 7, IGNORE_INDEX],
                                                      [IGNORE_INDEX, 10]]
    assert res.counts["wrapped_boundary_labels_masked"] == 2
    assert res.counts["packing_efficiency"] == 10 / 12


def test_wrapped_with_split_documents():
    rows = make_rows([6])  # split at 4 into 1..4, 5..6, then wrapped at 3
    res = pack(to_table(rows), 4, "wrapped", "split")
    assert res.table.column("input_ids").to_pylist() == [[1, 2, 3, 4], [5, 6]]
    assert res.table.column("labels").to_pylist() == [[IGNORE_INDEX, 2, 3, 4], [IGNORE_INDEX, 6]]
    assert res.counts["wrapped_boundary_labels_masked"] == 0


def test_wrapped_never_writes_a_row_without_loss():
    # Document 2 trains only its 2nd token, which starts the second row: its label is masked there
    # (no context in that row), leaving the row nothing to train.
    rows = make_rows([3, 4], [[False, True, False], [False, True, False, False]])
    res = pack(to_table(rows), 4, "wrapped")
    assert res.table.column("input_ids").to_pylist() == [[1, 2, 3, 4]]
    assert res.table.column("labels").to_pylist() == [[IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]]
    c = res.counts
    assert (c["untrainable_rows_dropped"], c["untrainable_tokens_dropped"]) == (1, 3)
    assert (c["packed_rows"], c["tokens"], c["wrapped_boundary_labels_masked"]) == (1, 4, 1)
    assert c["packing_efficiency"] == 1.0


def test_empty_input():
    t = to_table([])
    for strategy in ("bfd", "wrapped", "none"):
        res = pack(t, 16, strategy)
        assert res.table.num_rows == 0 and res.counts["rows_in"] == 0
        assert res.counts["packing_efficiency"] == 0.0


def test_bad_arguments():
    t = to_table(make_rows([3]))
    with pytest.raises(ValueError):
        pack(t, 8, "greedy")
    with pytest.raises(ValueError):
        pack(t, 8, overlong="wrap")
    with pytest.raises(ValueError):
        pack(t, 8, truncate_side="middle")
    with pytest.raises(ValueError):
        pack(t, 0)


# ---------------------------------------------------------------- histogram

def test_length_histogram_and_plot(tmp_path):
    lengths = [1, 2, 128, 129, 256, 1000, 2048]
    h = length_histogram(lengths, 2048, bins=16)
    assert len(h) == 16 and sum(b["count"] for b in h) == len(lengths)
    assert h[0] == {"start": 1, "end": 128, "count": 3}
    assert h[1] == {"start": 129, "end": 256, "count": 2}
    assert h[-1] == {"start": 1921, "end": 2048, "count": 1}
    assert all(h[i]["end"] + 1 == h[i + 1]["start"] for i in range(15))
    over = length_histogram([5, 20], 10, bins=2)
    assert over[-1] == {"start": 11, "end": 20, "count": 1}
    assert length_histogram([1, 2], 3, bins=16)[0]["end"] == 1  # bins capped at max_length
    png = plot_length_histogram(length_histogram(lengths, 2048), 2048)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("strategy", ["bfd", "wrapped", "none"])
@pytest.mark.parametrize("overlong", ["truncate", "split", "drop"])
@pytest.mark.parametrize("stored_counts", [False, True])
def test_packing_files_batch_by_batch_equals_packing_them_together(tmp_path, monkeypatch, strategy, overlong,
                                                                   stored_counts):
    """pack_files (the packed stage: lengths first, then a few output files at a time read from
    the files) writes exactly the rows, rejects and counts `pack` gives for all rows in memory,
    with the rows' trainable counts read from the labels or stored beside them."""
    from trainer.core.arrow_io import BatchWriter, read_shards
    from trainer.data import packing
    from trainer.data.packing import pack_files, trainable_after_first
    from trainer.data.stages import ROW_TRAINABLE_SCHEMA
    from trainer.data.tokenization import TOKENIZED_SCHEMA

    monkeypatch.setattr(packing, "GATHER_TOKENS", 37 * 128 * 2)  # two output files per gather

    rng = np.random.default_rng(7)
    paths, tables, bases = [], [], [0, 400, 900]
    for f, count in enumerate((400, 500, 300)):
        rows = []
        for i in range(count):
            ids = rng.integers(0, 1000, int(rng.integers(1, 300))).tolist()
            labels = [t if rng.random() < 0.4 else -100 for t in ids]
            rows.append({"row_id": i, "input_ids": ids, "labels": labels})
        table = pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)
        paths.append(tmp_path / f"tokenized-{f}.arrow")
        with BatchWriter(paths[-1], TOKENIZED_SCHEMA) as out, \
                BatchWriter(tmp_path / f"trainable-{f}.arrow", ROW_TRAINABLE_SCHEMA) as counts:
            for batch in table.to_batches(max_chunksize=97):
                out.write(batch)
                counts.write(pa.table([pa.array(trainable_after_first(batch.column("labels")))],
                                      ROW_TRAINABLE_SCHEMA))
        tables.append(table.set_column(0, "row_id", pa.array([r + bases[f] for r in range(count)], pa.int64())))
    expected = pack(pa.concat_tables(tables), 128, strategy=strategy, overlong=overlong)
    out = tmp_path / "packed"
    out.mkdir()
    stored = [tmp_path / f"trainable-{f}.arrow" for f in range(3)] if stored_counts else None
    got = pack_files(paths, bases, 128, out, rows_per_file=37, strategy=strategy, overlong=overlong,
                     row_trainable=stored)
    assert read_shards(out).to_pylist() == expected.table.to_pylist()
    assert got.rejects == expected.rejects and got.counts == expected.counts
    assert sum(got.rows_per_file) == expected.table.num_rows and max(got.rows_per_file) <= 37
    assert got.files == [f"shard-{i:05d}.arrow" for i in range(len(got.files))]


@pytest.mark.parametrize("min_mean", [0, 10**9])  # every gather by slices, every gather by index arrays
def test_segments_are_copied_to_their_places_whichever_way(monkeypatch, min_mean):
    """_copy_segments copies each segment whole to its place, whether slice by slice (long
    segments) or by one index gather (short ones): the same as a plain loop, over many shapes."""
    from trainer.data import packing

    monkeypatch.setattr(packing, "_SLICE_COPY_MIN_MEAN", min_mean)
    rng = np.random.default_rng(11)
    for case in range(60):
        n = int(rng.integers(0, 40))
        seg_len = rng.integers(0, [3, 50, 400][case % 3] + 1, n)  # empty segments too
        values = rng.integers(-100, 50_000, int(seg_len.sum()) + 500).astype(np.int32)
        src = rng.integers(0, 500, n) if n else np.zeros(0, np.int64)
        order = rng.permutation(n)  # disjoint places, in any order
        seg_out = np.zeros(n, np.int64)
        seg_out[order] = np.cumsum(seg_len[order]) - seg_len[order]
        out = np.full(int(seg_len.sum()), 7, np.int32)
        expected = out.copy()
        for s, k, o in zip(src, seg_len, seg_out):
            expected[o:o + k] = values[s:s + k]
        packing._copy_segments(out, values, src, seg_len, seg_out)
        assert np.array_equal(out, expected), case
