"""Tokenizer identity, saving, pre-tokenized passthrough, piece-wise tokenization properties."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.core.config import DataConfig, TemplateConfig, TokenizerConfig
from trainer.core.template_setup import load_template_setup
from trainer.data.templating import TEMPLATED_SCHEMA, save_tokenizer, setup_template, template_rows
from trainer.data.tokenization import tokenize_rows
from trainer.data.tokenizer_loading import TINY_TOKENIZER_DIR, load_tokenizer, tokenizer_identity


@pytest.fixture(scope="module")
def llama3():
    tok = load_tokenizer(TokenizerConfig(path="builtin:llama3"))
    return tok, setup_template(tok, TemplateConfig(source="tokenizer"))


REPO = Path(__file__).resolve().parents[1]
# The shipped tiny tokenizer is quick to load and hash; Llama-3 (6 MB of vocab) stands in
# until it exists.
SMALL = "builtin:tiny" if (TINY_TOKENIZER_DIR / "tokenizer.json").is_file() else "builtin:llama3"


def test_identity_same_content_same_id_and_changes_with_content():
    a = load_tokenizer(TokenizerConfig(path=SMALL))
    b = load_tokenizer(TokenizerConfig(path=SMALL))
    assert a is not b and tokenizer_identity(a) == tokenizer_identity(b)
    base = tokenizer_identity(a)
    # runtime padding/truncation state is not content
    a._tokenizer.enable_truncation(16)
    assert tokenizer_identity(a) == base
    a._tokenizer.no_truncation()

    b.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_identity(b) != base
    b.chat_template = a.chat_template
    assert tokenizer_identity(b) == base
    b.add_tokens(["<extra_token>"])
    assert tokenizer_identity(b) != base
    c = load_tokenizer(TokenizerConfig(path=SMALL))
    c.add_special_tokens({"pad_token": "<|pad|>"})
    assert tokenizer_identity(c) != base
    c = load_tokenizer(TokenizerConfig(path=SMALL))
    c.padding_side = "left"
    assert tokenizer_identity(c) != base


def test_identity_is_the_same_in_another_process():
    # Identities key the store across processes (Dagster runs each step in its own): nothing
    # process-specific (hash seed, object ids, load order) may enter them.
    code = ("from trainer.core.config import TokenizerConfig; from trainer.data.tokenizer_loading import load_tokenizer, "
            f"tokenizer_identity; print(tokenizer_identity(load_tokenizer(TokenizerConfig(path={SMALL!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == tokenizer_identity(load_tokenizer(TokenizerConfig(path=SMALL)))


@pytest.mark.parametrize("library", ["transformers", "tokenizers"])
def test_identity_changes_with_the_tokenization_library_version(monkeypatch, library):
    # The same files tokenize differently under another transformers/tokenizers release.
    module = importlib.import_module(library)
    tok = load_tokenizer(TokenizerConfig(path=SMALL))
    base = tokenizer_identity(tok)
    monkeypatch.setattr(module, "__version__", module.__version__ + "+upgraded")
    assert tokenizer_identity(tok) != base
    monkeypatch.undo()
    assert tokenizer_identity(tok) == base


def test_identity_of_llama3_copies(llama3):
    tok, _ = llama3
    other = load_tokenizer(TokenizerConfig(path="builtin:llama3"))
    setup_template(other, TemplateConfig(source="tokenizer"))
    assert tokenizer_identity(other) == tokenizer_identity(tok)


def test_identity_ignores_name_and_survives_save(tmp_path):
    tok = load_tokenizer(TokenizerConfig(path=SMALL))
    setup = setup_template(tok, TemplateConfig(source="tokenizer"))
    save_tokenizer(tok, setup, tmp_path / "tok")
    loaded = load_tokenizer(TokenizerConfig(path="tok"), base_dir=tmp_path)
    assert loaded.name_or_path != tok.name_or_path
    assert tokenizer_identity(loaded) == tokenizer_identity(tok)
    assert load_template_setup(tmp_path / "tok") == setup
    saved = json.loads((tmp_path / "tok" / "template_setup.json").read_text())
    assert saved["eot_token"] == setup.eot_token and saved["pad_token"] == "<|pad|>"
    assert loaded.chat_template == setup.chat_template
    # setting up the saved tokenizer again changes nothing
    again = setup_template(loaded, TemplateConfig(source="tokenizer"))
    assert again.eot_token == setup.eot_token and again.added_tokens == [] and not again.embeddings_must_grow
    assert tokenizer_identity(loaded) == tokenizer_identity(tok)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer(TokenizerConfig(path="./missing_tokenizer"), base_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown builtin"):
        load_tokenizer(TokenizerConfig(path="builtin:nope"))
    with pytest.raises(FileNotFoundError, match="template.source"):
        setup_template(load_tokenizer(TokenizerConfig(path=SMALL)), TemplateConfig(source="no/such.jinja"))


def _pretokenized(rows):
    n = len(rows)
    return pa.Table.from_arrays(
        [pa.array([r[0] for r in rows], pa.int64()), pa.array([None] * n, pa.string()),
         pa.array([None] * n, pa.list_(pa.int32())), pa.array([None] * n, pa.list_(pa.int32())),
         pa.array([r[1] for r in rows], pa.list_(pa.int32())), pa.array([r[2] for r in rows], pa.list_(pa.int32()))],
        schema=TEMPLATED_SCHEMA)


def test_pretokenized_passthrough_and_rejects(llama3):
    tok, setup = llama3
    v = len(tok)
    table = _pretokenized([
        (0, [5, 6, 7], None),                 # trains all tokens but the first
        (1, [5, 6, 7, 8], [-100, -100, 7, 8]),
        (2, [5, v], None),                    # outside the vocabulary
        (3, [5, -1], None),
        (4, [5, 6], [5]),                     # length mismatch
        (5, [5, 6], [5, 7]),                  # label is another token
        (6, [5, 6], [-100, -100]),            # nothing to train
        (7, [5], None),                       # one token: nothing predicts it
        (8, None, None),
        (9, [5, None], None),
    ])
    out, rejects = tokenize_rows(table, tok, progress=False)
    assert out.schema == pa.schema([("row_id", pa.int64()), ("input_ids", pa.list_(pa.int32())),
                                    ("labels", pa.list_(pa.int32()))])
    assert out.to_pylist() == [
        {"row_id": 0, "input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"row_id": 1, "input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    ]
    assert rejects == [
        (2, f"input_ids: id {v} outside the vocabulary (size {v})"),
        (3, f"input_ids: id -1 outside the vocabulary (size {v})"),
        (4, "labels: length 1 does not match input_ids length 2"),
        (5, "labels[1]: 7 is neither -100 nor the token id 6"),
        (6, "no trainable token"),
        (7, "no trainable token"),
        (8, "empty row (no text and no input_ids)"),
        (9, "input_ids: non-int id"),
    ]
    assert table.num_rows == out.num_rows + len(rejects)


def test_pretokenized_through_template_rows(llama3):
    tok, setup = llama3
    table, rejects = template_rows([(0, {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}),
                                    (1, {"input_ids": [1, 2.5]})], tok, setup, DataConfig(), progress=False)
    assert rejects == [(1, "input_ids[1]: expected int, got float")]
    assert table.column("text").to_pylist() == [None]
    out, rejects = tokenize_rows(table, tok, progress=False)
    assert rejects == [] and out.to_pylist() == [{"row_id": 0, "input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]


text_st = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None)
@given(prompt=text_st, completion=text_st.filter(lambda s: s != ""))
def test_pieces_rebuild_the_text_and_keep_prompt_tokens(llama3, prompt, completion):
    tok, setup = llama3
    table, rejects = template_rows([(0, {"prompt": prompt, "completion": completion})], tok, setup, DataConfig(),
                                   progress=False)
    assert rejects == []
    out, rejects = tokenize_rows(table, tok, progress=False)
    assert rejects == []
    ids, labels = out.column("input_ids")[0].as_py(), out.column("labels")[0].as_py()
    head = prompt if prompt.startswith(tok.bos_token) else tok.bos_token + prompt  # bos never doubled
    text = head + completion
    text = text if text.endswith(tok.eos_token) else text + tok.eos_token
    assert tok.decode(ids, skip_special_tokens=False) == text
    prompt_ids = tok(head, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]


def test_prefix_space_tokenizer_pieces_get_no_spurious_prefix():
    """SentencePiece-style tokenizers (Metaspace, prepend_scheme=first) mark every separately
    encoded piece as a word start; non-first pieces are encoded after a dropped anchor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the cat sat on the mat", "what is the answer", "answer: yes it is", "Paris is in France"] * 10
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    setup = setup_template(tok, TemplateConfig(source="chatml"))
    table, _ = template_rows([(0, {"prompt": "what is the answer:", "completion": "yes it is"})], tok, setup,
                             DataConfig(), progress=False)
    out, rejects = tokenize_rows(table, tok, progress=False)
    ids, labels = out.column("input_ids")[0].as_py(), out.column("labels")[0].as_py()
    assert rejects == []
    assert tok.decode(ids, skip_special_tokens=False) == "what is the answer:yes it is</s>"
    prompt_ids = tok("what is the answer:", add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    completion_tokens = tok.convert_ids_to_tokens(ids[len(prompt_ids):])
    assert not completion_tokens[0].startswith("\u2581")  # no word-start marker before "yes"
