"""Convert a GGUF base once into a safetensors model directory under `<store>/base_model/<key>/`.

`python -m trainer.models.convert SPEC.json` (its own process: dequantizing loads the model, which
the orchestrator never does). The directory holds the config, the dequantized weights (tied
embeddings stay tied), the tokenizer with its chat template and the generation config, so it
loads with `from_pretrained(dir)` alone. It is written in a temporary directory and renamed into
place with its manifest (the completion marker) by `Store.get_or_build`, so a killed conversion
leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core.entry_point import run_entry_point
from trainer.core.process_step import JsonSpec, ProcessStep
from trainer.core.store import StageOutput, Store
from trainer.models import gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConversionSpec(JsonSpec):
    gguf_file: Path
    store: str  # the store's location (a directory or an object-storage URL)
    key: str


def plan_conversion(store: Store, file: Path, key: str | None = None) -> ProcessStep:
    """Converting `file` into `<store>/base_model/<key>/` (the conversion key, computed here when
    not given): `python -m trainer.models.convert SPEC`, its spec written."""
    key = key or gguf.conversion_key(file)
    return ProcessStep(gguf.STAGE, key, store, ConversionSpec(Path(file), store.location, key),
                       "trainer.models.convert").write_spec()


def converted(gguf_file: Path, store: str | Path, key: str | None = None) -> StageOutput:
    """The converted directory of `gguf_file` in `store` (under `key`, the planned conversion key,
    or computed here), converting it first when absent."""
    key = key or gguf.conversion_key(gguf_file)
    return Store(store).get_or_build(gguf.STAGE, key, lambda tmp: convert(gguf_file, tmp))


def convert(gguf_file: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantize `gguf_file` into `out_dir` (a fresh directory); returns the manifest's facts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    facts = gguf.inspect(gguf_file)  # a damaged file or unknown architecture fails here, in one line
    folder, name = str(gguf_file.parent), gguf_file.name
    log.info("converting %s (%s, %d parameters) into %s", gguf_file, facts["architecture"], facts["parameters"],
             out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: plain dense weights and no quantization config, so save_pretrained can write them.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 quantization_config=GgufConfig(dequantize=True))
    tied = _tied(model)
    if facts["tied_embeddings_in_file"] and not tied:
        raise gguf.GGUFError(f"{gguf_file}: the file has no output projection (tied embeddings) but the loaded "
                             "model's lm_head is not the embedding matrix")
    if model.generation_config is not None and model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    parameters = sum(p.numel() for p in model.parameters())  # tied weights counted once
    info = {**facts, "gguf_file": str(gguf_file), "gguf_sha256": gguf.gguf_digest(gguf_file),
            "versions": gguf.library_versions(), "model_class": type(model).__name__,
            "model_parameters": int(parameters), "dtype": str(model.dtype).removeprefix("torch."),
            "tie_word_embeddings": tied, "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
            "chat_template": bool(tokenizer.chat_template), "eos_token": tokenizer.eos_token}
    (out_dir / gguf.GGUF_INFO).write_text(json.dumps(info, indent=1))
    return info


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def main(argv: list[str] | None = None) -> int:
    def run(spec_path: Path) -> str:
        spec = ConversionSpec.load(spec_path)
        out = converted(spec.gguf_file, spec.store, spec.key)
        return f"{spec.gguf_file} converted into {out.path}" + (" (already converted)" if out.cache_hit else "")

    return run_entry_point(argv, "trainer.models.convert", run)


if __name__ == "__main__":
    raise SystemExit(main())
