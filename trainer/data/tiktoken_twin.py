"""The same ids as a tokenizer's `tokenizers` backend, from tiktoken, for the byte-level BPE
tokenizers that came from a tiktoken vocabulary (Llama-3 and its family).

Encoding is most of preparing a dataset, and tiktoken on one thread encodes such text 2.4–2.6× as
fast as the `tokenizers` library's batch call on two (BENCHMARKS.md). It stands in only where the
tokenizer.json says both compute the same function, and after agreeing with the backend on probe
texts:
- no normalizer; the pre-tokenizer a regex Split (isolated pieces) then ByteLevel with neither a
  regex nor a prefix space: the pieces tiktoken's `pat_str` cuts;
- BPE that takes a piece found in the vocabulary whole (`ignore_merges`, as tiktoken does), no
  dropout, no unknown token, no byte fallback, and merges ordered by the id they make: merging the
  pair of lowest rank (tiktoken) is then merging the first merge that applies (tokenizers);
- added tokens matched as written (no stripping, no single-word rule), split off before encoding
  as the backend does (leftmost, longest first), and no truncation or padding set on the backend.
Otherwise, or without tiktoken installed: None, and the backend encodes.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from typing import Any, Optional

log = logging.getLogger(__name__)

# Texts where tokenizers and tiktoken could part if their regex engines or rules differed:
# contractions in any case, case-folding look-alikes, digit runs, whitespace runs before text and
# at the end, line ends, non-Latin scripts, combining marks, emoji sequences, symbols, code.
PROBES = [
    "Hello world! I'M sure it's fine; they'LL see, we'Ve 'd 'S 'T 'RE",
    "ſ K 'ſ 'K İstanbul ǅ ﬁ",
    "1234567 89 0.5e-10 ١٢٣٤ １２３ Ⅻ ² ½",
    "  lead\ttab\t\tx  \n\n\n  y \r\n\r\nz   \n ",
    "no\u00a0break\u2009thin\u3000ideo\u2028line\u2029para\u0085next\u000bvt\u000cff",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "مرحبا بالعالم עברית हिन्दी में नमस्ते ภาษาไทย",
    "e\u0301 n\u0303o a\u030a\u0327 Z\u0336",
    "👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️ ✓ ∑∫ ←→ €£¥",
    "def f(x):\n    return x**2  # ok\n\tif a!=b: print(\"{}\".format(a))\n",
    "<div class='x'>&nbsp;</div> https://example.com/a?b=c&d=e#f",
    "   ",
    "\n",
    "",
]


def bytes_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode as table

    return table()


class TiktokenTwin:
    """Encodes texts as the backend would with `add_special_tokens=False`."""

    def __init__(self, core: Any, added: dict[str, int]):
        self._encode_ordinary = core.encode_ordinary
        self._added = added
        alternatives = "|".join(map(re.escape, sorted(added, key=len, reverse=True)))
        self._added_re = re.compile(f"({alternatives})") if added else None

    def encode(self, text: str) -> list[int]:
        if self._added_re is None:
            return self._encode_ordinary(text)
        parts = self._added_re.split(text)  # text, added token, text, ...
        if len(parts) == 1:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._added[part])
            elif part:
                ids += self._encode_ordinary(part)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def _split_pattern(spec: dict) -> Optional[str]:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    if (split.get("type") != "Split" or pattern is None or split.get("behavior") != "Isolated"
            or split.get("invert")):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        return None
    return pattern


def _whole_word_bpe(model: dict) -> bool:
    return (model.get("type") == "BPE" and model.get("ignore_merges") is True and not model.get("dropout")
            and model.get("unk_token") is None and not model.get("byte_fallback")
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"))


def _ranks(model: dict) -> Optional[dict[bytes, int]]:
    """Byte strings → ids, where the merges are ordered by the id they make; else None."""
    import numpy as np

    to_latin1 = {ord(ch): b for b, ch in bytes_to_unicode().items()}  # each byte's character → the byte
    to_latin1.update({c: 0xFFFF for c in range(256) if c not in to_latin1})  # not in the alphabet: fails
    vocab = model["vocab"]
    try:
        ranks = {token.translate(to_latin1).encode("latin-1"): i for token, i in vocab.items()}
    except UnicodeEncodeError:  # a token outside the byte alphabet
        return None
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    merges = model.get("merges") or []
    # "a b" (byte-level tokens hold no space) or ["a", "b"]
    joined = [m.replace(" ", "") if isinstance(m, str) else "".join(m) for m in merges]
    made = np.fromiter((vocab.get(t, -1) for t in joined), np.int64, len(joined))
    if (made < 0).any() or (np.diff(made) < 0).any():
        return None
    return ranks


def _build(tok: Any) -> Optional[TiktokenTwin]:
    try:
        import tiktoken
    except ImportError:
        return None
    backend = tok._tokenizer
    if getattr(backend, "encode_special_tokens", False):  # added tokens not split off
        return None
    spec = json.loads(backend.to_str())
    pattern = _split_pattern(spec)
    added = spec.get("added_tokens") or []
    if (pattern is None or spec.get("normalizer") is not None or not _whole_word_bpe(spec.get("model") or {})
            or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added)):
        return None
    ranks = _ranks(spec["model"])
    if ranks is None:
        return None
    try:
        core = tiktoken.Encoding("sftdag-twin", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})._core_bpe
    except Exception as e:  # a pattern tiktoken's regex engine does not take
        log.debug("tiktoken cannot take this tokenizer: %s", e)
        return None
    twin = TiktokenTwin(core, {t["content"]: t["id"] for t in added})
    added_texts = [f"{t['content']}x {t['content']}" for t in added]
    probes = PROBES + added_texts + ["".join(PROBES)]
    expected = [e.ids for e in backend.encode_batch(probes, add_special_tokens=False)]
    for text, ids in zip(probes, expected):
        if twin.encode(text) != ids:
            log.warning("tiktoken encodes %r unlike this tokenizer; encoding with the tokenizer itself", text)
            return None
    return twin


_TWINS: "weakref.WeakKeyDictionary[Any, Optional[TiktokenTwin]]" = weakref.WeakKeyDictionary()


def tiktoken_twin(tok: Any) -> Optional[TiktokenTwin]:
    """The twin of a fast tokenizer, built once per tokenizer object; None where there is none, or
    while the backend is set to truncate or pad (transformers sets that per call)."""
    if tok._tokenizer.truncation or tok._tokenizer.padding:
        return None
    try:
        return _TWINS[tok]
    except KeyError:
        pass
    try:
        twin = _build(tok)
    except Exception as e:  # a tokenizer.json shaped unlike any seen: the backend encodes, as before
        log.warning("no tiktoken twin for this tokenizer (%s: %s); encoding with the tokenizer itself",
                    type(e).__name__, e)
        twin = None
    _TWINS[tok] = twin
    return twin
