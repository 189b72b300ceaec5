"""Format detection, normalisation, formatting functions and row rejects."""

from __future__ import annotations

import pytest

from trainer.core.config import DataConfig, FieldNames, TemplateConfig, TokenizerConfig
from trainer.core.schemas import IGNORE_INDEX
from trainer.data.record_formats import Example, RowError, detect_format, load_formatting_func, normalize
from trainer.data.templating import setup_template, template_rows
from trainer.data.tokenization import tokenize_rows
from trainer.data.tokenizer_loading import load_tokenizer

F = FieldNames()
MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def qa_formatter(record: dict) -> str:
    """A formatting function addressed by dotted path in the tests below."""
    return f"Q: {record['q']}\nA: {record['a']}"


def bad_formatter(record: dict):
    return len(record)


@pytest.fixture(scope="module")
def llama3():
    tok = load_tokenizer(TokenizerConfig(path="builtin:llama3"))
    return tok, setup_template(tok, TemplateConfig(source="tokenizer"))


@pytest.mark.parametrize(
    "record,expected",
    [
        ({"messages": MSGS}, "messages"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"prompt": MSGS[:1], "completion": MSGS[1:]}, "prompt_completion"),
        ({"text": "t", "meta": 1}, "text"),
        ({"input_ids": [1, 2], "text": "t"}, "tokens"),
        ({"messages": MSGS, "text": "ignored"}, "messages"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record, F) == expected


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"prompt": "p"}, "missing field 'completion'"),
        ({"completion": "c"}, "missing field 'prompt'"),
        ({"title": "x"}, "no known format"),
        ({"text": None}, "no known format"),
    ],
)
def test_detect_format_errors(record, reason):
    with pytest.raises(RowError, match=reason):
        detect_format(record, F)


def test_sharegpt_conversion():
    rec = {"conversations": [
        {"from": "system", "value": "sys"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"}, {"from": "model", "value": "a2"}, {"from": "function", "value": "f"},
        {"from": "tool", "value": "t"}, {"from": "assistant", "value": "a3"},
    ]}
    ex = normalize(rec, DataConfig())
    assert ex.kind == "messages"
    assert [m["role"] for m in ex.messages] == [
        "system", "user", "assistant", "user", "assistant", "tool", "tool", "assistant"]
    assert [m["content"] for m in ex.messages] == ["sys", "q1", "a1", "q2", "a2", "f", "t", "a3"]
    with pytest.raises(RowError, match=r"conversations\[1\]\.from: unknown role 'bot'"):
        normalize({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}, DataConfig())


def test_normalize_each_format():
    assert normalize({"messages": MSGS}, DataConfig()) == Example(kind="messages", messages=MSGS)
    assert normalize({"prompt": "p", "completion": "c"}, DataConfig()) == Example(
        kind="prompt_completion", prompt="p", completion="c")
    assert normalize({"text": "t"}, DataConfig()) == Example(kind="text", text="t")
    assert normalize({"input_ids": [1, 2]}, DataConfig()) == Example(kind="tokens", input_ids=[1, 2])
    # extra keys on messages are dropped; the role/content pair is what templates see
    ex = normalize({"messages": [{"role": "user", "content": "x", "name": "n"}]}, DataConfig())
    assert ex.messages == [{"role": "user", "content": "x"}]


def test_field_renaming():
    data = DataConfig(fields=FieldNames(messages="dialog", role="speaker", content="utterance",
                                        prompt="question", completion="answer", text="body"))
    ex = normalize({"dialog": [{"speaker": "user", "utterance": "hi"}]}, data)
    assert ex.messages == [{"role": "user", "content": "hi"}]
    ex = normalize({"question": "q", "answer": "a"}, data)
    assert (ex.kind, ex.prompt, ex.completion) == ("prompt_completion", "q", "a")
    assert normalize({"body": "b"}, data).text == "b"
    with pytest.raises(RowError, match="no known format"):
        normalize({"text": "not under the configured name"}, data)
    with pytest.raises(RowError, match=r"dialog\[0\]: missing field 'speaker'"):
        normalize({"dialog": [{"role": "user", "content": "hi"}]}, data)


def test_explicit_format_is_honoured():
    data = DataConfig(format="text")
    assert normalize({"text": "t", "messages": MSGS}, data).kind == "text"
    with pytest.raises(RowError, match="missing field 'text'"):
        normalize({"messages": MSGS}, data)


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"messages": []}, "messages: empty message list"),
        ({"messages": "hi"}, "messages: expected a list of messages, got str"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role: unknown role 'bot'"),
        ({"messages": [MSGS[0], {"role": "assistant", "content": 5}]},
         "messages[1].content: content must be a string, got int"),
        ({"messages": [MSGS[0], {"role": "assistant"}]}, "messages[1]: missing field 'content'"),
        ({"messages": [MSGS[0], "x"]}, "messages[1]: expected an object, got str"),
        ({"prompt": "p", "completion": 3}, "completion: expected string or message list, got int"),
        ({"prompt": "p", "completion": MSGS}, "prompt/completion: both must be strings or both message lists (got str and list)"),
        ({"text": 12}, "text: expected string, got int"),
        ({"input_ids": [1, "2"]}, "input_ids[1]: expected int, got str"),
        ({"input_ids": [1, 2], "labels": [1]}, "labels: length 1 does not match input_ids length 2"),
        ({"input_ids": []}, "input_ids: empty"),
    ],
)
def test_bad_inputs(record, reason):
    with pytest.raises(RowError) as e:
        normalize(record, DataConfig())
    assert e.value.reason == reason


def test_not_a_mapping():
    with pytest.raises(RowError, match="record: expected an object, got list"):
        normalize([1, 2], DataConfig())


def test_formatting_func_by_dotted_path():
    for dotted in (f"{__name__}:qa_formatter", f"{__name__}.qa_formatter"):
        func = load_formatting_func(dotted)
        assert func is qa_formatter
        data = DataConfig(format="formatting_func", formatting_func=dotted)
        assert normalize({"q": "2+2?", "a": "4"}, data) == Example(kind="text", text="Q: 2+2?\nA: 4")
    with pytest.raises(ValueError, match="has no attribute"):
        load_formatting_func(f"{__name__}:nope")
    with pytest.raises(ValueError, match="cannot import module"):
        load_formatting_func("no_such_module_xyz:f")
    data = DataConfig(format="formatting_func", formatting_func=f"{__name__}:qa_formatter")
    with pytest.raises(RowError, match="formatting_func raised KeyError"):
        normalize({"q": "only a question"}, data)
    with pytest.raises(RowError, match="formatting_func: expected string, got int"):
        normalize({"q": 1}, DataConfig(format="formatting_func", formatting_func=f"{__name__}:bad_formatter"))


def test_formatting_func_rows_with_response_template(llama3):
    tok, setup = llama3
    data = DataConfig(format="formatting_func", formatting_func=f"{__name__}:qa_formatter", response_template="A:")
    table, rejects = template_rows([(0, {"q": "2+2?", "a": "4"}), (1, {"q": "x"})], tok, setup, data, progress=False)
    assert rejects == [(1, "formatting_func raised KeyError: 'a'")]
    out, rej = tokenize_rows(table, tok, progress=False)
    ids, labels = out.column("input_ids")[0].as_py(), out.column("labels")[0].as_py()
    assert rej == [] and tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == " 4<|end_of_text|>"


def test_mixed_rows_reject_counts_and_reasons(llama3):
    tok, setup = llama3
    records = [
        {"messages": MSGS},                                              # 0 ok
        {"messages": [{"role": "bot", "content": "x"}]},                 # 1 unknown role
        {"prompt": "2+2=", "completion": "4"},                           # 2 ok
        {"prompt": "2+2="},                                              # 3 missing completion
        {"text": "plain"},                                               # 4 ok
        {"messages": [{"role": "user", "content": "only a question"}]},  # 5 no assistant
        {"input_ids": [1, 2, 3]},                                        # 6 ok (pre-tokenized)
        {"input_ids": [1, 2, 10**7]},                                    # 7 outside vocab (tokenize)
        {"input_ids": [1, 2, 3], "labels": [-100, 5, 3]},                # 8 label != token (tokenize)
        {"input_ids": [1, 2], "labels": [-100, -100]},                   # 9 no trainable (tokenize)
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},  # 10 ok
        {"prompt": "p", "completion": ""},                               # 11 empty completion
        {"messages": []},                                                # 12 empty
        {"text": "   "},                                                 # 13 empty text
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},  # 14 ok
    ]
    rows = [(100 + i, r) for i, r in enumerate(records)]
    table, rejects = template_rows(rows, tok, setup, DataConfig(), progress=False)
    assert rejects == [
        (101, "messages[0].role: unknown role 'bot'"),
        (103, "missing field 'completion'"),
        (105, "no assistant message to train on"),
        (111, "completion: empty"),
        (112, "messages: empty message list"),
        (113, "text: empty"),
    ]
    assert len(rows) == table.num_rows + len(rejects)
    out, rejects2 = tokenize_rows(table, tok, progress=False)
    assert rejects2 == [
        (107, f"input_ids: id {10**7} outside the vocabulary (size {len(tok)})"),
        (108, "labels[1]: 5 is neither -100 nor the token id 2"),
        (109, "no trainable token"),
    ]
    assert table.num_rows == out.num_rows + len(rejects2)
    assert out.column("row_id").to_pylist() == [100, 102, 104, 106, 110, 114]
    for ids, labels in zip(out.column("input_ids").to_pylist(), out.column("labels").to_pylist()):
        assert len(ids) == len(labels) and labels[0] == IGNORE_INDEX and any(lab != IGNORE_INDEX for lab in labels)
