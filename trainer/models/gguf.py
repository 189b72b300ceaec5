"""GGUF bases: what a `.gguf` file is, whether transformers can read it, and its conversion's key.

A GGUF base (`model.base: path/to/model.gguf` or a packaged `builtin:<name>`) is converted once
into a standard safetensors model directory (`trainer.models.convert`, its own process) stored
at `<store>/base_model/<key>/`. The key is the GGUF's sha256, the conversion code's version and
the versions of the libraries that dequantize it, so training, merging, sampling and scoring
read that directory and never dequantize again. Nothing here imports torch: the orchestrator
plans and checks; only the conversion process loads the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from trainer.core.store import content_key, file_digest
from trainer.models import packaged

STAGE = "base_model"
# The file (beside the manifest) that says which GGUF a converted directory came from.
GGUF_INFO = "sftdag_gguf.json"
GGUF_MAGIC = b"GGUF"
LIBRARIES = ("transformers", "gguf", "torch", "safetensors", "tokenizers")


class GGUFError(ValueError):
    """A GGUF that cannot be used: the message is one line naming the file and the reason."""


def is_gguf_base(base: str) -> bool:
    return packaged.is_packaged(base) or base.lower().endswith(".gguf")


def gguf_file(base: str, base_dir: str | Path = ".") -> Path:
    """The GGUF file `base` names: a packaged model's fetched file, or a path (relative to
    `base_dir`, the YAML's folder) that must exist and start like a GGUF."""
    if packaged.is_packaged(base):
        try:
            return packaged.gguf_path(base)
        except packaged.ModelFetchError as e:
            raise GGUFError(str(e)) from None
    path = Path(base).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    path = Path(os.path.normpath(path))
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return path


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gguf_digest(path: Path) -> str:
    """sha256 of the file; a packaged model's pinned digest (checked when it was fetched, and the
    file is read-only). Other files are hashed once per (size, mtime) and remembered beside them
    in the user's cache, so planning does not re-read a multi-GB file."""
    for model in packaged.PACKAGED_MODELS.values():
        if path == packaged.target_path(model):
            return model.sha256
    stat = path.stat()
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = packaged.models_dir() / ".digests" / (hashlib.sha256(stamp["path"].encode()).hexdigest()[:20] + ".json")
    try:
        remembered = json.loads(memo.read_text())
        if remembered["stamp"] == stamp:
            return remembered["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = file_digest(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the hashing next time
    return digest


def conversion_key(path: Path) -> str:
    return content_key(STAGE, inputs=[gguf_digest(path)], params={"versions": library_versions()})


def supported_architectures() -> list[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING  # no torch import

    return sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))


def inspect(path: Path) -> dict[str, Any]:
    """Read the whole header and tensor table (a truncated or corrupt file fails here) and check
    that transformers reads this architecture. Returns what the conversion asset reports."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises many types for a damaged file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {_one_line(e)})") from None
    expected_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if expected_end > path.stat().st_size:
        raise GGUFError(f"{path}: truncated: its tensors end at byte {expected_end} but the file has "
                        f"{path.stat().st_size}")

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    architecture = field("general.architecture")
    known = supported_architectures()
    if architecture not in known:
        raise GGUFError(f"{path}: architecture {architecture!r} is not one transformers reads from GGUF "
                        f"(it reads: {', '.join(known)})")
    tensor_names = {t.name for t in reader.tensors}
    return {
        "architecture": architecture,
        "name": field("general.name"),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
        "file_type": field("general.file_type"),
        # llama.cpp writes no output.weight when the output projection is the embedding matrix.
        "tied_embeddings_in_file": "output.weight" not in tensor_names,
        "context_length": field(f"{architecture}.context_length"),
        "has_chat_template": field("tokenizer.chat_template") is not None,
        "bytes": path.stat().st_size,
    }


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "no message"
