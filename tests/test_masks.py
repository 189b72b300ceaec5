"""Per-token mask tests with real tokenizers: the tokens whose label != -100, decoded run by run,
must be exactly the assistant / completion text (+ end-of-turn token), nothing else."""

from __future__ import annotations

import pytest

from trainer.core.config import DataConfig, TemplateConfig, TokenizerConfig
from trainer.data.record_formats import RowError, normalize
from trainer.data.templating import generation_prompt, render, setup_template, template_rows
from trainer.data.tokenization import tokenize_rows
from trainer.data.tokenizer_loading import TINY_TOKENIZER_DIR, load_tokenizer

IGNORE = -100

needs_tiny = pytest.mark.skipif(
    not (TINY_TOKENIZER_DIR / "tokenizer.json").is_file(),
    reason="builtin:tiny tokenizer (trainer/resources/tiny_tokenizer) is not there yet",
)

ZEPHYR = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ALTERING = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}{{ message['content'] | upper }}{% else %}{{ message['content'] }}"
    "{% endif %}{{ eos_token }}\n{% endfor %}"
)

CONVERSATION = [
    {"role": "system", "content": "You are a terse calculator."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 10 times that?"},
    {"role": "assistant", "content": "40"},
    {"role": "user", "content": "Say it in words, please."},
    {"role": "assistant", "content": "Forty."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def _setup(path: str, source: str, tmp_path=None, template_text: str | None = None):
    tok = load_tokenizer(TokenizerConfig(path=path))
    if template_text is not None:
        f = tmp_path / "template.jinja"
        f.write_text(template_text)
        source = str(f)
    return tok, setup_template(tok, TemplateConfig(source=source))


@pytest.fixture(scope="module")
def llama3():
    return _setup("builtin:llama3", "tokenizer")


@pytest.fixture(scope="module")
def llama3_chatml():
    return _setup("builtin:llama3", "chatml")


@pytest.fixture(scope="module")
def tiny():
    if not (TINY_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip("builtin:tiny tokenizer is not there yet")
    return _setup("builtin:tiny", "tokenizer")


def tokenize(tok, setup, records, data=None):
    data = data or DataConfig()
    table, rejects = template_rows(list(enumerate(records)), tok, setup, data, progress=False)
    assert rejects == [], rejects
    out, rejects = tokenize_rows(table, tok, progress=False)
    assert rejects == [], rejects
    return list(zip(out.column("input_ids").to_pylist(), out.column("labels").to_pylist()))


def trained_runs(tok, ids, labels) -> list[str]:
    """Decode each maximal run of trained tokens separately."""
    assert len(ids) == len(labels) and labels[0] == IGNORE
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
                cur = []
        else:
            assert lab == t
            cur.append(t)
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def check_conversation(tok, setup, eot, answers=ANSWERS, messages=CONVERSATION):
    [(ids, labels)] = tokenize(tok, setup, [{"messages": messages}])
    assert trained_runs(tok, ids, labels) == [a.strip() + eot for a in answers]
    # The whole row is exactly the chat template's rendering.
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(messages, tokenize=False)
    # The prompt part is what generation sees.
    ex = normalize({"messages": messages}, DataConfig())
    gp = generation_prompt(ex, tok, setup, DataConfig())
    prompt, reference = gp.prompt, gp.reference
    assert gp.matches_training
    assert prompt == tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert reference == answers[-1].strip()
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    return ids, labels


def test_llama3_template_multi_turn(llama3):
    tok, setup = llama3
    assert setup.eot_token == "<|eot_id|>" and setup.bos_in_text and setup.pad_token != tok.eos_token
    ids, labels = check_conversation(tok, setup, "<|eot_id|>")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_llama3_template_trims_content(llama3):
    tok, setup = llama3
    messages = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "\n  Hello there!  \n"}]
    check_conversation(tok, setup, "<|eot_id|>", answers=["Hello there!"], messages=messages)


def test_chatml_on_llama3(llama3_chatml):
    tok, setup = llama3_chatml
    assert setup.eot_token == "<|im_end|>"
    assert setup.added_tokens == ["<|im_start|>", "<|im_end|>", "<|pad|>"] and setup.embeddings_must_grow
    ids, labels = check_conversation(tok, setup, "<|im_end|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # Every <|im_end|> closing an assistant turn is trained; the others (and the "\n" after) are not.
    trained_ends = [i for i, t in enumerate(ids) if t == im_end and labels[i] != IGNORE]
    assert len(trained_ends) == 3 and all(labels[i + 1] == IGNORE for i in trained_ends)


@needs_tiny
def test_chatml_on_tiny(tiny):
    tok, setup = tiny
    assert setup.eot_token == "<|im_end|>" and not setup.bos_in_text
    assert setup.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    check_conversation(tok, setup, "<|im_end|>")


@pytest.mark.parametrize("path", ["builtin:llama3", pytest.param("builtin:tiny", marks=needs_tiny)])
def test_template_without_generation_markers(path, tmp_path):
    tok, setup = _setup(path, "", tmp_path, ZEPHYR)
    assert setup.eot_token == tok.eos_token
    check_conversation(tok, setup, tok.eos_token)


def test_template_with_generation_markers(tmp_path):
    tok, _ = _setup("builtin:llama3", "chatml")  # adds <|im_start|>/<|im_end|>
    f = tmp_path / "gen.jinja"
    f.write_text(CHATML_GENERATION)
    setup = setup_template(tok, TemplateConfig(source=str(f)))
    assert setup.eot_token == "<|im_end|>" and setup.added_tokens == []
    check_conversation(tok, setup, "<|im_end|>")


def test_template_altering_content_is_a_row_error(tmp_path):
    tok, setup = _setup("builtin:llama3", "", tmp_path, ALTERING)
    messages = [{"role": "user", "content": "Greet me."}, {"role": "assistant", "content": "Hello!"}]
    ex = normalize({"messages": messages}, DataConfig())
    with pytest.raises(RowError, match="template modifies assistant content; cannot locate turn 1"):
        render(ex, tok, setup, DataConfig())
    table, rejects = template_rows([(7, {"messages": CONVERSATION})], tok, setup, DataConfig(), progress=False)
    assert table.num_rows == 0 and rejects == [
        (7, "template modifies assistant content; cannot locate turn 3 (messages[6])")]


def test_completion_only_on_messages_trains_last_turn(llama3):
    tok, setup = llama3
    data = DataConfig(masking="completion_only")
    [(ids, labels)] = tokenize(tok, setup, [{"messages": CONVERSATION}], data)
    assert trained_runs(tok, ids, labels) == ["Forty.<|eot_id|>"]


def test_masking_all(llama3):
    tok, setup = llama3
    [(ids, labels)] = tokenize(tok, setup, [{"messages": CONVERSATION}], DataConfig(masking="all"))
    assert labels[0] == IGNORE and labels[1:] == ids[1:]


def test_conversational_prompt_completion(llama3_chatml):
    tok, setup = llama3_chatml
    rec = {"prompt": CONVERSATION[:3] + [{"role": "user", "content": "Half of 4?"}],
           "completion": [{"role": "assistant", "content": "2"}]}
    [(ids, labels)] = tokenize(tok, setup, [rec])
    assert trained_runs(tok, ids, labels) == ["2<|im_end|>"]
    [(ids, labels)] = tokenize(tok, setup, [rec], DataConfig(masking="assistant_only"))
    assert trained_runs(tok, ids, labels) == ["2 + 2 = 4.<|im_end|>", "2<|im_end|>"]


# -- prompt/completion strings: the prompt's tokens are the inference tokens ----------------

BOUNDARY_CASES = [
    ("The capital of France is Par", "is."),  # mid-word: joint tokenization merges " Paris"
    ("Is the sky blue? Answer: ", "yes"),     # trailing space: joint merges " yes"
    ("Q: What is 2 + 66?\nAnswer:", " 68"),   # ordinary case
]


@pytest.mark.parametrize("prompt,completion", BOUNDARY_CASES)
def test_prompt_tokens_are_inference_tokens(llama3, prompt, completion):
    tok, setup = llama3
    [(ids, labels)] = tokenize(tok, setup, [{"prompt": prompt, "completion": completion}])
    gp = generation_prompt(normalize({"prompt": prompt, "completion": completion}, DataConfig()),
                           tok, setup, DataConfig())
    gen_prompt, reference = gp.prompt, gp.reference
    assert gen_prompt == "<|begin_of_text|>" + prompt and reference == completion.strip()
    prompt_ids = tok(gen_prompt, add_special_tokens=False)["input_ids"]
    assert prompt_ids == tok(prompt)["input_ids"]  # = what inference feeds the model
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE for lab in labels[: len(prompt_ids)])
    assert all(lab != IGNORE for lab in labels[len(prompt_ids):])
    assert trained_runs(tok, ids, labels) == [completion + tok.eos_token]


@pytest.mark.parametrize("prompt,completion", BOUNDARY_CASES[:2])
def test_joint_tokenization_differs_at_merging_boundaries(llama3, prompt, completion):
    """TRL-style joint tokenization of prompt+completion does not start with the prompt's own
    tokens when characters merge across the boundary; ours always does."""
    tok, setup = llama3
    prompt_ids = tok(prompt)["input_ids"]
    joint = tok(prompt + completion + tok.eos_token)["input_ids"]
    assert joint[: len(prompt_ids)] != prompt_ids
    [(ids, _)] = tokenize(tok, setup, [{"prompt": prompt, "completion": completion}])
    assert ids[: len(prompt_ids)] == prompt_ids
    assert ids != joint


def test_prompt_completion_on_tiny(tiny):
    tok, setup = tiny
    [(ids, labels)] = tokenize(tok, setup, [{"prompt": "add 12 and 30:", "completion": " 42"}])
    assert trained_runs(tok, ids, labels) == [" 42</s>"]
    assert ids[: len(tok("add 12 and 30:")["input_ids"])] == tok("add 12 and 30:")["input_ids"]


# -- response-template masking on text rows ------------------------------------------------

TEXT = "### Question: What is 2 + 66?\n### Answer: 68"


def test_response_template_string_and_ids(llama3):
    tok, setup = llama3
    rt = "\n### Answer:"
    alone = tok(rt, add_special_tokens=False)["input_ids"]
    joint = tok(TEXT, add_special_tokens=False)["input_ids"]
    # The template's ids alone do not occur in the tokenized text: id matching would fail.
    assert not any(joint[i:i + len(alone)] == alone for i in range(len(joint)))
    for template in (rt, alone):
        [(ids, labels)] = tokenize(tok, setup, [{"text": TEXT}], DataConfig(response_template=template))
        assert trained_runs(tok, ids, labels) == [" 68<|end_of_text|>"]


def test_response_and_instruction_templates_multi_turn(llama3):
    tok, setup = llama3
    text = "### Question: a?\n### Answer: b\n### Question: c?\n### Answer: d"
    data = DataConfig(response_template="### Answer:", instruction_template="### Question:")
    [(ids, labels)] = tokenize(tok, setup, [{"text": text}], data)
    assert trained_runs(tok, ids, labels) == [" b\n", " d<|end_of_text|>"]
    ex = normalize({"text": text}, data)
    gp = generation_prompt(ex, tok, setup, data)
    assert (gp.prompt, gp.reference) == (
        "<|begin_of_text|>### Question: a?\n### Answer: b\n### Question: c?\n### Answer:", "d")


def test_response_template_missing_is_a_reject(llama3):
    tok, setup = llama3
    data = DataConfig(response_template="### Response:")
    table, rejects = template_rows([(0, {"text": TEXT}), (1, {"text": "x ### Response: y"})], tok, setup, data,
                                   progress=False)
    assert rejects == [(0, "response template not found")] and table.num_rows == 1


def test_text_rows_train_everything(llama3):
    tok, setup = llama3
    [(ids, labels)] = tokenize(tok, setup, [{"text": "Hello world"}])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert trained_runs(tok, ids, labels) == ["Hello world<|end_of_text|>"]


def test_bos_and_eos_not_doubled(llama3):
    tok, setup = llama3
    rows = tokenize(tok, setup, [{"text": "<|begin_of_text|>Hi<|end_of_text|>"},
                                 {"prompt": "<|begin_of_text|>Q", "completion": " A<|end_of_text|>"}])
    for ids, _ in rows:
        assert ids.count(tok.bos_token_id) == 1 and ids.count(tok.eos_token_id) == 1
    assert [trained_runs(tok, ids, labels) for ids, labels in rows] == [
        ["Hi<|end_of_text|>"], [" A<|end_of_text|>"]]
