"""The score stage: models judged on the held-out prompts, in a process of their own.

`python -m trainer.training.score SPEC` scores each model of the spec (the trained model, and the
model it was trained from: the "before") into `<store>/score/<its key>/`, unless that score is in
the store already (the base model's is shared by every experiment trained from it on the same
held-out prompts with the same scorers):

    score.json     accuracy (the first scorer's pass rate), each scorer's pass rate, fails and
                   errors (per task when the rows carry one), the held-out loss (per source when
                   there are several), the rows scored, the keys it was made from
    answers.jsonl  each greedy answer with its prompt id, reference and every scorer's outcome

A score key is made of the model's key, the held-out prompts' content and the scorers' code
(`trainer.training.launch.score_key`): a changed scorer rescores, never retrains or remerges.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trainer.core.entry_point import run_entry_point
from trainer.core.schemas import SCORE
from trainer.core.store import StageOutput, Store
from trainer.training.spec import ScoreSpec

log = logging.getLogger(__name__)

# The scored answers beside score.json: prompt id, reference, answer, each scorer's outcome, one per line.
ANSWERS = "answers.jsonl"


def score_models(spec: ScoreSpec) -> dict[str, dict[str, Any]]:
    """{role: its score.json} of every model of the spec, each scored once per score key."""
    from trainer.training.scorers import scorers_at

    # Before any model loads: a scorer that does not import fails here, in one line.
    scorers = scorers_at(spec.scorers, spec.scorers_where, spec.scorers_base_dir)
    store = Store(spec.store)
    scores = {}
    for role, model in spec.models.items():
        out = store.get_or_build("score", model["score_key"],
                                 lambda tmp, model=model: _score_one(spec, scorers, model, tmp))
        scores[role] = read_score(out)
    return scores


def read_score(out: StageOutput) -> dict[str, Any]:
    return json.loads((out.path / SCORE).read_text())


def _score_one(spec: ScoreSpec, scorers: list, model: dict[str, Any], tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {**model.get("versions", {}), "score_version": model["score_key"]}
    if spec.held_out is not None:
        from trainer.training.evaluate import generate, held_out_loss, load_held_out
        from trainer.training.scorers import score_answers

        rows = load_held_out(spec.held_out)[: max(spec.accuracy_rows, 0)]
        loaded, tokenizer = load_for_scoring(model["model_dir"], spec.tokenizer_dir, model.get("adapter_dir"))
        stops = [t for t in (spec.eot_token, tokenizer.eos_token) if t]
        answers = generate(loaded, tokenizer, [r["prompt"] for r in rows], spec.max_new_tokens,
                           stop_tokens=stops) if rows else []
        report, records = score_answers(scorers, rows, answers)
        result.update(accuracy=report[scorers[0].id]["pass_rate"] if rows else None, headline=scorers[0].id,
                      scored_rows=len(rows), scorers=report,
                      held_out_loss=held_out_loss(loaded, tokenizer, rows, spec.eot_token or tokenizer.eos_token)
                      if rows else None)
        with open(tmp / ANSWERS, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (tmp / SCORE).write_text(json.dumps(result, indent=2))
    return {"held_out": str(spec.held_out) if spec.held_out else None, "model_dir": str(model["model_dir"])}


def load_for_scoring(model_dir: str | Path, tokenizer_dir: str | Path, adapter_dir: str | Path | None = None):
    """(the model in eval mode, the data stage's tokenizer), the model's embeddings grown to the
    tokenizer when the template added tokens (a base model from before they were added); with
    `adapter_dir` (a LoRA checkpoint), that adapter merged into it in memory, as merging would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.training.base_model import resize_for_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    resize_for_tokenizer(model, tokenizer)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    import torch

    if torch.cuda.is_available():  # as the sampler does: scoring is generation
        model.to("cuda")
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.training.score SPEC.json`: its own process, so the orchestrator never loads a model."""

    def score(spec_path: Path) -> str:
        scores = score_models(ScoreSpec.load(spec_path))
        return "; ".join(f"{role}: accuracy {s.get('accuracy')}" for role, s in scores.items())

    return run_entry_point(argv, "trainer.training.score", score)


if __name__ == "__main__":
    raise SystemExit(main())
