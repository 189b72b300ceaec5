"""A round's generation: `python -m trainer.loop.sample SPEC.json`, its own process (through
Dagster Pipes when launched by an asset), so the orchestrator never loads a model.

It loads the generator (a standalone model directory: the starting model or the previous round's
merged model), samples every prompt of the round's prompt file and writes the sample shards
(`trainer.training.generate.generate_to_shards`): a killed run, started again, generates only what is
missing. Runs where only torch, transformers and pyarrow are installed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core.entry_point import run_entry_point
from trainer.core.process_step import JsonSpec
from trainer.training.generate import SamplingSettings, generate_to_shards

log = logging.getLogger("sftdag.sample")


@dataclass(frozen=True)
class SamplingSpec(JsonSpec):
    model_dir: Path  # a model `from_pretrained` loads alone
    tokenizer_dir: Path
    prompts: Path  # JSONL of {"row_id": int, "prompt": generation prompt text, ...} (templated held_out.jsonl)
    settings: SamplingSettings
    stop_tokens: list[str]  # the template's end-of-turn text (besides the tokenizer's eos)
    out_dir: Path
    round_index: int
    generator_version: str  # the store key of the generator model


def read_prompts(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"prompt_id": str(r["row_id"]), "prompt": r["prompt"]} for r in rows]


def run_sampling(spec: SamplingSpec) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spec.tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(spec.model_dir), dtype="auto")
    if torch.cuda.is_available():
        model.to("cuda")
    prompts = read_prompts(spec.prompts)
    log.info("round %d: %d prompts x %d samples from %s", spec.round_index, len(prompts),
             spec.settings.samples_per_prompt, spec.model_dir)
    return generate_to_shards(spec.out_dir, model, tokenizer, prompts, spec.settings, spec.stop_tokens,
                              round_index=spec.round_index, generator_version=spec.generator_version)


def main(argv: list[str] | None = None) -> int:
    def sample(spec_path: Path) -> str:
        spec = SamplingSpec.load(spec_path)
        return f"{run_sampling(spec)['samples']} samples in {spec.out_dir}"

    return run_entry_point(argv, "trainer.loop.sample", sample)


if __name__ == "__main__":
    raise SystemExit(main())
