"""Held-out prompts: greedy generation, exact match, and the teacher-forced loss of the references
(the evaluation's score, `trainer.training.score`, judges answers by the configured scorers,
`trainer.training.scorers`).

A held-out file is JSONL of `{"prompt": <text exactly as generation sees it, template and bos
included>, "reference": <expected completion>}`, and as the templated stage writes it also
`row_id`, `asked` (what the row asked, as the loop's filters hand it to a verifier),
`answer_end` (what training ends the answer with), `task` and `source` (its file). Prompts are tokenized with `add_special_tokens=False` because the text
already holds every special token.
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
                         # files written before rows said what they asked: None (scorers get the prompt)
                         "asked": row.get("asked"),
                         **{k: row[k] for k in ("row_id", "answer_end", "task", "source") if row.get(k) is not None}})
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


def held_out_loss(model, tokenizer, rows: Sequence[dict], stop_token: str | None, batch_size: int = 8) -> dict:
    """The teacher-forced cross-entropy (nats per token) of each row's reference given its rendered
    prompt, summed over the reference tokens of all rows and divided by their count:
    `{"loss", "tokens", "rows"}`, with `by_source` and `by_task` ({label: the same}) when rows
    carry two or more sources, or tasks. The reference is followed by the text the model is trained
    to end it with: the row's `answer_end`, else `stop_token` (the template's end-of-turn), else the
    tokenizer's eos. Prompt and reference are tokenized apart, without added special tokens, as
    generation sees the prompt and emits the answer. Batched, right-padded."""
    import torch

    fallback_end = stop_token or tokenizer.eos_token or ""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    sums: list[float] = []  # per row: its reference tokens' summed negative log-likelihood
    counts: list[int] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts, answers = [], []
        for row in batch:
            end = row["answer_end"] if row.get("answer_end") is not None else fallback_end
            prompts.append(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
            answers.append(tokenizer(row["reference"] + end, add_special_tokens=False)["input_ids"])
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)  # the reference's positions
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
            mask[i, :len(p) + len(a)] = 1
            scored[i, len(p):len(p) + len(a)] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            # position t predicts token t + 1; only the reference's predictions are upcast
            predicts = scored[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][predicts].float(), ids[:, 1:][predicts],
                                                    reduction="none")
        row_of = predicts.nonzero()[:, 0]
        sums += torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, row_of, nll.double()).tolist()
        counts += predicts.sum(dim=1).tolist()

    def figures(indices: Sequence[int]) -> dict:
        tokens = sum(counts[i] for i in indices)
        return {"loss": sum(sums[i] for i in indices) / tokens if tokens else None, "tokens": tokens,
                "rows": len(indices)}

    result = figures(range(len(rows)))
    for field, name in (("source", "by_source"), ("task", "by_task")):
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(str(row.get(field, f"(no {field})")), []).append(i)
        if len(groups) >= 2:
            result[name] = {label: figures(indices) for label, indices in sorted(groups.items())}
    return result


def held_out_loss_of(model_dir: str | Path, held_out_path: str | Path, stop_tokens: Iterable[str],
                     rows_limit: int | None = None) -> dict:
    """`held_out_loss` of the standalone model in `model_dir` on the first `rows_limit` rows of a
    held-out file; the first of `stop_tokens` is the end-of-turn its answers end with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = load_held_out(held_out_path, limit=rows_limit)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return held_out_loss(model, tokenizer, rows, next((t for t in stop_tokens if t), None))
