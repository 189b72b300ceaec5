"""Base models: `builtin:tiny-llama` (random weights from a small config), a GGUF (converted once
into the store), a local dir, a hub id.

`resolve_base_model` turns `ModelConfig.base` into something `from_pretrained` can load. The
builtin model is built once per config (fixed seed, so its weights are a pure function of the
config) and saved atomically into the store, so every stage and every rank loads the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer.core.config import ModelConfig
from trainer.core.store import Store
from trainer.models.gguf import STAGE as GGUF_STAGE
from trainer.models.gguf import conversion_key, gguf_file, is_gguf_base

log = logging.getLogger(__name__)

BUILTIN_TINY_LLAMA = "builtin:tiny-llama"
BUILTIN_SEED = 1234
# Bump when the way the builtin model is built changes (its bytes change).
BUILTIN_CODE_VERSION = "1"

TINY_LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def builtin_config_dict(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    config = dict(TINY_LLAMA_DEFAULTS)
    config.update(cfg.builtin_config or {})
    config["vocab_size"] = int(vocab_size)
    return config


def _config_hash(config: dict[str, Any]) -> str:
    payload = {"config": config, "seed": BUILTIN_SEED, "code_version": BUILTIN_CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def builtin_model_path(cfg: ModelConfig, store_root: str | Path, vocab_size: int) -> Path:
    """Where the builtin model of this config is (or will be) built: named by its config's hash,
    so it can be planned without building it (the training process builds it)."""
    if cfg.base != BUILTIN_TINY_LLAMA:
        raise ValueError(f"model.base: unknown builtin model {cfg.base!r} (known: {BUILTIN_TINY_LLAMA})")
    return Path(store_root) / "models" / f"builtin-{_config_hash(builtin_config_dict(cfg, vocab_size))}"


def is_built_here(cfg: ModelConfig) -> bool:
    """Whether the base is made by this project (a builtin config, or a GGUF converted into the
    store) rather than read as it is: the processes make it when it is missing."""
    return cfg.base == BUILTIN_TINY_LLAMA or is_gguf_base(cfg.base)


def planned_base_model(cfg: ModelConfig, store_root: str | Path, vocab_size: int, base_dir: str | Path = ".") -> str:
    """Where the base model is or will be, without building or converting anything (the
    orchestrator plans with this; it never loads a model)."""
    if cfg.base == BUILTIN_TINY_LLAMA:
        return str(builtin_model_path(cfg, store_root, vocab_size))
    if is_gguf_base(cfg.base):
        return str(Store(store_root).path(GGUF_STAGE, conversion_key(gguf_file(cfg.base, base_dir))))
    return resolve_base_model(cfg, store_root, vocab_size, base_dir)


def resolve_base_model(cfg: ModelConfig, store_root: str | Path, vocab_size: int, base_dir: str | Path = ".") -> str:
    """Path (or hub id) of the base model, made first when it is this project's to make.

    `builtin:tiny-llama` is built from a `LlamaConfig` (defaults above, overridden by
    `cfg.builtin_config`, `vocab_size` = the tokenizer's base vocabulary) with seeded random
    weights and saved once to `store_root/models/builtin-<hash>/`. A GGUF (a `.gguf` path, relative
    to `base_dir`, or a packaged `builtin:<name>`) is converted once into
    `store_root/base_model/<key>/` (`trainer.models.convert`). A local directory or a hub id is
    returned as given.
    """
    base = cfg.base
    if base == BUILTIN_TINY_LLAMA:
        target = builtin_model_path(cfg, store_root, vocab_size)
        if not (target / "config.json").exists():
            _build_tiny_llama(builtin_config_dict(cfg, vocab_size), target)
        return str(target)
    if is_gguf_base(base):
        from trainer.models.convert import converted

        return str(converted(gguf_file(base, base_dir), store_root).path)
    if base.startswith("builtin:"):
        builtin_model_path(cfg, store_root, vocab_size)  # raises: unknown builtin
    expanded = Path(base).expanduser()
    if not expanded.is_absolute():
        expanded = Path(base_dir) / expanded
    if expanded.exists():
        return str(expanded.resolve())
    return base  # a hub id, resolved by from_pretrained (needs network or the HF cache)


def _build_tiny_llama(config: dict[str, Any], target: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        try:
            llama_config = LlamaConfig(**config)
        except TypeError as e:
            raise ValueError(f"model.builtin_config: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            model = LlamaForCausalLM(llama_config)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "sftdag_builtin.json").write_text(json.dumps({"config": config, "seed": BUILTIN_SEED}, indent=1))
        try:
            os.rename(tmp, target)
            log.info("built %s into %s", BUILTIN_TINY_LLAMA, target)
        except OSError:
            # Another process built the same config first: theirs is identical; keep it.
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_init_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """`from_pretrained` keyword arguments from `cfg.init_kwargs` (dtype names become torch dtypes)."""
    import torch

    kwargs = dict(cfg.init_kwargs or {})
    if "torch_dtype" in kwargs and "dtype" not in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"model.init_kwargs.dtype: unknown dtype {dtype!r}")
        kwargs["dtype"] = getattr(torch, dtype)
    kwargs.setdefault("attn_implementation", "sdpa")
    kwargs["trust_remote_code"] = bool(cfg.trust_remote_code)
    if cfg.revision and "revision" not in kwargs:
        kwargs["revision"] = cfg.revision
    return kwargs


def embedding_rows(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def resize_for_tokenizer(model, tokenizer) -> int:
    """Grow the embeddings (and an untied lm_head) to `len(tokenizer)`; returns the rows added.

    Never shrinks: a model vocabulary larger than the tokenizer's (common, padded to a multiple
    of 64 or 128) is left alone.
    """
    rows = embedding_rows(model)
    wanted = len(tokenizer)
    if wanted <= rows:
        return 0
    model.resize_token_embeddings(wanted)
    added = wanted - rows
    log.info("resized token embeddings from %d to %d rows (%d new rows for the tokenizer's added tokens)",
             rows, wanted, added)
    return added


def load_model(path: str, cfg: ModelConfig, **extra_kwargs: Any):
    """Load a causal LM from `path` with `cfg.init_kwargs` (default attn_implementation sdpa)."""
    from transformers import AutoModelForCausalLM

    kwargs = model_init_kwargs(cfg)
    kwargs.update(extra_kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
