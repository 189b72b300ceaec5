"""Samples per second of the loop's sampler (`trainer.training.generate.sample`: batched, left padded,
prompts sorted by length, each prompt prefilled once for all its samples, a row dropped from the batch
once it has stopped) against a per-prompt `model.generate` loop (how IterativeSFTTrainer users wrote
their generation step), on the same model, prompts and settings, measured in one run and printed as
ratios. The sampler is also timed keeping its finished rows (transformers' `generate` decoding every
row until the batch's last one stops, `--no-kept-rows` leaves that out) and with every sample's copy
of its prompt prefilled (`--no-copied-prefill` leaves that out), which show what dropping finished
rows and the shared prefill save.

    python benchmarks/generate.py [--prompts 64] [--samples 4] [--max-new-tokens 32] [--runs 2]
    python benchmarks/generate.py --model builtin:smollm2-135m-instruct --data few_shot \
        --prompts 32 --samples 8 --max-new-tokens 16 --runs 2

Default model: a Llama with random weights (a config, nothing downloaded) over the shipped tiny
tokenizer; random weights rarely say end-of-turn, so both sides generate about --max-new-tokens per
sample. `--model` takes a GGUF base (converted once into --store) or a model directory; its own
tokenizer and chat template render the prompts. The prompts are the embedded dataset's questions
rendered by the chat template, as the loop sends them. The contenders are timed alternately and
the best run of each counts; generated tokens are printed to show the work is alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.core.config import DataConfig, TemplateConfig, TokenizerConfig  # noqa: E402
from trainer.data.default_data import BUILTIN_DATASETS  # noqa: E402
from trainer.data.record_formats import normalize  # noqa: E402
from trainer.data.templating import generation_prompt, setup_template  # noqa: E402
from trainer.data.tokenizer_loading import load_tokenizer  # noqa: E402
from trainer.training import generate as generate_module  # noqa: E402
from trainer.training.generate import SamplingSettings, sample, stop_tokens_and_strings  # noqa: E402


def per_prompt_loop(model, tok, prompts: list[str], settings: SamplingSettings, stops: list[int]) -> int:
    """One `generate` call per prompt, its samples as num_return_sequences; returns the tokens
    generated (up to and including the first stop)."""
    tokens = 0
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        out = model.generate(input_ids=ids, do_sample=True, top_k=0, temperature=settings.temperature,
                             max_new_tokens=settings.max_new_tokens, num_return_sequences=settings.samples_per_prompt,
                             eos_token_id=stops, pad_token_id=stops[0])  # a finished row's filler: an id it has
        for row in out[:, ids.shape[1]:].tolist():
            tokens += next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            tok.decode(row, skip_special_tokens=True)  # each sample decoded, as the sampler does
    return tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="a GGUF base (builtin:smollm2-135m-instruct) or model dir; "
                                                      "default: a random Llama (--hidden, --layers)")
    parser.add_argument("--data", default="default", choices=sorted(BUILTIN_DATASETS))
    parser.add_argument("--store", default=str(REPO / ".sftdag" / "store"), help="where a GGUF is converted")
    parser.add_argument("--no-copied-prefill", action="store_true", help="skip the sampler without shared prefill")
    parser.add_argument("--no-kept-rows", action="store_true", help="skip the sampler that keeps finished rows")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model:
        from trainer.models.gguf import gguf_file, is_gguf_base

        path = args.model
        if is_gguf_base(path):
            from trainer.models.convert import converted

            path = str(converted(gguf_file(path), args.store).path)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
        model_name = args.model
    else:
        tok = load_tokenizer(TokenizerConfig(path="builtin:tiny"))
    setup = setup_template(tok, TemplateConfig())
    data = DataConfig()
    prompts = [generation_prompt(normalize(r, data), tok, setup, data).prompt
               for r in BUILTIN_DATASETS[args.data]("train", args.prompts, seed=1)]
    if not args.model:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64, max_position_embeddings=1024)).to(args.device).eval()
        model_name = f"llama hidden {args.hidden}, {args.layers} layers, vocab {len(tok)}"
    settings = SamplingSettings(samples_per_prompt=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size)
    stop_tokens = [setup.eot_token] if setup.eot_token else []
    stops, _ = stop_tokens_and_strings(tok, stop_tokens)
    items = [{"prompt_id": i, "prompt": p} for i, p in enumerate(prompts)]

    records_of: dict[str, list] = {}  # each sampler's samples, which must be the same

    def sampler(prompt_items: list[dict] = items, name: str = "sampler") -> int:
        records_of[name] = sample(model, tok, prompt_items, settings, stop_tokens)
        return sum(r.token_count for r in records_of[name])

    def baseline() -> int:
        return per_prompt_loop(model, tok, prompts, settings, stops)

    def sampler_copied_prefill() -> int:
        shared, generate_module._shared_prefill = generate_module._shared_prefill, lambda *a: {}
        try:
            return sampler(name="sampler_copied_prefill")
        finally:
            generate_module._shared_prefill = shared

    def sampler_keeping_finished_rows(prompt_items: list[dict] = items) -> int:
        droppable, generate_module._rows_can_be_dropped = generate_module._rows_can_be_dropped, lambda model: False
        try:
            return sampler(prompt_items, "sampler_keeping_finished_rows")
        finally:
            generate_module._rows_can_be_dropped = droppable

    sampler(items[:2])  # warm-up (first-call set-up) for every side
    if not args.no_kept_rows:
        sampler_keeping_finished_rows(items[:2])
    per_prompt_loop(model, tok, prompts[:2], settings, stops)
    records_of.clear()
    contenders = {"per_prompt_generate": baseline, "sampler": sampler}
    if not args.no_kept_rows:
        contenders["sampler_keeping_finished_rows"] = sampler_keeping_finished_rows
    if not args.no_copied_prefill:
        contenders["sampler_copied_prefill"] = sampler_copied_prefill
    best = {name: float("inf") for name in contenders}
    tokens = {}
    for _ in range(args.runs):
        for name, run in contenders.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens[name] = run()
            if args.device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    samples = args.prompts * args.samples
    result = {
        "device": args.device, "threads": torch.get_num_threads(), "prompts": args.prompts,
        "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "model": model_name, "data": args.data,
        "prompt_tokens": [min(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts),
                          max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)],
        "generated_tokens": tokens,
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "samples_per_second": {k: round(samples / v, 1) for k, v in best.items()},
        "tokens_per_second": {k: round(tokens[k] / v) for k, v in best.items()},
        "speedup": round(best["per_prompt_generate"] / best["sampler"], 2),
        "same_samples": all(records == records_of["sampler"] for records in records_of.values()),
    }
    if "sampler_keeping_finished_rows" in best:
        result["dropped_rows_speedup"] = round(best["sampler_keeping_finished_rows"] / best["sampler"], 2)
    if "sampler_copied_prefill" in best:
        result["shared_prefill_speedup"] = round(best["sampler_copied_prefill"] / best["sampler"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
