"""Templated text + character spans → input_ids + labels.

Each text is cut at every span boundary and every piece is tokenized alone, without
special-token insertion, in one batched call over all pieces of all rows. So spans map to whole
tokens, and the prompt part of a row is exactly `tok(prompt_text, add_special_tokens=False)`:
the tokens the model sees at generation time (joint tokenization, as TRL does, can merge
characters across the prompt/completion boundary and train on a context inference never sees).
Tokenizers that mark the start of every text (SentencePiece) are kept from marking piece starts
that continue a text (see `continuation_backend`).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from typing import Any, NamedTuple, Optional

import numpy as np
import pyarrow as pa

from trainer.core.schemas import IGNORE_INDEX
from trainer.data.tiktoken_twin import tiktoken_twin
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


TOKENIZED_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
    ]
)

# Pieces per batched backend call: one call for any ordinary dataset, bounded memory for huge ones.
BATCH_PIECES = 1 << 18

_PROBE = ["Hello", " world", ",", " 12", "3", "\n", "abc", " def", "x"]


def _drop_word_start_prefix(node: Any) -> bool:
    """Remove, in a tokenizer.json normalizer/pre-tokenizer tree, what writes a word-start marker
    in front of a text (SentencePiece's Prepend("▁"), Metaspace prepend_scheme, ByteLevel's
    add_prefix_space). Returns whether anything changed."""
    if not isinstance(node, dict):
        return False
    changed = False
    kind = node.get("type")
    if kind == "Metaspace":
        changed = node.get("prepend_scheme") not in (None, "never") or bool(node.get("add_prefix_space"))
        node["prepend_scheme"] = "never"
        node.pop("add_prefix_space", None)
    elif kind == "ByteLevel" and node.get("add_prefix_space"):
        node["add_prefix_space"] = False
        changed = True
    for key in ("normalizers", "pretokenizers"):
        children = node.get(key)
        if isinstance(children, list):
            kept = [c for c in children if not (isinstance(c, dict) and c.get("type") == "Prepend")]
            changed |= len(kept) != len(children)
            node[key] = kept
            for c in kept:
                changed |= _drop_word_start_prefix(c)
    return changed


def _pieces_concatenate(backend: Any, continuation: Any) -> bool:
    """Whether probe pieces (the first with `backend`, the others with `continuation`) decode to
    the same text as the whole probe tokenized at once."""
    joint = backend.decode(backend.encode("".join(_PROBE), add_special_tokens=False).ids, skip_special_tokens=False)
    ids = list(backend.encode(_PROBE[0], add_special_tokens=False).ids)
    for p in _PROBE[1:]:
        ids += continuation.encode(p, add_special_tokens=False).ids
    return backend.decode(ids, skip_special_tokens=False) == joint


def continuation_backend(tok: Any) -> Optional[Any]:
    """None when pieces tokenized alone concatenate to the whole's text (byte-level BPE:
    Llama-3, GPT-2). Tokenizers that mark the start of every text (SentencePiece: a Prepend("▁")
    normalizer, Metaspace prepend_scheme first/always — legacy Llama/Mistral) would put a spurious
    "▁" at every piece start; for those, a copy of the backend without that marker, for the
    ordinary text at the start of a piece that continues a row."""
    from tokenizers import Tokenizer

    backend = tok._tokenizer
    if _pieces_concatenate(backend, backend):
        return None
    spec = json.loads(backend.to_str())
    changed = _drop_word_start_prefix({"type": "Sequence", "normalizers": [spec.get("normalizer")]})
    if isinstance(spec.get("normalizer"), dict) and spec["normalizer"].get("type") == "Prepend":
        spec["normalizer"] = None
        changed = True
    changed |= _drop_word_start_prefix({"type": "Sequence", "pretokenizers": [spec.get("pre_tokenizer")]})
    if changed:
        continuation = Tokenizer.from_str(json.dumps(spec))
        if _pieces_concatenate(backend, continuation):
            return continuation
    log.warning("this tokenizer changes text tokenized in pieces; trained spans may not decode to the rendering")
    return None


def _added_token_patterns(tok: Any) -> tuple["re.Pattern[str]", "re.Pattern[str]"]:
    """(any added token, an added token at the end of a text)."""
    strings = sorted({str(t) for t in tok.added_tokens_decoder.values()}, key=len, reverse=True)
    alternatives = "|".join(map(re.escape, strings)) or r"(?!)"
    return re.compile(alternatives), re.compile(f"(?:{alternatives})\\Z")


def _anchor(tok: Any) -> tuple[str, int]:
    """A special token that the backend keeps as one id in front of any text."""
    for t in (tok.eos_token, tok.bos_token, tok.pad_token, tok.unk_token):
        if t and tok._tokenizer.token_to_id(str(t)) is not None:
            return str(t), tok._tokenizer.token_to_id(str(t))
    raise ValueError("the tokenizer has no special token to tokenize pieces behind")


def _batch_encoder(backend: Any) -> Any:
    """The backend's batch encoder; `encode_batch_fast` (no offsets) where the library has it."""
    return getattr(backend, "encode_batch_fast", None) or backend.encode_batch


def _encode_all(tok: Any, pieces: list[str], progress: bool) -> list[list[int]]:
    twin = tiktoken_twin(tok)  # the same ids, several times faster, where the tokenizer has one
    if twin is not None:
        encode = twin.encode_batch
    else:
        backend_encode = _batch_encoder(tok._tokenizer)

        def encode(batch: list[str]) -> list[list[int]]:
            return [e.ids for e in backend_encode(batch, add_special_tokens=False)]
    out: list[list[int]] = []
    n = len(pieces)
    chunks = range(0, n, BATCH_PIECES)
    bar = tqdm(total=n, disable=not progress or n <= BATCH_PIECES, desc="tokenize", unit="piece")
    for i in chunks:
        out.extend(encode(pieces[i:i + BATCH_PIECES]))
        bar.update(min(BATCH_PIECES, n - i))
    bar.close()
    return out


def _check_tokens(ids: Any, labels: Any, vocab_size: int) -> list[int]:
    """Validate a pre-tokenized row; returns its labels (position 0 not yet masked)."""
    if not ids:
        raise ValueError("input_ids: empty")
    if None in ids:
        raise ValueError("input_ids: non-int id")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids: id {bad} outside the vocabulary (size {vocab_size})")
    if labels is None:
        return list(ids)
    if len(labels) != len(ids):
        raise ValueError(f"labels: length {len(labels)} does not match input_ids length {len(ids)}")
    for k, (lab, t) in enumerate(zip(labels, ids)):
        if lab != IGNORE_INDEX and lab != t:
            raise ValueError(f"labels[{k}]: {lab} is neither {IGNORE_INDEX} nor the token id {t}")
    return list(labels)


# -- tokenize_rows, phase by phase ---------------------------------------------------------------


class _Columns(NamedTuple):
    """A templated table as Python lists; pre_ids/pre_labels None when no row is pre-tokenized."""

    row_ids: list
    texts: list
    starts: list
    ends: list
    pre_ids: Optional[list]
    pre_labels: Optional[list]


class _Markers(NamedTuple):
    """What encoding pieces that continue a row needs, for a tokenizer that marks text starts."""

    continuation: Any  # the backend without its word-start marker
    added_re: re.Pattern[str]  # any added token
    added_end_re: re.Pattern[str]  # an added token at the end of a text
    anchor: str  # a special token kept as one id in front of any text
    anchor_id: int


class _Cut(NamedTuple):
    """All rows cut into pieces, in row order. A pre-tokenized row is one piece with known ids and
    explicit labels; a rejected row has no piece."""

    pieces: list[str]  # text pieces, to encode
    piece_ids: Optional[list[Optional[list[int]]]]  # per piece: known ids, else None (None: no known piece)
    trained: list[bool]  # per piece (text and known)
    explicit: dict[int, list[int]]  # piece index -> labels of a pre-tokenized row
    first_piece: list[int]  # per row: index of its first piece
    n_pieces: list[int]  # per row: its piece count
    continued: list[int]  # indices into `pieces` of pieces that continue a row (marking tokenizers only)
    rejects: list[tuple[int, int, str]]  # (row index, row_id, reason)


class _Continued(NamedTuple):
    """How continuing pieces were rewritten for the main encoder, to be undone after it."""

    after_text: list[int]  # pieces whose leading text (up to the first added token) is in `heads`
    heads: list[str]
    after_added: list[int]  # pieces encoded behind the anchor


def _read_columns(templated: pa.Table) -> _Columns:
    """Missing columns read as all None (callers may pass text-only or token-only tables)."""
    cols = templated.column_names
    n = templated.num_rows

    def column(name: str) -> list:
        return templated.column(name).to_pylist() if name in cols else [None] * n

    has_pre = "input_ids" in cols and templated.column("input_ids").null_count < n
    return _Columns(
        row_ids=column("row_id"),
        texts=column("text"),
        starts=column("span_starts"),
        ends=column("span_ends"),
        pre_ids=column("input_ids") if has_pre else None,
        pre_labels=column("labels") if has_pre else None,
    )


def _piece_start_markers(tok: Any) -> Optional[_Markers]:
    """None for tokenizers whose pieces concatenate as they are (byte-level BPE)."""
    continuation = continuation_backend(tok)
    if continuation is None:
        return None
    added_re, added_end_re = _added_token_patterns(tok)
    anchor, anchor_id = _anchor(tok)
    return _Markers(continuation, added_re, added_end_re, anchor, anchor_id)


def _cut_at_spans(c: _Columns, vocab_size: int, mark_continued: bool) -> _Cut:
    """Cut every text at its span boundaries (a span is a trained piece, the text between spans an
    untrained one); check pre-tokenized rows; reject rows with neither."""
    texts, starts, ends, pre_ids, pre_labels, row_ids = c.texts, c.starts, c.ends, c.pre_ids, c.pre_labels, c.row_ids
    n = len(texts)
    pieces: list[str] = []
    piece_ids: list[Optional[list[int]]] = []
    trained: list[bool] = []
    explicit: dict[int, list[int]] = {}
    first_piece = [0] * n
    n_pieces = [0] * n
    continued: list[int] = []
    rejects: list[tuple[int, int, str]] = []
    for r in range(n):
        first = len(trained)
        first_piece[r] = first
        text = texts[r]
        if text is None:
            ids = pre_ids[r] if pre_ids is not None else None
            if ids is None:
                rejects.append((r, row_ids[r], "empty row (no text and no input_ids)"))
                continue
            try:
                labels = _check_tokens(ids, pre_labels[r], vocab_size)
            except ValueError as e:
                rejects.append((r, row_ids[r], str(e)))
                continue
            explicit[len(trained)] = labels
            piece_ids.append(ids)
            trained.append(True)
            n_pieces[r] = 1
            continue
        pos = 0
        for s, e in zip(starts[r] or (), ends[r] or ()):
            if s > pos:
                pieces.append(text[pos:s])
                trained.append(False)
            if e > s:
                pieces.append(text[s:e])
                trained.append(True)
                pos = e
        if pos < len(text):
            pieces.append(text[pos:])
            trained.append(False)
        k = len(trained) - first
        n_pieces[r] = k
        if mark_continued and k > 1:
            continued.extend(range(len(pieces) - k + 1, len(pieces)))
        if pre_ids is not None:
            piece_ids.extend([None] * k)
    return _Cut(pieces, piece_ids if pre_ids is not None else None, trained, explicit, first_piece, n_pieces,
                continued, rejects)


def _split_continued(pieces: list[str], continued: list[int], m: _Markers) -> tuple[list[str], _Continued]:
    """Rewrite continuing pieces for the main encoder. Where the whole text would continue ordinary
    text, a piece's leading text is split off for the marker-less backend (from its first added
    token on, it is tokenized as usual). Right after an added token, the piece is tokenized exactly
    as the tokenizer treats text there: behind an added-token anchor whose id is then dropped."""
    added_re, added_end_re, anchor = m.added_re, m.added_end_re, m.anchor
    to_encode = list(pieces)
    heads: list[str] = []
    after_text: list[int] = []
    after_added: list[int] = []
    for j in continued:
        piece = pieces[j]
        if added_end_re.search(pieces[j - 1]):
            after_added.append(j)
            to_encode[j] = anchor + piece
            continue
        found = added_re.search(piece)
        cut = found.start() if found else len(piece)
        after_text.append(j)
        heads.append(piece[:cut])
        to_encode[j] = piece[cut:]
    return to_encode, _Continued(after_text, heads, after_added)


def _join_continued(encoded: list[list[int]], split: _Continued, m: _Markers) -> None:
    """Undo `_split_continued` on the encoded pieces, in place: heads encoded in one batch by the
    marker-less backend go in front, anchors come off."""
    for j, head in zip(split.after_text, _batch_encoder(m.continuation)(split.heads, add_special_tokens=False)):
        encoded[j] = head.ids + encoded[j]
    for j in split.after_added:
        if not encoded[j] or encoded[j][0] != m.anchor_id:
            raise RuntimeError(f"tokenizer did not keep the anchor {m.anchor!r} as one token")
        encoded[j] = encoded[j][1:]


def _encode_pieces(tok: Any, cut: _Cut, markers: Optional[_Markers], progress: bool) -> list[list[int]]:
    """Ids of every piece, text pieces encoded in one batched pass and known pieces in place."""
    if cut.continued:  # only ever non-empty with markers
        to_encode, split = _split_continued(cut.pieces, cut.continued, markers)
        encoded = _encode_all(tok, to_encode, progress)
        _join_continued(encoded, split, markers)
    else:
        encoded = _encode_all(tok, cut.pieces, progress)
    if cut.piece_ids is not None:
        it = iter(encoded)
        encoded = [ids if ids is not None else next(it) for ids in cut.piece_ids]
    return encoded


def _flat_ids_and_labels(encoded: list[list[int]], cut: _Cut) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids of all pieces end to end, their labels, piece offsets into both): a trained piece is
    labelled with its own ids, a pre-tokenized one with its explicit labels, the rest ignored."""
    n_total = len(encoded)
    lens = np.fromiter(map(len, encoded), np.int64, n_total)
    piece_off = np.zeros(n_total + 1, np.int64)
    np.cumsum(lens, out=piece_off[1:])
    total = int(piece_off[-1])
    if total >= 2**31:  # int32 list offsets
        raise ValueError("tokenize_rows: more than 2**31 tokens in one table; split the input")
    flat = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, total)
    labels = np.where(np.repeat(np.array(cut.trained, bool), lens), flat, np.int32(IGNORE_INDEX)).astype(np.int32)
    for j, lab in cut.explicit.items():
        labels[piece_off[j]:piece_off[j + 1]] = lab
    return flat, labels, piece_off


def _row_bounds(piece_off: np.ndarray, cut: _Cut) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (start, end) token offsets into the flat arrays."""
    fp = np.array(cut.first_piece, np.int64)
    return piece_off[fp], piece_off[fp + np.array(cut.n_pieces, np.int64)]


def _reject_untrainable(
    labels: np.ndarray, row_start: np.ndarray, row_end: np.ndarray, nonempty: np.ndarray,
    rejects: list[tuple[int, int, str]], row_ids: list,
) -> np.ndarray:
    """Add the rows not yet rejected that have no token or no trained token to `rejects`; returns
    the rows kept."""
    cum_trained = np.zeros(len(labels) + 1, np.int64)
    np.cumsum(labels != IGNORE_INDEX, out=cum_trained[1:])
    n_trained = cum_trained[row_end] - cum_trained[row_start]
    processed = np.ones(len(row_ids), bool)
    processed[[r for r, _, _ in rejects]] = False
    for r in np.flatnonzero(processed & ~nonempty).tolist():
        rejects.append((r, row_ids[r], "empty text"))
    for r in np.flatnonzero(processed & nonempty & (n_trained == 0)).tolist():
        rejects.append((r, row_ids[r], "no trainable token"))
    return processed & nonempty & (n_trained > 0)


def _kept_table(flat: np.ndarray, labels: np.ndarray, row_len: np.ndarray, keep: np.ndarray, row_ids: list) -> pa.Table:
    """The kept rows as TOKENIZED_SCHEMA: one slice of the flat arrays each, int32 list offsets."""
    if not keep.all():
        token_keep = np.repeat(keep, row_len)
        flat = flat[token_keep]
        labels = labels[token_keep]
    kept_len = row_len[keep]
    offsets = np.zeros(len(kept_len) + 1, np.int64)
    np.cumsum(kept_len, out=offsets[1:])
    offs = pa.array(offsets.astype(np.int32))
    kept_ids = [row_ids[r] for r in np.flatnonzero(keep).tolist()]
    return pa.Table.from_arrays(
        [
            pa.array(kept_ids, pa.int64()),
            pa.ListArray.from_arrays(offs, pa.array(flat)),
            pa.ListArray.from_arrays(offs, pa.array(labels)),
        ],
        schema=TOKENIZED_SCHEMA,
    )


def tokenize_rows(
    templated: pa.Table, tok: Any, progress: bool = True
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Tokenize a templated table: (row_id, input_ids, labels) and rejects (row_id, reason)."""
    columns = _read_columns(templated)
    markers = _piece_start_markers(tok)  # None unless the tokenizer marks every text's start
    cut = _cut_at_spans(columns, len(tok), mark_continued=markers is not None)
    encoded = _encode_pieces(tok, cut, markers, progress)
    flat, labels, piece_off = _flat_ids_and_labels(encoded, cut)
    row_start, row_end = _row_bounds(piece_off, cut)
    row_len = row_end - row_start
    nonempty = row_len > 0
    labels[row_start[nonempty]] = IGNORE_INDEX  # nothing predicts a row's first token
    rejects = cut.rejects  # rows no piece came from; the untrainable ones are added
    keep = _reject_untrainable(labels, row_start, row_end, nonempty, rejects, columns.row_ids)
    table = _kept_table(flat, labels, row_len, keep, columns.row_ids)
    rejects.sort(key=lambda x: x[0])
    return table, [(row_id, reason) for _, row_id, reason in rejects]
