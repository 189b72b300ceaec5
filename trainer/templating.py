"""Chat template set-up and rendering of an `Example` to text plus trainable character spans.

Masking works for ANY chat template, with or without `{% generation %}` markers: the
conversation is rendered with the template, then each message's content is located in the
rendered text in order, and each trained assistant turn is extended over the end-of-turn token
that immediately follows it. Working on characters (not token ids) is what survives
context-dependent tokenization; `trainer.tokenization` then cuts the text at span boundaries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import pyarrow as pa
from tokenizers import AddedToken
from tqdm.auto import tqdm

from trainer.config import DataConfig, TemplateConfig
from trainer.formats import Example, RowError, load_formatting_func, normalize
from trainer.tokenizer import TEMPLATES_DIR, read_template

log = logging.getLogger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
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


@dataclass
class TemplateSetup:
    chat_template: Optional[str]
    added_tokens: list[str] = field(default_factory=list)
    # True when tokens were added to the vocabulary: the model's embeddings must be resized.
    embeddings_must_grow: bool = False
    # The token that ends an assistant turn (trained, so the model learns to stop).
    eot_token: Optional[str] = None
    pad_token: str = PAD_TOKEN
    # Whether raw text / prompt-completion rows start with the bos token string (the tokenizer's
    # post-processor prepends BOS in normal use, but pieces are tokenized without special tokens).
    bos_in_text: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TemplateSetup":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _existing_template(tok: Any) -> Optional[str]:
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t or None


def _add_special(tok: Any, tokens: list[str]) -> list[str]:
    vocab = tok.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tok.add_special_tokens(
            {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in new]},
            replace_extra_special_tokens=False,
        )
    return new


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


_PROBE_USER = "Probe question 17"
_PROBE_ANSWER = "Probe answer 42"


def _detect_eot(tok: Any, template: str) -> Optional[str]:
    """The special token that immediately follows assistant content in a rendered probe."""
    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = _compile(template).render(
            messages=probe, tools=None, documents=None, add_generation_prompt=False, **tok.special_tokens_map
        )
    except Exception as e:  # a template that rejects the probe
        log.warning("could not render a probe conversation with the chat template (%s); using EOS as end of turn", e)
        return tok.eos_token
    i = text.find(_PROBE_ANSWER)
    if i >= 0:
        rest = text[i + len(_PROBE_ANSWER):]
        for s in _special_strings(tok):
            if rest.startswith(s):
                return s
    log.warning(
        "the chat template puts no special token right after assistant content; "
        "using EOS (%s) as end of turn, which is trained only where it follows the content", tok.eos_token
    )
    return tok.eos_token


def setup_template(tok: Any, cfg: TemplateConfig, base_dir: Union[str, Path] = ".") -> TemplateSetup:
    """Set up the chat template and pad token on `tok` (mutated) and describe the result."""
    n_before = len(tok)
    added: list[str] = []
    src = cfg.source
    chatml = False
    if src == "tokenizer":
        template = _existing_template(tok)
        chatml = template is None
    elif src == "chatml":
        chatml = True
    else:
        p = Path(src).expanduser()
        if not p.is_absolute():
            p = Path(base_dir) / p
        if not p.is_file():
            builtin = TEMPLATES_DIR / f"{src}.jinja"
            if "/" not in src and builtin.is_file():
                p = builtin
            else:
                raise FileNotFoundError(
                    f"template.source {src!r}: not 'tokenizer', 'chatml' or an existing .jinja file ({p})"
                )
        template = read_template(p)
    if chatml:
        added += _add_special(tok, [IM_START, IM_END])
        template = CHATML_TEMPLATE
    tok.chat_template = template

    pad = tok.pad_token
    if pad is None or pad == tok.eos_token or (tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id):
        if PAD_TOKEN not in tok.get_vocab():
            added.append(PAD_TOKEN)
        tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})

    eot = IM_END if template == CHATML_TEMPLATE else _detect_eot(tok, template)
    return TemplateSetup(
        chat_template=template,
        added_tokens=added,
        embeddings_must_grow=len(tok) > n_before,
        eot_token=eot,
        pad_token=str(tok.pad_token),
        bos_in_text=_bos_in_text(tok),
    )


def save_tokenizer(tok: Any, setup: TemplateSetup, out_dir: Union[str, Path]) -> None:
    """Write the tokenizer (with its chat template) and `template_setup.json` to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if setup.chat_template is not None:
        tok.chat_template = setup.chat_template
    tok.save_pretrained(str(out))
    (out / "template_setup.json").write_text(json.dumps(setup.to_dict(), indent=2, ensure_ascii=False))


def load_template_setup(tok_dir: Union[str, Path]) -> TemplateSetup:
    return TemplateSetup.from_dict(json.loads((Path(tok_dir) / "template_setup.json").read_text()))


# ----------------------------------------------------------------------------------------------
# Rendering


def _compile(template: str) -> Any:
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
        self.compiled = _compile(self.template) if self.template else None
        self.special_kwargs = dict(tok.special_tokens_map)
        self.eos = tok.eos_token or ""
        self.bos = (tok.bos_token or "") if setup.bos_in_text else ""
        self.eot = setup.eot_token or None
        self.response = self._template_string(data.response_template, "response_template")
        self.instruction = self._template_string(data.instruction_template, "instruction_template")

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

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.compiled is None:
            raise RowError("conversational row but the tokenizer has no chat template")
        try:
            return self.compiled.render(
                messages=messages, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_kwargs,
            )
        except Exception as e:
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


def _find_content(text: str, content: str, pos: int, eot: Optional[str]) -> Optional[Span]:
    """Where `content` sits in `text` at or after pos: (start, end of content), or None.

    Anchored on the end-of-turn token first (content + eot), then the stripped content (for
    templates that trim), then unanchored."""
    stripped = content.strip()
    cands = [content] if stripped == content else [content, stripped]
    if eot:
        for c in cands:
            i = text.find(c + eot, pos)
            if i >= 0:
                return i, i + len(c)
    for c in cands:
        if c:
            i = text.find(c, pos)
            if i >= 0:
                return i, i + len(c)
    return None


def _locate_messages(text: str, messages: list[dict], eot: Optional[str]) -> list[Optional[Span]]:
    """Per message, its content's (start, end) in the rendered text, in order (None if a
    non-assistant message's content is not found; RowError for an assistant message)."""
    pos = 0
    out: list[Optional[Span]] = []
    turn = 0
    for i, m in enumerate(messages):
        loc = _find_content(text, m["content"], pos, eot)
        if m["role"] == "assistant":
            turn += 1
            if loc is None:
                raise RowError(
                    f"template modifies assistant content; cannot locate turn {turn} (messages[{i}])"
                )
        if loc is not None:
            pos = loc[1]
        out.append(loc)
    return out


def _with_eot(text: str, loc: Span, eot: Optional[str]) -> Span:
    s, e = loc
    if eot and text.startswith(eot, e):
        e += len(eot)
    return s, e


def _chat_spans(ctx: _Ctx, messages: list[dict], train_from: int, last_only: bool) -> tuple[str, list[Span]]:
    text = ctx.render_chat(messages)
    locs = _locate_messages(text, messages, ctx.eot)
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    if last_only:
        idx = idx[-1:]
    if not idx:
        raise RowError("no assistant message to train on")
    spans = [_with_eot(text, locs[i], ctx.eot) for i in idx]
    return text, [s for s in spans if s[1] > s[0]]


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


def _render(ex: Example, ctx: _Ctx, data: DataConfig) -> tuple[str, list[Span]]:
    masking = data.masking
    kind = ex.kind
    if kind == "messages":
        if masking == "all":
            text = ctx.render_chat(ex.messages)
            return text, [(0, len(text))]
        return _chat_spans(ctx, ex.messages, 0, last_only=(masking == "completion_only"))
    if kind == "prompt_completion":
        if isinstance(ex.prompt, list):
            msgs = ex.prompt + ex.completion
            if masking == "all":
                text = ctx.render_chat(msgs)
                return text, [(0, len(text))]
            train_from = 0 if masking == "assistant_only" else len(ex.prompt)
            return _chat_spans(ctx, msgs, train_from, last_only=False)
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


def _generation_prompt(ex: Example, ctx: _Ctx) -> tuple[str, str]:
    if ex.kind == "messages" or (ex.kind == "prompt_completion" and isinstance(ex.prompt, list)):
        msgs = ex.messages if ex.kind == "messages" else ex.prompt + ex.completion
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RowError("no assistant message to use as reference")
        msgs = msgs[: last + 1]
        text = ctx.render_chat(msgs)
        locs = _locate_messages(text, msgs, ctx.eot)
        return text[: locs[last][0]], msgs[last]["content"].strip()
    if ex.kind == "prompt_completion":
        return ctx.with_bos(ex.prompt), ex.completion.strip()
    if ex.kind == "text":
        if ctx.response is None:
            raise RowError("text rows have no prompt/answer split; set data.response_template")
        text = ctx.with_bos(ex.text)
        spans = _response_spans(ctx, ctx.with_eos(text), 0)
        s, e = spans[-1]
        reference = text[s:e]
        if ctx.eos and reference.endswith(ctx.eos):
            reference = reference[: -len(ctx.eos)]
        return text[:s], reference.strip()
    raise RowError(f"{ex.kind} rows have no prompt to generate from")


def generation_prompt(ex: Example, tok: Any, setup: TemplateSetup, data: DataConfig) -> tuple[str, str]:
    """(prompt text as it appears as the untrained prefix of the training text, reference answer)."""
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
