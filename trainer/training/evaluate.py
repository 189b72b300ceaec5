"""Held-out prompts: greedy generation and exact-match accuracy.

A held-out file is JSONL of `{"prompt": <text exactly as generation sees it, template and bos
included>, "reference": <expected completion>}`. Prompts are tokenized with
`add_special_tokens=False` because the text already holds every special token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch


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
            rows.append({"prompt": row["prompt"], "reference": "" if row["reference"] is None else str(row["reference"])})
            if limit is not None and len(rows) >= limit:
                break
    return rows


def stop_tokens_and_strings(tokenizer, stop_tokens: Iterable[str | int] = ()) -> tuple[list[int], list[str]]:
    """eos id(s) of the tokenizer plus the given stops: ids, and single-token strings as ids; a
    stop that is several tokens of this tokenizer (an end-of-turn marker written as text, such as
    "<|im_end|>" for a tokenizer without it) is a stop string."""
    ids: list[int] = []
    strings: list[str] = []
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.append(eos)
    elif eos:
        ids.extend(int(e) for e in eos)
    for tok in stop_tokens:
        if tok is None or tok == "":
            continue
        if isinstance(tok, int):
            ids.append(tok)
            continue
        enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(int(enc[0]))
        else:
            strings.append(tok)
    return sorted(set(ids)), strings


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
             stop_tokens: Iterable[str | int] = ()) -> list[str]:
    """Greedy, left-padded, batched generation; returns the decoded completions (special tokens
    dropped), cut at the first stop (eos or the template's end-of-turn text)."""
    if not prompts:
        return []
    stops, stop_strings = stop_tokens_and_strings(tokenizer, stop_tokens)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stops[0] if stops else 0
    device = _device_of(model)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
            width = max(len(e) for e in encoded)
            if width == 0:
                raise ValueError("generate: empty prompt")
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, e in enumerate(encoded):
                if e:
                    ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
                    mask[i, width - len(e):] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=stops or None, pad_token_id=pad_id,
                temperature=None, top_p=None, top_k=None, **extra,
            )
            for row in out[:, width:].tolist():
                cut = len(row)
                for i, t in enumerate(row):
                    if t in stops:
                        cut = i
                        break
                text = tokenizer.decode(row[:cut], skip_special_tokens=True)
                for s in stop_strings:  # new ids decoded, then cut at the first stop string
                    j = text.find(s)
                    if j >= 0:
                        text = text[:j]
                outputs.append(text)
    finally:
        if was_training:
            model.train()
    return outputs


def exact_match(generations: Sequence[str], references: Sequence[str]) -> float:
    if len(generations) != len(references):
        raise ValueError(f"exact_match: {len(generations)} generations for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(g.strip() == r.strip() for g, r in zip(generations, references))
    return hits / len(references)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def score_model(model_dir: str | Path, held_out: str | Path, stop_tokens: Iterable[str], accuracy_rows: int,
                max_new_tokens: int) -> tuple[float, int]:
    """Held-out exact match of the standalone model in `model_dir`, and how many rows were scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = load_held_out(held_out)[:accuracy_rows]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    stops = [t for t in (*stop_tokens, tokenizer.eos_token) if t]
    generations = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, stop_tokens=stops)
    return exact_match(generations, [r["reference"] for r in rows]), len(rows)
