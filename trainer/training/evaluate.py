"""Held-out prompts: greedy generation, exact-match accuracy, and scoring by the configured scorers.

A held-out file is JSONL of `{"prompt": <text exactly as generation sees it, template and bos
included>, "reference": <expected completion>}`. Prompts are tokenized with
`add_special_tokens=False` because the text already holds every special token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from trainer.training.generate import SamplingSettings, sample


def load_held_out(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "reference" not in row:
                raise ValueError(f"{path}:{n}: expected {{\"prompt\": str, \"reference\": str}}")
            rows.append({"prompt": row["prompt"], "reference": "" if row["reference"] is None else str(row["reference"]),
                         **({"row_id": row["row_id"]} if "row_id" in row else {})})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
             stop_tokens: Iterable[str | int] = ()) -> list[str]:
    """Greedy, left-padded, batched generation (`trainer.training.generate.sample`, one sample per
    prompt); returns the decoded completions (special tokens dropped), cut at the first stop (eos
    or the template's end-of-turn text)."""
    settings = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    records = sample(model, tokenizer, [{"prompt_id": i, "prompt": p} for i, p in enumerate(prompts)], settings,
                     stop_tokens)
    return [r.text for r in records]


def exact_match(generations: Sequence[str], references: Sequence[str]) -> float:
    if len(generations) != len(references):
        raise ValueError(f"exact_match: {len(generations)} generations for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(g.strip() == r.strip() for g, r in zip(generations, references))
    return hits / len(references)


def score_model(model_dir: str | Path, held_out: str | Path, stop_tokens: Iterable[str], accuracy_rows: int,
                max_new_tokens: int) -> tuple[float, int]:
    """Held-out exact match of the standalone model in `model_dir`, and how many rows were scored."""
    rows = load_held_out(held_out)[:accuracy_rows]
    generations = answer_held_out(model_dir, rows, stop_tokens, max_new_tokens)
    return exact_match(generations, [r["reference"] for r in rows]), len(rows)


def score_model_with(model_dir: str | Path, held_out: str | Path, stop_tokens: Iterable[str], accuracy_rows: int,
                     max_new_tokens: int, scorers: Sequence) -> tuple[dict, list[dict]]:
    """The standalone model's greedy answers to the first `accuracy_rows` held-out rows, judged by
    each of `scorers` (`trainer.training.scorers`): ({scorer id: pass rate, fail and error
    counts}, one record per row: prompt id, reference, answer, each scorer's outcome)."""
    from trainer.training.scorers import score_answers

    rows = load_held_out(held_out)[:accuracy_rows]
    generations = answer_held_out(model_dir, rows, stop_tokens, max_new_tokens) if rows else []
    return score_answers(scorers, rows, generations)


def answer_held_out(model_dir: str | Path, rows: Sequence[dict], stop_tokens: Iterable[str],
                    max_new_tokens: int) -> list[str]:
    """The standalone model's greedy answers to held-out rows (`load_held_out`), as it is scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    stops = [t for t in (*stop_tokens, tokenizer.eos_token) if t]
    return generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, stop_tokens=stops)
