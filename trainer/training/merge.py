"""Merge a trained adapter into its base model: a standalone model directory.

The result loads with `AutoModelForCausalLM.from_pretrained` alone (no peft), holds the tokenizer
(chat template and added tokens included) and a `GenerationConfig` whose `eos_token_id` includes
the template's end-of-turn token, so plain `model.generate` stops at the end of the assistant
turn (an end-of-turn text of several tokens is a `stop_strings` entry: pass `tokenizer=` to
`generate`). Written into a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from trainer.core.entry_point import run_entry_point
from trainer.core.schemas import MERGE_INFO
from trainer.core.store import Store
from trainer.training.spec import MergeSpec

log = logging.getLogger(__name__)

def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def merge_adapter(adapter_dir: str | Path, base_model_path: str, tokenizer_dir: str | Path, out_dir: str | Path,
                  eot_token: str | None = None) -> Path:
    """Merge `adapter_dir` (a LoRA adapter, or a full fine-tuned model for `mode: full`) into a
    standalone model at `out_dir`. Returns `out_dir`; an existing `out_dir` is left as is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.training.base_model import resize_for_tokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists():
        log.info("%s already exists; not merging again", out_dir)
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    kwargs = {"dtype": "auto"}  # the checkpoint's own dtype

    if is_adapter_dir(adapter_dir):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_model_path, **kwargs)
        resize_for_tokenizer(base, tokenizer)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        model = model.merge_and_unload()
        source = {"kind": "lora", "adapter": str(adapter_dir), "base_model": str(base_model_path)}
    else:
        if not (adapter_dir / "config.json").exists():
            raise FileNotFoundError(f"{adapter_dir}: neither an adapter (adapter_config.json) nor a model (config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(adapter_dir), **kwargs)
        resize_for_tokenizer(model, tokenizer)
        source = {"kind": "full", "model": str(adapter_dir)}

    generation_config = _generation_config(model, tokenizer, eot_token)
    model.generation_config = generation_config
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    eos_ids = generation_config.eos_token_id
    model.config.eos_token_id = eos_ids

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / MERGE_INFO).write_text(json.dumps({**source, "eot_token": eot_token,
                                                  "eos_token_id": eos_ids}, indent=1))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.exists():
                raise
            log.info("%s was completed by another process", out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged model written to %s", out_dir)
    return out_dir


def _generation_config(model, tokenizer, eot_token: str | None):
    from transformers import GenerationConfig

    from trainer.training.generate import stop_tokens_and_strings

    # An end-of-turn text that is several tokens (a marker the tokenizer lacks) is a stop string.
    eos, stop_strings = stop_tokens_and_strings(tokenizer, [eot_token] if eot_token else [])
    config = GenerationConfig.from_model_config(model.config) if model.generation_config is None else model.generation_config
    config = GenerationConfig(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})
    config.eos_token_id = eos
    if stop_strings:
        config.stop_strings = stop_strings
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = int(tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = int(tokenizer.bos_token_id)
    return config


def merge(spec: MergeSpec) -> Path:
    """Merge the adapter into `<store>/merged/<merged key>/` once (here, or found merged on
    another machine)."""
    store = Store(spec.store)
    if store.has("merged", spec.merged_key):
        return store.get("merged", spec.merged_key).path
    return merge_adapter(spec.adapter_dir, spec.base_model, spec.tokenizer_dir, store.path("merged", spec.merged_key),
                         spec.eot_token)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.training.merge SPEC.json`: its own process, so the orchestrator never loads a model."""

    def merge_spec(spec_path: Path) -> str:
        return f"merged into {merge(MergeSpec.load(spec_path))}"

    return run_entry_point(argv, "trainer.training.merge", merge_spec)


if __name__ == "__main__":
    raise SystemExit(main())
