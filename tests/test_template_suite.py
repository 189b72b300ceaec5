"""Assistant-only masks over many real chat templates and tokenizer families.

The templates in tests/chat_templates/ are written from the model families' published chat
templates (README there). For every template, tokenizer and conversation: the decoded trained
tokens are exactly each assistant turn's content followed by the end-of-turn text the family's
format puts after it (written down here by hand, not computed by the code under test), and the
row's tokens decode as the tokenizer decodes the whole rendering tokenized at once. Rows a template
refuses are rejects carrying the template's own message.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest

from tests.sentencepiece import FAMILIES, build
from tests.test_masks import CONVERSATION
from trainer.core.config import DataConfig, TemplateConfig, TokenizerConfig
from trainer.data.record_formats import normalize
from trainer.data.templating import generation_prompt, setup_template, template_rows
from trainer.data.tokenization import tokenize_rows
from trainer.data.tokenizer_loading import TEMPLATES_DIR, load_tokenizer

IGNORE = -100
TEMPLATE_DIR = Path(__file__).parent / "chat_templates"


def eos(tok):
    return tok.eos_token


# name: (template file, end-of-turn text after assistant content, how a system message fares:
#        None = written; else the reject reason the row gets)
TEMPLATES = {
    "llama2": ("llama2.jinja", lambda t: " " + t.eos_token, None),
    "llama3": (str(TEMPLATES_DIR / "llama3.jinja"), "<|eot_id|>", None),
    "chatml": ("chatml", "<|im_end|>", None),
    "mistral": ("mistral.jinja", eos, "chat template error: Conversation roles must alternate user/assistant"),
    "mixtral": ("mixtral.jinja", eos, None),
    # Mistral v0.3 writes the system message only into a LAST user turn, so a training text
    # (which ends with the answer) would silently lose it: a reject, never a quiet drop.
    "mistral_v3": ("mistral_v3.jinja", eos, "chat template does not write the content of messages[0] (system)"),
    "zephyr": ("zephyr.jinja", eos, None),
    "vicuna": ("vicuna.jinja", eos, None),
    "gemma": ("gemma.jinja", "<end_of_turn>", "chat template error: System role not supported"),
    "gemma3": ("gemma3.jinja", "<end_of_turn>", None),
    "phi3": ("phi3.jinja", "<|end|>", None),
    "phi4": ("phi4.jinja", "<|im_end|>", None),
    "qwen2_5": ("qwen2_5.jinja", "<|im_end|>", None),
    "qwen3": ("qwen3.jinja", "<|im_end|>", None),
    "openchat": ("openchat.jinja", "<|end_of_turn|>", None),
    "falcon": ("falcon.jinja", "", None),  # Falcon writes no end marker: the next turn's header follows
    "alpaca": ("alpaca.jinja", eos, None),
    "granite": ("granite.jinja", "<|end_of_text|>", None),
    "deepseek": ("deepseek.jinja", eos, None),
    "command_r": ("command_r.jinja", "<|END_OF_TURN_TOKEN|>", None),
}
TOKENIZERS = ("builtin:llama3", "builtin:tiny", *FAMILIES)

SYSTEM, *MULTI_TURN = CONVERSATION
CONVERSATIONS = {
    "multi_turn": MULTI_TURN,
    # The user's text also ends the earlier assistant turn ("Paris" after "...is Paris</s>").
    "echo": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "It is Paris"},
        {"role": "user", "content": "Paris"},
        {"role": "assistant", "content": "Yes: Paris."},
    ],
    "unicode": [
        {"role": "user", "content": "Übersetze: good morning"},
        {"role": "assistant", "content": "Guten Morgen!\nOder: café, 東京 ✓"},
    ],
}


@pytest.fixture(scope="module")
def base_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    loaded = {}
    for name in TOKENIZERS:
        path = str(build(name, root / name)) if name in FAMILIES else name
        loaded[name] = load_tokenizer(TokenizerConfig(path=path))
    return loaded


def set_up(base_tokenizers, tokenizer: str, template: str, **template_cfg):
    tok = copy.deepcopy(base_tokenizers[tokenizer])
    source = TEMPLATES[template][0]
    if source.endswith(".jinja") and "/" not in source:
        source = str(TEMPLATE_DIR / source)
    return tok, setup_template(tok, TemplateConfig(source=source, **template_cfg))


def expected_eot(tok, template: str) -> str:
    eot = TEMPLATES[template][1]
    return eot(tok) if callable(eot) else eot


def trained_runs(tok, ids, labels) -> list[str]:
    """The text of each maximal run of trained tokens, as it reads in the decoded row: decoding a
    run alone would lose what decoders do at a sequence start (SentencePiece drops a leading
    space there), so each run is the difference of two decoded prefixes."""
    assert len(ids) == len(labels) and labels[0] == IGNORE
    bounds, start = [], None
    for k, (t, lab) in enumerate(zip(ids, labels)):
        assert lab in (IGNORE, t)
        if lab != IGNORE and start is None:
            start = k
        elif lab == IGNORE and start is not None:
            bounds.append((start, k))
            start = None
    if start is not None:
        bounds.append((start, len(ids)))
    runs = []
    for a, b in bounds:
        head, upto = decode(tok, ids[:a]), decode(tok, ids[:b])
        assert upto.startswith(head)
        runs.append(upto[len(head):])
    return runs


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def prepare(tok, setup, records, data=None):
    data = data or DataConfig()
    table, rejects = template_rows(list(enumerate(records)), tok, setup, data, progress=False)
    tokenized, tok_rejects = tokenize_rows(table, tok, progress=False)
    assert tok_rejects == []
    return table, tokenized, dict(rejects)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_assistant_only_masks(base_tokenizers, template, tokenizer):
    tok, setup = set_up(base_tokenizers, tokenizer, template)
    eot = expected_eot(tok, template)
    system_reject = TEMPLATES[template][2]
    convs = list(CONVERSATIONS.values()) + [[SYSTEM] + CONVERSATIONS["multi_turn"]]
    table, tokenized, rejects = prepare(tok, setup, [{"messages": c} for c in convs])

    with_system = len(convs) - 1
    if system_reject is None:
        assert rejects == {}
    else:
        assert list(rejects) == [with_system] and rejects[with_system].startswith(system_reject)
    assert table.num_rows + len(rejects) == len(convs)  # rows in = rows out + rejects

    texts = dict(zip(table.column("row_id").to_pylist(), table.column("text").to_pylist()))
    rows = zip(tokenized.column("row_id").to_pylist(), tokenized.column("input_ids").to_pylist(),
               tokenized.column("labels").to_pylist())
    for row_id, ids, labels in rows:
        answers = [m["content"] for m in convs[row_id] if m["role"] == "assistant"]
        assert trained_runs(tok, ids, labels) == [a + eot for a in answers], (template, tokenizer, row_id)
        # Nothing spurious at piece boundaries: the row decodes as the rendering tokenized whole.
        whole = tok._tokenizer.encode(texts[row_id], add_special_tokens=False).ids
        assert decode(tok, ids) == decode(tok, whole)
        if tokenizer.startswith("builtin:"):  # byte-level BPE: decoding gives the rendering back
            assert decode(tok, ids) == texts[row_id]


@pytest.mark.parametrize("template", ["chatml", "llama2", "gemma3", "falcon"])
def test_completion_only_trains_the_last_turn(base_tokenizers, template):
    tok, setup = set_up(base_tokenizers, "builtin:llama3", template)
    conv = CONVERSATIONS["multi_turn"]
    _, tokenized, rejects = prepare(tok, setup, [{"messages": conv}], DataConfig(masking="completion_only"))
    assert rejects == {}
    [ids], [labels] = tokenized.column("input_ids").to_pylist(), tokenized.column("labels").to_pylist()
    assert trained_runs(tok, ids, labels) == ["Forty." + expected_eot(tok, template)]


# -- end of turn -----------------------------------------------------------------------------

def test_end_of_turn_after_whitespace_is_trained(base_tokenizers):
    """Llama-2 writes ' ' + content.strip() + ' ' + eos: the eos after the space is trained."""
    tok, setup = set_up(base_tokenizers, "sp-legacy", "llama2")
    assert setup.eot_token == "</s>"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Hello there!  "}]
    _, tokenized, _ = prepare(tok, setup, [{"messages": conv}])
    ids, labels = tokenized.column("input_ids")[0].as_py(), tokenized.column("labels")[0].as_py()
    assert trained_runs(tok, ids, labels) == ["Hello there! </s>"]
    assert labels[-1] == ids[-1] == tok.eos_token_id


def test_literal_markers_are_trained_as_text_and_reported(base_tokenizers, caplog):
    """Qwen's <|im_end|> is ordinary text for the Llama-3 tokenizer: still trained (as several
    tokens), and the set-up says so once and names the setting."""
    with caplog.at_level(logging.WARNING, logger="trainer.data.templating"):
        tok, setup = set_up(base_tokenizers, "builtin:llama3", "qwen2_5")
    assert setup.markers_not_special == ["<|im_start|>", "<|im_end|>"]
    assert sum("add_markers" in r.getMessage() for r in caplog.records) == 1
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1
    _, tokenized, _ = prepare(tok, setup, [{"messages": CONVERSATIONS["echo"]}])
    ids, labels = tokenized.column("input_ids")[0].as_py(), tokenized.column("labels")[0].as_py()
    assert trained_runs(tok, ids, labels) == ["It is Paris<|im_end|>", "Yes: Paris.<|im_end|>"]


def test_add_markers_makes_them_special_tokens(base_tokenizers):
    base = len(base_tokenizers["builtin:llama3"])
    tok, setup = set_up(base_tokenizers, "builtin:llama3", "gemma3", add_markers=True)
    assert setup.added_tokens == ["<|pad|>", "<start_of_turn>", "<end_of_turn>"] and setup.embeddings_must_grow
    assert setup.markers_not_special == [] and len(tok) == base + 3
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    _, tokenized, _ = prepare(tok, setup, [{"messages": CONVERSATIONS["multi_turn"]}])
    ids, labels = tokenized.column("input_ids")[0].as_py(), tokenized.column("labels")[0].as_py()
    trained_ends = [i for i, t in enumerate(ids) if t == end and labels[i] != IGNORE]
    assert len(trained_ends) == 3  # every answer's <end_of_turn>, one token each
    assert trained_runs(tok, ids, labels) == ["2 + 2 = 4.<end_of_turn>", "40<end_of_turn>", "Forty.<end_of_turn>"]
    # A named list adds exactly those.
    tok, setup = set_up(base_tokenizers, "builtin:llama3", "phi3", add_markers=["<|end|>"])
    assert setup.added_tokens == ["<|pad|>", "<|end|>"] and setup.markers_not_special == ["<|system|>", "<|user|>",
                                                                               "<|assistant|>"]


# -- empty assistant turns --------------------------------------------------------------------

EMPTY = [{"role": "user", "content": "Anything?"}, {"role": "assistant", "content": "  "},
         {"role": "user", "content": "Now answer."}, {"role": "assistant", "content": "Done."}]


@pytest.mark.parametrize("template", ["chatml", "llama2", "gemma3", "phi3"])
def test_empty_assistant_turn(base_tokenizers, template):
    tok, setup = set_up(base_tokenizers, "builtin:llama3", template)
    eot = expected_eot(tok, template).strip()
    table, _, rejects = prepare(tok, setup, [{"messages": EMPTY}])
    assert table.num_rows == 0 and rejects == {0: "empty assistant turn (messages[1])"}
    # Kept on request: the empty turn trains only its own end marker, never the previous message's.
    _, tokenized, rejects = prepare(tok, setup, [{"messages": EMPTY}], DataConfig(empty_assistant_turns="keep"))
    assert rejects == {}
    ids, labels = tokenized.column("input_ids")[0].as_py(), tokenized.column("labels")[0].as_py()
    runs = trained_runs(tok, ids, labels)
    assert runs == [eot, "Done." + expected_eot(tok, template)]


# -- tool calls ---------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "name": "get_weather", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
]


@pytest.mark.parametrize("tokenizer", ["builtin:llama3", "sp-legacy"])
def test_tool_calls_are_trained_and_tool_results_are_not(base_tokenizers, tokenizer):
    tok, setup = set_up(base_tokenizers, tokenizer, "qwen2_5")
    table, tokenized, rejects = prepare(tok, setup, [{"messages": TOOL_CONVERSATION, "tools": TOOLS}])
    assert rejects == {}
    text = table.column("text")[0].as_py()
    assert '"name": "get_weather"' in text and '"description": "The weather in a city"' in text
    ids, labels = tokenized.column("input_ids")[0].as_py(), tokenized.column("labels")[0].as_py()
    assert trained_runs(tok, ids, labels) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 °C in Paris.<|im_end|>"]


def test_a_template_that_drops_tool_calls_or_tools_rejects_the_row(base_tokenizers):
    tok, setup = set_up(base_tokenizers, "builtin:llama3", "gemma3")
    records = [{"messages": TOOL_CONVERSATION[:2] + [{"role": "user", "content": "ok"},
                                                     {"role": "assistant", "content": "fine"}]},
               {"messages": CONVERSATIONS["multi_turn"], "tools": TOOLS}]
    table, _, rejects = prepare(tok, setup, records)
    assert table.num_rows == 0
    assert rejects == {0: "chat template does not write the tool_calls of messages[1]",
                       1: "chat template does not write the row's tools"}


# -- generation prompts (held-out) --------------------------------------------------------------

@pytest.mark.parametrize("template,matches", [("chatml", True), ("llama3", True), ("gemma3", True),
                                              ("qwen3", False), ("llama2", False), ("openchat", False)])
def test_generation_prompt_is_what_inference_sends(base_tokenizers, template, matches):
    tok, setup = set_up(base_tokenizers, "builtin:llama3", template)
    conv = CONVERSATIONS["multi_turn"]
    gp = generation_prompt(normalize({"messages": conv}, DataConfig()), tok, setup, DataConfig())
    assert gp.prompt == tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert gp.reference == "Forty."
    assert gp.matches_training is matches and setup.generation_prompt_matches_training is matches
    if template == "qwen3":  # the empty think block is in the training text only
        assert gp.prompt.endswith("<|im_start|>assistant\n")


# -- the same property on conversations hypothesis makes up --------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# How each template writes assistant content (the families' published templates trim some).
WRITES_CONTENT = {"llama2": str.strip, "llama3": str.strip, "gemma": str.strip, "gemma3": str.strip,
                  "vicuna": str.strip, "mistral_v3": str.strip, "command_r": str.strip,
                  "qwen3": lambda c: c.lstrip("\n")}
TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ019 .,:;!?'\"()[]{}<>|/#*-_=+\n\té東✓")), min_size=1, max_size=24)


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 3))
    msgs = []
    for _ in range(turns):
        msgs.append({"role": "user", "content": draw(TEXT)})
        msgs.append({"role": "assistant", "content": draw(TEXT.filter(lambda t: t.strip()))})
    return msgs


@pytest.fixture(scope="module")
def set_up_templates(base_tokenizers):
    cache = {}

    def get(tokenizer, template):
        if (tokenizer, template) not in cache:
            cache[tokenizer, template] = set_up(base_tokenizers, tokenizer, template)
        return cache[tokenizer, template]

    return get


@pytest.mark.parametrize("tokenizer", ["builtin:llama3", "sp-legacy"])
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_assistant_only_masks_on_made_up_conversations(set_up_templates, template, tokenizer):
    tok, setup = set_up_templates(tokenizer, template)
    eot = expected_eot(tok, template)
    written = WRITES_CONTENT.get(template, lambda c: c)

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(conversations())
    def check(conv):
        table, tokenized, rejects = prepare(tok, setup, [{"messages": conv}])
        assert rejects == {}, rejects
        ids, labels = tokenized.column("input_ids")[0].as_py(), tokenized.column("labels")[0].as_py()
        answers = [written(m["content"]) for m in conv if m["role"] == "assistant"]
        assert trained_runs(tok, ids, labels) == [a + eot for a in answers]
        whole = tok._tokenizer.encode(table.column("text")[0].as_py(), add_special_tokens=False).ids
        assert decode(tok, ids) == decode(tok, whole)

    check()
