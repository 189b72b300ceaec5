"""The tiktoken twin gives exactly the backend's ids, over any text, and stands in only where the
tokenizer's structure says it can."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from trainer.core.config import TokenizerConfig
from trainer.data import tiktoken_twin as twin_module
from trainer.data import tokenization
from trainer.data.templating import TEMPLATED_SCHEMA
from trainer.data.tiktoken_twin import tiktoken_twin
from trainer.data.tokenization import tokenize_rows
from trainer.data.tokenizer_loading import load_tokenizer, tokenizer_identity


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(TokenizerConfig(path="builtin:llama3"))


def backend_ids(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


# Fragments where a regex engine or a BPE rule could part: contractions in any case, digit runs,
# whitespace of every kind, line ends, scripts, combining marks, emoji, look-alikes, added tokens.
FRAGMENTS = ["'s", "'S", "'ll", "'LL", "'Re", "'ve", "'M", "'d", "'t", "ſ", "K", "İ", "123", "4567890", "١٢٣",
             "１２", "Ⅻ", "²", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u2009", "\u3000",
             "\u2028", "\u0085", "\x0b", "\x0c", "e\u0301", "\u0303", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️",
             "日本語", "中文", "한국어", "مرحبا", "עברית", "हिन्दी", "ภาษา", "Hello", " world", "x", "_",
             "def f(x):", "    return", "**", "!=", "{}", "<div>", "&nbsp;", "https://a.b/c?d=e", "...", "—", "€",
             "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_7|>", "<|", "|>",
             "<|eot_id", "\x00", "\x7f", "\ufffd", "\U0001f600", "\U00010348"]

text_st = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=80),
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)),
             max_size=20).map("".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(text_st, min_size=1, max_size=25))
def test_the_twin_encodes_any_text_as_the_tokenizer_does(llama3, texts):
    twin = tiktoken_twin(llama3)
    assert twin is not None
    assert twin.encode_batch(texts) == backend_ids(llama3, texts)


def test_the_twin_agrees_over_long_mixed_documents(llama3):
    # Longer texts than the property's: whole documents glued from many scripts and layouts.
    rng = random.Random(0)
    pool = [chr(c) for c in range(0x20, 0x3000) if chr(c).isprintable()] + FRAGMENTS * 20
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(100, 3000))) for _ in range(60)]
    assert tiktoken_twin(llama3).encode_batch(texts) == backend_ids(llama3, texts)


def templated_table(rows: list[tuple[str, list[tuple[int, int]]]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"row_id": i, "text": text, "span_starts": [s for s, _ in spans], "span_ends": [e for _, e in spans]}
         for i, (text, spans) in enumerate(rows)], schema=TEMPLATED_SCHEMA)


def test_tokenized_rows_are_the_same_with_and_without_the_twin(llama3, monkeypatch):
    rng = random.Random(1)
    rows = []
    for _ in range(300):
        prompt = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 15)))
        answer = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 15)))
        text = (f"<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>")
        start = text.rindex(answer + "<|eot_id|>")
        rows.append((text, [(start, len(text))]))
    table = templated_table(rows)
    used = []
    real = twin_module.TiktokenTwin.encode_batch
    monkeypatch.setattr(twin_module.TiktokenTwin, "encode_batch", lambda self, t: used.append(len(t)) or real(self, t))
    with_twin = tokenize_rows(table, llama3, progress=False)
    assert used  # the twin encoded them
    monkeypatch.setattr(tokenization, "tiktoken_twin", lambda tok: None)
    assert tokenize_rows(table, llama3, progress=False) == with_twin


def llama3_spec(llama3) -> dict:
    return json.loads(llama3._tokenizer.to_str())


def with_backend(llama3, spec: dict):
    tok = load_tokenizer(TokenizerConfig(path="builtin:llama3"))
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return tok


def no_normalizer_allowed(spec):
    spec["normalizer"] = {"type": "NFC"}


def merges_out_of_id_order(spec):
    merges = spec["model"]["merges"]
    merges[10], merges[5000] = merges[5000], merges[10]


def merges_applied_to_vocabulary_words(spec):
    spec["model"]["ignore_merges"] = False


def a_stripping_added_token(spec):
    spec["added_tokens"][9]["lstrip"] = True


def a_prefix_space(spec):
    spec["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True


def gpt2_pre_tokenizer(spec):
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def a_regex_tiktoken_does_not_take(spec):
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\X|\s+"  # Oniguruma's grapheme cluster


def a_regex_tiktoken_reads_otherwise(spec):
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"(?~ )|\s+"  # Oniguruma's absent operator


@pytest.mark.parametrize("change", [no_normalizer_allowed, merges_out_of_id_order, merges_applied_to_vocabulary_words,
                                    a_stripping_added_token, a_prefix_space, gpt2_pre_tokenizer,
                                    a_regex_tiktoken_does_not_take, a_regex_tiktoken_reads_otherwise])
def test_no_twin_where_the_structure_differs(llama3, change):
    spec = llama3_spec(llama3)
    change(spec)
    assert tiktoken_twin(with_backend(llama3, spec)) is None


def test_no_twin_for_other_tokenizers_or_while_truncating_or_without_tiktoken(llama3, monkeypatch):
    assert tiktoken_twin(load_tokenizer(TokenizerConfig(path="builtin:tiny"))) is None
    tok = load_tokenizer(TokenizerConfig(path="builtin:llama3"))
    tok._tokenizer.enable_truncation(8)
    assert tiktoken_twin(tok) is None
    tok._tokenizer.no_truncation()
    assert tiktoken_twin(tok) is not None
    monkeypatch.setitem(__import__("sys").modules, "tiktoken", None)
    assert tiktoken_twin(load_tokenizer(TokenizerConfig(path="builtin:llama3"))) is None


def test_a_twin_that_disagrees_on_a_probe_is_refused(llama3, monkeypatch, caplog):
    real = twin_module.TiktokenTwin.encode
    monkeypatch.setattr(twin_module.TiktokenTwin, "encode", lambda self, text: real(self, text)[:-1] or [0])
    assert tiktoken_twin(load_tokenizer(TokenizerConfig(path="builtin:llama3"))) is None
    assert "unlike this tokenizer" in caplog.text


def test_the_tiktoken_version_is_part_of_the_tokenizer_identity(llama3, monkeypatch):
    from trainer.data import tokenizer_loading

    base = tokenizer_identity(llama3)
    real = tokenizer_loading.installed_version
    monkeypatch.setattr(tokenizer_loading, "installed_version",
                        lambda name: "0.0+other" if name == "tiktoken" else real(name))
    assert tokenizer_identity(llama3) != base


def test_a_twin_whose_build_fails_leaves_the_tokenizer_to_encode(llama3, monkeypatch, caplog):
    def unreadable(model):
        raise KeyError("vocab")

    monkeypatch.setattr(twin_module, "_ranks", unreadable)
    tok = load_tokenizer(TokenizerConfig(path="builtin:llama3"))
    assert tiktoken_twin(tok) is None
    assert "no tiktoken twin for this tokenizer (KeyError" in caplog.text
    table = templated_table([("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", [(45, 50)])])
    assert tokenize_rows(table, tok, progress=False)[0].num_rows == 1
