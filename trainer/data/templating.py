"""Chat template set-up and rendering of an `Example` to text plus trainable character spans.

Masking works for ANY chat template, with or without `{% generation %}` markers. The
conversation is rendered once with placeholder contents, which shows the template's own text
(its segments) and where it writes each message; the real rendering is then walked segment by
segment, so each content is found where the template put it, never by searching (a user turn
that repeats an earlier answer is no false match). Each trained assistant turn runs from its
content through the end-of-turn text the template writes after it. Working on characters (not
token ids) is what survives context-dependent tokenization; `trainer.data.tokenization` then cuts the
text at span boundaries.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import pyarrow as pa
from tokenizers import AddedToken
from tqdm.auto import tqdm

from trainer.core.config import DataConfig, TemplateConfig
from trainer.core.template_setup import PAD_TOKEN, TemplateSetup
from trainer.data.record_formats import Example, RowError, load_formatting_func, normalize
from trainer.data.tokenizer_loading import TEMPLATES_DIR, read_template, resolve_template_source

log = logging.getLogger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_TEMPLATE = read_template(TEMPLATES_DIR / "chatml.jinja")

TEMPLATED_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("text", pa.string()),
        ("span_starts", pa.list_(pa.int32())),
        ("span_ends", pa.list_(pa.int32())),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
    ]
)

Span = tuple[int, int]


def _existing_template(tok: Any) -> Optional[str]:
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t or None


def _add_special(tok: Any, tokens: list[str]) -> list[str]:
    """Add `tokens` as special tokens; returns those that got new ids (an ordinary vocabulary
    token of the same text is promoted in place: its embedding row already exists)."""
    specials = set(_special_strings(tok))
    todo = [t for t in tokens if t not in specials]
    vocab = tok.get_vocab()
    if todo:
        tok.add_special_tokens(
            {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in todo]},
            replace_extra_special_tokens=False,
        )
    return [t for t in todo if t not in vocab]


def _special_strings(tok: Any) -> list[str]:
    out = set(str(t) for t in tok.all_special_tokens)
    for t in tok.added_tokens_decoder.values():
        if getattr(t, "special", False):
            out.add(str(t))
    return sorted(out, key=len, reverse=True)


def _bos_in_text(tok: Any) -> bool:
    if tok.bos_token is None or tok.bos_token_id is None:
        return False
    ids = tok._tokenizer.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tok.bos_token_id


# Message contents are replaced by these to see what the template itself writes around them.
_PLACEHOLDER = "@@sftdag{}@@"
# Case-insensitive: a template that upper-cases content still shows where it wrote it.
_PLACEHOLDER_RE = re.compile(r"@@sftdag(\d+)@@", re.IGNORECASE)
# What marker-like template text looks like: <|im_end|>, <end_of_turn>, </s>.
_MARKER_RE = re.compile(r"<\|[^<>|\s]{1,64}\|>|(?<!<)</?[A-Za-z_][A-Za-z0-9_]{0,63}>(?!>)")
# Probe conversations, tried in order until the template accepts one.
_PROBES = (("system", "user", "assistant", "user", "assistant"),
           ("user", "assistant", "user", "assistant"))


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def _end_of_turn(after_mid: str, after_last: str, specials: list[str]) -> str:
    """The end-of-turn text, from what follows assistant content mid-conversation and at its end.

    Their common prefix is the closing text; when the two part inside a marker (Phi-3:
    "<|end|>\n<|user|>" vs "<|end|>\n<|endoftext|>") it is cut back to the last whitespace,
    special token or marker end. Templates that write an end marker only after the last turn
    give that marker."""
    common = _common_prefix(after_mid, after_last)
    if common not in (after_mid, after_last):
        cut = 0
        for i, ch in enumerate(common):
            if ch.isspace() or ch in ">]":
                cut = i + 1
        for sp in specials:
            j = common.rfind(sp)
            if j >= 0:
                cut = max(cut, j + len(sp))
        common = common[:cut]
    eot = common.strip()
    return eot if eot else after_last.strip()


def _probe(compiled: Any, special_kwargs: dict) -> tuple[list[dict], str]:
    """A probe conversation of placeholder contents that the template accepts, and its
    rendering. ([], "") when the template refuses every probe."""
    for roles in _PROBES:
        msgs = [{"role": r, "content": _PLACEHOLDER.format(i)} for i, r in enumerate(roles)]
        try:
            text = compiled.render(messages=msgs, tools=None, documents=None, add_generation_prompt=False,
                                   **special_kwargs)
        except Exception:  # this probe's shape is not allowed by the template; try the next
            continue
        if [int(i) for i in _PLACEHOLDER_RE.findall(text)] == list(range(len(roles))):
            return msgs, text
    return [], ""


@dataclass
class _TemplateFacts:
    eot: str
    markers: list[str]
    generation_prompt_matches: Optional[bool]


def _template_facts(tok: Any, template: str) -> _TemplateFacts:
    """End-of-turn text, marker strings, and whether the generation prompt is the training
    text's prefix, read off a probe rendering of `template` with `tok`'s special tokens."""
    compiled = compile_template(template)
    kwargs = dict(tok.special_tokens_map)
    msgs, text = _probe(compiled, kwargs)
    if not msgs:
        log.warning("the chat template refuses every probe conversation; using EOS (%s) as end of turn",
                    tok.eos_token)
        return _TemplateFacts(tok.eos_token or "", [], None)
    segments = _PLACEHOLDER_RE.split(text)[0::2]  # segments[k + 1] follows message k
    n = len(msgs)
    first_assistant = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    eot = _end_of_turn(segments[first_assistant + 1], segments[n], _special_strings(tok))
    markers: list[str] = []
    for seg in segments:
        for m in _MARKER_RE.findall(seg):
            if m not in markers:
                markers.append(m)
    try:
        prompt = compiled.render(messages=msgs[:-1], tools=None, documents=None, add_generation_prompt=True, **kwargs)
        matches: Optional[bool] = text.startswith(prompt + _PLACEHOLDER.format(n - 1))
    except Exception:
        matches = None
    return _TemplateFacts(eot, markers, matches)


def _is_one_special_token(tok: Any, text: str) -> bool:
    return text in set(_special_strings(tok)) or any(
        str(t) == text for t in tok.added_tokens_decoder.values())


def setup_template(tok: Any, cfg: TemplateConfig, base_dir: Union[str, Path] = ".") -> TemplateSetup:
    """Set up the chat template and pad token on `tok` (mutated) and describe the result."""
    n_before = len(tok)
    added: list[str] = []
    path = resolve_template_source(cfg.source, base_dir)
    template = read_template(path) if path is not None else _existing_template(tok)
    if cfg.source == "chatml" or template is None:  # ChatML set up with its markers as special tokens
        template = CHATML_TEMPLATE
        added += _add_special(tok, [IM_START, IM_END])
    tok.chat_template = template

    pad = tok.pad_token
    if pad is None or pad == tok.eos_token or (tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id):
        if PAD_TOKEN not in tok.get_vocab():
            added.append(PAD_TOKEN)
        tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})

    facts = _template_facts(tok, template)
    eot, markers = facts.eot, facts.markers
    if facts.generation_prompt_matches is False:
        log.warning("the chat template's generation prompt (add_generation_prompt=True) differs from the "
                    "training text before an answer: held-out prompts use the generation prompt")
    if cfg.add_markers:
        wanted = list(cfg.add_markers) if isinstance(cfg.add_markers, list) else list(markers)
        if cfg.add_markers is True and eot and eot not in wanted and _MARKER_RE.fullmatch(eot):
            wanted.append(eot)
        added += [t for t in _add_special(tok, wanted) if t not in added]
    not_special = [m for m in markers if not _is_one_special_token(tok, m)]
    if eot and eot not in not_special and not _is_one_special_token(tok, eot) and _MARKER_RE.fullmatch(eot):
        not_special.append(eot)
    if not_special:
        log.warning(
            "the chat template's marker(s) %s are not special tokens of this tokenizer: each is trained as "
            "several ordinary tokens. Set data.template.add_markers: true to add them as special tokens "
            "(the embeddings grow and their new rows are trained).", ", ".join(not_special))
    if not eot:
        log.warning(
            "the chat template writes no end-of-turn text after assistant content: a fine-tuned model learns "
            "to stop only where the template's next turn begins (use stop strings at inference)")
    return TemplateSetup(
        chat_template=template,
        added_tokens=added,
        embeddings_must_grow=len(tok) > n_before,
        eot_token=eot,
        pad_token=str(tok.pad_token),
        bos_in_text=_bos_in_text(tok),
        markers_not_special=not_special,
        generation_prompt_matches_training=facts.generation_prompt_matches,
    )


def save_tokenizer(tok: Any, setup: TemplateSetup, out_dir: Union[str, Path]) -> None:
    """Write the tokenizer (with its chat template) and `template_setup.json` to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if setup.chat_template is not None:
        tok.chat_template = setup.chat_template
    tok.save_pretrained(str(out))
    setup.write(out)


# ----------------------------------------------------------------------------------------------
# Rendering


def compile_template(template: str) -> Any:
    # transformers' own compiled (sandboxed, cached) template: identical output to
    # apply_chat_template, {% generation %} supported, without its per-call overhead.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


class _Ctx:
    """Per-(tokenizer, setup, data) values computed once, not per row."""

    def __init__(self, tok: Any, setup: TemplateSetup, data: DataConfig):
        self.tok = tok
        self.setup = setup
        self.data = data
        self.template = setup.chat_template
        self.compiled = compile_template(self.template) if self.template else None
        self.special_kwargs = dict(tok.special_tokens_map)
        self.eos = tok.eos_token or ""
        self.bos = (tok.bos_token or "") if setup.bos_in_text else ""
        self.eot = re.compile(r"\s*" + re.escape(setup.eot_token)) if setup.eot_token else None
        self.response = self._template_string(data.response_template, "response_template")
        self.instruction = self._template_string(data.instruction_template, "instruction_template")
        # The template's own text around placeholder contents, per conversation shape.
        self.skeletons: dict[tuple, tuple[list[str], list[int]]] = {}

    def _template_string(self, value: Optional[Union[str, list[int]]], name: str) -> Optional[str]:
        if value is None:
            return None
        if isinstance(value, str):
            s = value
        else:
            s = self.tok.decode(list(value), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not s:
            raise ValueError(f"data.{name}: empty")
        return s

    def with_bos(self, text: str) -> str:
        """bos + text where raw text needs it (not twice when the data already has it)."""
        return text if not self.bos or text.startswith(self.bos) else self.bos + text

    def with_eos(self, text: str) -> str:
        return text if not self.eos or text.endswith(self.eos) else text + self.eos

    def render_chat(self, messages: list[dict], tools: Optional[list] = None,
                    add_generation_prompt: bool = False) -> str:
        if self.compiled is None:
            raise RowError("conversational row but the tokenizer has no chat template")
        try:
            return self.compiled.render(
                messages=messages, tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_kwargs,
            )
        except Exception as e:  # the template refuses this row (its own raise_exception message)
            raise RowError(f"chat template error: {e}") from None


_CTX_CACHE: list = []


def _ctx(tok: Any, setup: TemplateSetup, data: DataConfig) -> _Ctx:
    if _CTX_CACHE:
        c = _CTX_CACHE[0]
        if (c.tok is tok and c.setup is setup and c.data is data and c.template == setup.chat_template
                and c.special_kwargs == tok.special_tokens_map):
            return c
    c = _Ctx(tok, setup, data)
    _CTX_CACHE[:] = [c]
    return c


_CANNOT_ALIGN = ("chat template output depends on the message contents (it branches on them); "
                 "cannot locate the turns")


def _has_placeholder(m: dict) -> bool:
    # Tool-call turns with no content are located by what their tool calls add instead.
    return isinstance(m.get("content"), str) and not (m.get("tool_calls") and not m["content"].strip())


def _skeleton(ctx: _Ctx, messages: list[dict], tools: Optional[list]) -> tuple[list[str], list[int]]:
    """The template's own text: `segments` around the message contents it writes, in the order
    it writes them (`order[k]` = the message whose content stands between segments k and k+1)."""
    key = None
    if tools is None and not any(m.get("tool_calls") for m in messages):
        # Everything but the content (role, a tool result's name, ...) may shape the template's text.
        key = tuple((_has_placeholder(m), *sorted((k, v) for k, v in m.items() if k != "content"))
                    for m in messages)
        hit = ctx.skeletons.get(key)
        if hit is not None:
            return hit
    msgs = [dict(m, content=_PLACEHOLDER.format(i)) if _has_placeholder(m) else m for i, m in enumerate(messages)]
    parts = _PLACEHOLDER_RE.split(ctx.render_chat(msgs, tools))
    result = (parts[0::2], [int(i) for i in parts[1::2]])
    if key is not None:
        ctx.skeletons[key] = result
    return result


def _rendered_variants(content: str) -> Iterator[str]:
    """What a template may write for `content`: as is, or trimmed (`| trim`, `.strip()`, ...);
    the trimmed ones only made when asked for (most contents are written as they are)."""
    yield content
    seen = {content}
    for v in (content.strip(), content.lstrip(), content.rstrip(), content.strip("\n"), content.lstrip("\n"),
              content.rstrip("\n")):
        if v not in seen:
            seen.add(v)
            yield v


def _align(text: str, segments: list[str], order: list[int], messages: list[dict]) -> dict[int, Span]:
    """Each written message's content span in `text`, found by walking the template's own
    segments in rendering order (never by searching for content, which can occur elsewhere)."""
    if not text.startswith(segments[0]):
        raise RowError(_CANNOT_ALIGN)
    pos = len(segments[0])
    spans: dict[int, Span] = {}
    for k, i in enumerate(order):
        after = segments[k + 1]
        last = k + 1 == len(order)
        found = None
        for cand in _rendered_variants(messages[i]["content"]):
            end = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(after, end) and (not last or end + len(after) == len(text)):
                found = (pos, end)
                break
        if found is None:
            if messages[i]["role"] == "assistant":
                turn = sum(1 for m in messages[: i + 1] if m["role"] == "assistant")
                raise RowError(f"template modifies assistant content; cannot locate turn {turn} (messages[{i}])")
            # Context the template rewrote (e.g. a tool result as JSON): its span is what was written.
            j = (len(text) - len(after) if text.endswith(after) else -1) if last else text.find(after, pos)
            if j < pos:
                raise RowError(_CANNOT_ALIGN)
            found = (pos, j)
        if i in spans and messages[i]["role"] == "assistant":
            raise RowError(f"chat template writes the content of messages[{i}] more than once")
        spans.setdefault(i, found)
        pos = found[1] + len(after)
    return spans


def _diff_region(a: str, b: str) -> Span:
    """The part of `a` that differs from `b` (common prefix and suffix removed)."""
    p = len(_common_prefix(a, b))
    n = min(len(a), len(b)) - p
    q = 0
    while q < n and a[len(a) - 1 - q] == b[len(b) - 1 - q]:
        q += 1
    return p, len(a) - q


def _tool_call_region(ctx: _Ctx, text: str, messages: list[dict], i: int, tools: Optional[list],
                      without: list[dict]) -> Span:
    """Where `text` writes message i's tool calls: what differs from the rendering without them.
    A character-level difference can absorb a shared first or last character ("<" of both
    "<tool_call>" and "<|im_end|>"), so the start is taken from the generation prompt (the model's
    output begins where it ends) and the end from the end-of-turn marker, when they fit."""
    d0, d1 = _diff_region(text, ctx.render_chat(without, tools))
    if d1 <= d0:
        raise RowError(f"chat template does not write the tool_calls of messages[{i}]")
    prompt = ctx.render_chat(messages[:i], tools, add_generation_prompt=True)
    if text.startswith(prompt) and len(prompt) <= d0:
        d0 = len(prompt)
    eot = ctx.setup.eot_token
    if eot:
        j = text.find(eot, max(d1 - len(eot), d0))
        if j >= 0 and not text[d1:j].strip():
            d1 = j
    return d0, d1


def _locate_turns(ctx: _Ctx, messages: list[dict], tools: Optional[list]) -> tuple[str, dict[int, Span]]:
    """The rendered conversation and, per assistant message, the span the model must produce:
    its content (with its rendered tool calls) through the end-of-turn text written after it."""
    segments, order = _skeleton(ctx, messages, tools)
    text = ctx.render_chat(messages, tools)
    spans = _align(text, segments, order, messages)
    for i, m in enumerate(messages):
        if _has_placeholder(m) and i not in spans:
            raise RowError(f"chat template does not write the content of messages[{i}] ({m['role']})")
    if tools is not None and ctx.render_chat(messages, None) == text:
        raise RowError("chat template does not write the row's tools")
    turns: dict[int, Span] = {}
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = spans.get(i, (None, None))
        if m.get("tool_calls"):
            without = [dict(x, tool_calls=None) if j == i else x for j, x in enumerate(messages)]
            if "content" in m and m["content"] is None:
                without[i]["content"] = ""
            d0, d1 = _tool_call_region(ctx, text, messages, i, tools, without)
            start, end = (d0, d1) if start is None else (min(start, d0), max(end, d1))
        if start is None:
            raise RowError(f"cannot locate assistant messages[{i}]")
        hit = ctx.eot.match(text, end) if ctx.eot is not None else None
        if hit:
            end = hit.end()
        if not m.get("tool_calls") and not m["content"].strip():  # a kept empty turn: its marker only
            start = end - len(ctx.setup.eot_token) if hit else end
        turns[i] = (start, end)
    return text, turns


def _check_assistant_turns(messages: list[dict], data: DataConfig) -> None:
    if data.empty_assistant_turns == "keep":
        return
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not (m.get("content") or "").strip() and not m.get("tool_calls"):
            raise RowError(f"empty assistant turn (messages[{i}])")


def _chat_spans(ctx: _Ctx, messages: list[dict], tools: Optional[list], train_from: int,
                last_only: bool) -> tuple[str, list[Span]]:
    _check_assistant_turns(messages, ctx.data)
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    if last_only:
        idx = idx[-1:]
    if not idx:
        raise RowError("no assistant message to train on")
    text, turns = _locate_turns(ctx, messages, tools)
    return text, [turns[i] for i in idx if turns[i][1] > turns[i][0]]


def _response_spans(ctx: _Ctx, text: str, start: int) -> list[Span]:
    """Spans from after each response template occurrence to the next instruction template
    (or the end); searching starts at `start`."""
    rt, it = ctx.response, ctx.instruction
    spans: list[Span] = []
    pos = start
    n = len(text)
    while True:
        i = text.find(rt, pos)
        if i < 0:
            break
        s = i + len(rt)
        if it is None:
            spans.append((s, n))
            break
        j = text.find(it, s)
        e = n if j < 0 else j
        spans.append((s, e))
        if j < 0:
            break
        pos = e
    if not spans:
        raise RowError("response template not found")
    return [sp for sp in spans if sp[1] > sp[0]]


def _conversation(ex: Example) -> Optional[list[dict]]:
    if ex.kind == "messages":
        return ex.messages
    if ex.kind == "prompt_completion" and isinstance(ex.prompt, list):
        return ex.prompt + ex.completion
    return None


def _render(ex: Example, ctx: _Ctx, data: DataConfig) -> tuple[str, list[Span]]:
    masking = data.masking
    kind = ex.kind
    msgs = _conversation(ex)
    if msgs is not None:
        if masking == "all":
            _check_assistant_turns(msgs, data)
            text = ctx.render_chat(msgs, ex.tools)
            return text, [(0, len(text))]
        if kind == "messages":
            return _chat_spans(ctx, msgs, ex.tools, 0, last_only=(masking == "completion_only"))
        train_from = 0 if masking == "assistant_only" else len(ex.prompt)
        return _chat_spans(ctx, msgs, ex.tools, train_from, last_only=False)
    if kind == "prompt_completion":
        if not ex.completion:
            raise RowError("completion: empty")
        head = ctx.with_bos(ex.prompt)
        text = ctx.with_eos(head + ex.completion)
        if masking == "all":
            return text, [(0, len(text))]
        return text, [(len(head), len(text))]
    if kind == "text":
        if not ex.text.strip():
            raise RowError("text: empty")
        text = ctx.with_eos(ctx.with_bos(ex.text))
        if masking == "all" or (masking == "auto" and ctx.response is None):
            return text, [(0, len(text))]
        if ctx.response is None:
            raise RowError(f"masking {masking}: text rows need data.response_template")
        return text, _response_spans(ctx, text, 0)
    if kind == "tokens":
        raise RowError("pre-tokenized row has no text to render")
    raise ValueError(f"unknown example kind {kind!r}")


def render(ex: Example, tok: Any, setup: TemplateSetup, data: DataConfig) -> tuple[str, list[Span]]:
    """The full training text and the sorted, disjoint character spans to train on."""
    return _render(ex, _ctx(tok, setup, data), data)


@dataclass
class GenerationPrompt:
    prompt: str  # exactly what inference sends (the template's add_generation_prompt=True)
    reference: str  # the expected answer
    # False when the training text's prefix before the answer differs from `prompt` (e.g. an
    # empty think block the template writes only into the last assistant turn).
    matches_training: bool = True


def _generation_prompt(ex: Example, ctx: _Ctx) -> GenerationPrompt:
    msgs = _conversation(ex)
    if msgs is not None:
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RowError("no assistant message to use as reference")
        msgs = msgs[: last + 1]
        prompt = ctx.render_chat(msgs[:last], ex.tools, add_generation_prompt=True)
        text, turns = _locate_turns(ctx, msgs, ex.tools)
        reference = (msgs[last].get("content") or "").strip()
        return GenerationPrompt(prompt, reference, text[: turns[last][0]] == prompt)
    if ex.kind == "prompt_completion":
        return GenerationPrompt(ctx.with_bos(ex.prompt), ex.completion.strip())
    if ex.kind == "text":
        if ctx.response is None:
            raise RowError("text rows have no prompt/answer split; set data.response_template")
        text = ctx.with_bos(ex.text)
        spans = _response_spans(ctx, ctx.with_eos(text), 0)
        s, e = spans[-1]
        reference = text[s:e]
        if ctx.eos and reference.endswith(ctx.eos):
            reference = reference[: -len(ctx.eos)]
        return GenerationPrompt(text[:s], reference.strip())
    raise RowError(f"{ex.kind} rows have no prompt to generate from")


def generation_prompt(ex: Example, tok: Any, setup: TemplateSetup, data: DataConfig) -> GenerationPrompt:
    """The prompt inference sends for the row's last answer, and that answer."""
    return _generation_prompt(ex, _ctx(tok, setup, data))


def template_rows(
    rows: Iterable[tuple[int, dict]],
    tok: Any,
    setup: TemplateSetup,
    data: DataConfig,
    formatting_func: Optional[Callable[[dict], str]] = None,
    progress: bool = True,
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Normalise and render rows: the templated table (TEMPLATED_SCHEMA) and rejects."""
    ctx = _Ctx(tok, setup, data)
    if formatting_func is None and data.format == "formatting_func":
        if not data.formatting_func:
            raise ValueError("data.formatting_func is required when data.format is formatting_func")
        formatting_func = load_formatting_func(data.formatting_func)
    row_ids: list[int] = []
    texts: list[Optional[str]] = []
    starts: list[Optional[list[int]]] = []
    ends: list[Optional[list[int]]] = []
    ids_col: list[Optional[list[int]]] = []
    labels_col: list[Optional[list[int]]] = []
    rejects: list[tuple[int, str]] = []
    total = len(rows) if hasattr(rows, "__len__") else None
    for row_id, record in tqdm(rows, total=total, disable=not progress, desc="template", unit="row"):
        try:
            ex = normalize(record, data, formatting_func)
            if ex.kind == "tokens":
                row_ids.append(row_id)
                texts.append(None)
                starts.append(None)
                ends.append(None)
                ids_col.append(ex.input_ids)
                labels_col.append(ex.labels)
                continue
            text, spans = _render(ex, ctx, data)
            if not spans:
                raise RowError("no trainable text")
        except RowError as e:
            rejects.append((row_id, e.reason))
            continue
        row_ids.append(row_id)
        texts.append(text)
        if len(spans) == 1:
            starts.append([spans[0][0]])
            ends.append([spans[0][1]])
        else:
            starts.append([s for s, _ in spans])
            ends.append([e for _, e in spans])
        ids_col.append(None)
        labels_col.append(None)
    table = pa.Table.from_arrays(
        [
            pa.array(row_ids, pa.int64()),
            pa.array(texts, pa.string()),
            pa.array(starts, pa.list_(pa.int32())),
            pa.array(ends, pa.list_(pa.int32())),
            pa.array(ids_col, pa.list_(pa.int32())),
            pa.array(labels_col, pa.list_(pa.int32())),
        ],
        schema=TEMPLATED_SCHEMA,
    )
    return table, rejects
