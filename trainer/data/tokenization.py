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
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from trainer.core.schemas import IGNORE_INDEX
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


def _encode_all(tok: Any, pieces: list[str], progress: bool) -> list[list[int]]:
    backend = tok._tokenizer
    enc = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    out: list[list[int]] = []
    n = len(pieces)
    chunks = range(0, n, BATCH_PIECES)
    bar = tqdm(total=n, disable=not progress or n <= BATCH_PIECES, desc="tokenize", unit="piece")
    for i in chunks:
        out.extend([e.ids for e in enc(pieces[i:i + BATCH_PIECES], add_special_tokens=False)])
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


def tokenize_rows(
    templated: pa.Table, tok: Any, progress: bool = True
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Tokenize a templated table: (row_id, input_ids, labels) and rejects (row_id, reason)."""
    cols = templated.column_names
    n = templated.num_rows

    def column(name: str) -> list:
        return templated.column(name).to_pylist() if name in cols else [None] * n

    row_ids = column("row_id")
    texts = column("text")
    starts = column("span_starts")
    ends = column("span_ends")
    has_pre = "input_ids" in cols and templated.column("input_ids").null_count < n
    pre_ids = column("input_ids") if has_pre else None
    pre_labels = column("labels") if has_pre else None

    continuation = continuation_backend(tok)
    if continuation is not None:
        added_re, added_end_re = _added_token_patterns(tok)
        anchor, anchor_id = _anchor(tok)
    vocab_size = len(tok)
    # Cut every text at its span boundaries. Per row: index of its first piece, piece count.
    # A pre-tokenized row is one "piece" with known ids and explicit labels.
    pieces: list[str] = []  # to encode
    piece_ids: list[Optional[list[int]]] = []  # known ids (pre-tokenized), else None
    trained: list[bool] = []
    explicit: dict[int, list[int]] = {}  # piece index -> labels
    first_piece = [0] * n
    n_pieces = [0] * n
    continued: list[int] = []  # pieces (indices into `pieces`) that continue a row
    rejects: list[tuple[int, int, str]] = []  # (row index, row_id, reason)
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
        if continuation is not None and k > 1:
            continued.extend(range(len(pieces) - k + 1, len(pieces)))
        if pre_ids is not None:
            piece_ids.extend([None] * k)

    to_encode = pieces
    heads: list[str] = []
    after_text: list[int] = []
    after_added: list[int] = []
    if continued:
        # Where the whole text would continue ordinary text, a piece's leading text gets no
        # word-start marker (from its first added token on, it is tokenized as usual). Right after
        # an added token, the piece is tokenized exactly as the tokenizer treats text there: behind
        # an added-token anchor whose id is then dropped.
        to_encode = list(pieces)
        for j in continued:
            piece = pieces[j]
            if added_end_re.search(pieces[j - 1]):
                after_added.append(j)
                to_encode[j] = anchor + piece
                continue
            m = added_re.search(piece)
            cut = m.start() if m else len(piece)
            after_text.append(j)
            heads.append(piece[:cut])
            to_encode[j] = piece[cut:]
    encoded = _encode_all(tok, to_encode, progress)
    if continued:
        enc = getattr(continuation, "encode_batch_fast", None) or continuation.encode_batch
        for j, head in zip(after_text, enc(heads, add_special_tokens=False)):
            encoded[j] = head.ids + encoded[j]
        for j in after_added:
            if not encoded[j] or encoded[j][0] != anchor_id:
                raise RuntimeError(f"tokenizer did not keep the anchor {anchor!r} as one token")
            encoded[j] = encoded[j][1:]
    if pre_ids is not None:  # merge known and encoded pieces, in order
        it = iter(encoded)
        encoded = [ids if ids is not None else next(it) for ids in piece_ids]

    # Vectorized assembly: flat ids of all pieces (already in row order), labels by piece.
    n_total = len(encoded)
    lens = np.fromiter(map(len, encoded), np.int64, n_total)
    piece_off = np.zeros(n_total + 1, np.int64)
    np.cumsum(lens, out=piece_off[1:])
    total = int(piece_off[-1])
    if total >= 2**31:
        raise ValueError("tokenize_rows: more than 2**31 tokens in one table; split the input")
    flat = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, total)
    labels = np.where(np.repeat(np.array(trained, bool), lens), flat, np.int32(IGNORE_INDEX)).astype(np.int32)
    for j, lab in explicit.items():
        labels[piece_off[j]:piece_off[j + 1]] = lab

    fp = np.array(first_piece, np.int64)
    row_start = piece_off[fp]
    row_end = piece_off[fp + np.array(n_pieces, np.int64)]
    row_len = row_end - row_start
    nonempty = row_len > 0
    labels[row_start[nonempty]] = IGNORE_INDEX  # nothing predicts a row's first token
    cum_trained = np.zeros(total + 1, np.int64)
    np.cumsum(labels != IGNORE_INDEX, out=cum_trained[1:])
    n_trained = cum_trained[row_end] - cum_trained[row_start]
    processed = np.ones(n, bool)
    processed[[r for r, _, _ in rejects]] = False
    for r in np.flatnonzero(processed & ~nonempty).tolist():
        rejects.append((r, row_ids[r], "empty text"))
    for r in np.flatnonzero(processed & nonempty & (n_trained == 0)).tolist():
        rejects.append((r, row_ids[r], "no trainable token"))
    keep = processed & nonempty & (n_trained > 0)

    if not keep.all():
        token_keep = np.repeat(keep, row_len)
        flat = flat[token_keep]
        labels = labels[token_keep]
    kept_len = row_len[keep]
    offsets = np.zeros(len(kept_len) + 1, np.int64)
    np.cumsum(kept_len, out=offsets[1:])
    offsets = offsets.astype(np.int32)
    kept_ids = [row_ids[r] for r in np.flatnonzero(keep).tolist()]
    offs = pa.array(offsets)
    table = pa.Table.from_arrays(
        [
            pa.array(kept_ids, pa.int64()),
            pa.ListArray.from_arrays(offs, pa.array(flat)),
            pa.ListArray.from_arrays(offs, pa.array(labels)),
        ],
        schema=TOKENIZED_SCHEMA,
    )
    rejects.sort(key=lambda x: x[0])
    return table, [(row_id, reason) for _, row_id, reason in rejects]
